//! `dmp-bus`: the log every dmp role reads and writes: topics of partitions of records, keyed
//! produce, consumer groups with partition assignment, committed offsets, message timestamps,
//! seeking a group to a time (partner replays) and end offsets for lag.
//!
//! Backends, chosen by URL with [`open`]:
//! - `embedded` ([`embedded::EmbeddedBus`], default): in-process, durable on fjall, consumers in
//!   the same process woken as soon as a record is committed;
//! - `kafka://host:port[,…]` ([`kafka::KafkaBus`], cargo feature `kafka`): rdkafka with an
//!   idempotent producer and the at-least-once consumer pattern of STYLE.md #10.
//!
//! Keys are partitioned with Kafka's murmur2 partitioner on both backends. Every backend passes
//! [`conformance`]. Consumers hand out records; the application marks them done in an
//! [`OffsetTracker`] and commits only its contiguous watermark, so nothing unfinished is committed.

pub mod conformance;
pub mod embedded;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod metrics;
mod tail;
mod tracker;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

pub use dmp_core::ErrorKind;
pub use tracker::OffsetTracker;

/// A bus error: a kind usable as a metric label, and what happened.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The topic does not exist.
    #[error("unknown topic {0:?}")]
    UnknownTopic(String),
    /// The request is invalid.
    #[error("rejected: {0}")]
    Rejected(String),
    /// The embedded database failed.
    #[error("embedded bus storage failed: {0}")]
    Storage(#[from] fjall::Error),
    /// A stored record could not be decoded.
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// The broker could not be reached or did not answer in time.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The operation timed out.
    #[error("timed out: {0}")]
    Timeout(String),
    /// Any other backend failure.
    #[error("bus backend failed: {0}")]
    Backend(String),
    /// The URL names a backend compiled out of this build.
    #[error("bus backend {url:?} needs cargo feature `{feature}`, which this build does not have")]
    FeatureNotEnabled {
        /// The feature.
        feature: &'static str,
        /// The configured URL.
        url: String,
    },
    /// The consumer or bus was closed.
    #[error("closed")]
    Closed,
}

impl BusError {
    /// The metric label of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            BusError::UnknownTopic(_) => ErrorKind::NotFound,
            BusError::Rejected(_) | BusError::FeatureNotEnabled { .. } => ErrorKind::Rejected,
            BusError::Unavailable(_) | BusError::Closed => ErrorKind::Unavailable,
            BusError::Timeout(_) => ErrorKind::Timeout,
            BusError::Storage(_) | BusError::Corrupt(_) | BusError::Backend(_) => {
                ErrorKind::Internal
            }
        }
    }
}

/// Result of bus operations.
pub type Result<T, E = BusError> = std::result::Result<T, E>;

/// A record to produce. The partition is chosen from the key (murmur2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProduceRecord {
    /// The key (for dmp, the uid).
    pub key: Vec<u8>,
    /// The payload.
    pub value: Vec<u8>,
    /// Message timestamp, epoch ms (None: the time of the produce call).
    pub timestamp: Option<i64>,
}

impl ProduceRecord {
    /// A record stamped with the time it is produced.
    pub fn new(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        ProduceRecord {
            key: key.into(),
            value: value.into(),
            timestamp: None,
        }
    }
}

/// A consumed record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Topic.
    pub topic: Arc<str>,
    /// Partition.
    pub partition: u32,
    /// Offset within the partition.
    pub offset: u64,
    /// Message timestamp, epoch ms.
    pub timestamp: i64,
    /// Key.
    pub key: Vec<u8>,
    /// Payload.
    pub value: Vec<u8>,
}

impl Record {
    /// This record refused by `stage` for `reason` (with the full `error`), as a record for
    /// `dmp.dead-letter`: same key, its origin and its payload ([`dmp_core::DeadLetter`]).
    pub fn dead_letter(&self, stage: &str, reason: &str, error: &str) -> ProduceRecord {
        ProduceRecord::new(
            self.key.clone(),
            dmp_core::DeadLetter {
                reason: reason.to_string(),
                error: error.to_string(),
                stage: stage.to_string(),
                topic: self.topic.to_string(),
                partition: self.partition,
                offset: self.offset,
                timestamp: self.timestamp,
                payload: dmp_core::DeadLetter::payload_of(&self.value),
            }
            .to_json(),
        )
    }
}

/// A topic and one of its partitions.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
}

impl TopicPartition {
    /// From parts.
    pub fn new(topic: impl Into<String>, partition: u32) -> Self {
        TopicPartition {
            topic: topic.into(),
            partition,
        }
    }
}

/// Where a produced record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    /// Partition.
    pub partition: u32,
    /// Offset.
    pub offset: u64,
}

/// A topic's name and partition count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicInfo {
    /// Name.
    pub name: String,
    /// Partitions.
    pub partitions: u32,
}

/// The offsets of one partition: `low` is the first record still kept, `high` the next offset
/// to be written (so `high - low` records are kept).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionOffsets {
    /// Partition.
    pub partition: u32,
    /// First offset kept.
    pub low: u64,
    /// Next offset to be written.
    pub high: u64,
}

/// The health of a consumer, for `/readyz` and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsumerHealth {
    /// The consumer exceeded the broker's max poll interval and was thrown out of its group.
    pub max_poll_exceeded: bool,
    /// The consumer paused its partitions because the application is behind.
    pub paused: bool,
}

/// How a topic lets go of old records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Cleanup {
    /// Records are deleted by age and size (Kafka's `cleanup.policy=delete`).
    #[default]
    Delete,
    /// Only the newest record of each key is kept; an empty value is a tombstone, itself removed
    /// after a while (Kafka's `cleanup.policy=compact`).
    Compact,
}

/// The log.
#[async_trait]
pub trait Bus: Send + Sync {
    /// Creates a topic deleted by age and size; `Ok(false)` when it already exists (with whatever
    /// partitions and cleanup it has).
    async fn create_topic(&self, name: &str, partitions: u32) -> Result<bool> {
        self.create_topic_with(name, partitions, Cleanup::Delete)
            .await
    }
    /// Creates a topic with the given cleanup; `Ok(false)` when it already exists.
    async fn create_topic_with(
        &self,
        name: &str,
        partitions: u32,
        cleanup: Cleanup,
    ) -> Result<bool>;
    /// Every topic.
    async fn topics(&self) -> Result<Vec<TopicInfo>>;
    /// Produces a batch; returns when every record is acknowledged (durable per the backend's
    /// policy), with where each landed, in input order.
    async fn produce(&self, topic: &str, records: Vec<ProduceRecord>) -> Result<Vec<Delivered>>;
    /// Joins consumer group `group` subscribed to `topics`. A group without committed offsets
    /// starts at the earliest record kept.
    async fn consumer(&self, group: &str, topics: &[String]) -> Result<Box<dyn Consumer>>;
    /// Low and high offsets of each partition.
    async fn offsets(&self, topic: &str) -> Result<Vec<PartitionOffsets>>;
    /// The group's committed offset (next record to read) for each partition of `topic`.
    async fn committed(&self, group: &str, topic: &str) -> Result<Vec<Option<u64>>>;
    /// For each partition, the first offset whose timestamp is >= `ts_ms` (the high offset when
    /// there is none).
    async fn offsets_for_time(&self, topic: &str, ts_ms: i64) -> Result<Vec<u64>>;
    /// Moves group `group` on `topic` back (or forward) to `ts_ms`: commits
    /// [`Bus::offsets_for_time`] for it, through [`Bus::commit_group`]. The group must have no
    /// live member.
    async fn seek_group_to_time(&self, group: &str, topic: &str, ts_ms: i64) -> Result<Vec<u64>> {
        let offsets = self.offsets_for_time(topic, ts_ms).await?;
        let commits: Vec<(u32, u64)> = offsets
            .iter()
            .enumerate()
            .map(|(p, o)| (p as u32, *o))
            .collect();
        self.commit_group(group, topic, &commits).await?;
        Ok(offsets)
    }
    /// Commits `offsets` (partition, next offset to read) of `topic` for group `group` from
    /// outside the group, as an operator's tool does. The group must have no live member
    /// ([`BusError::Rejected`] otherwise, as for a partition the topic does not have).
    async fn commit_group(&self, group: &str, topic: &str, offsets: &[(u32, u64)]) -> Result<()>;
    /// A short name for logs and metric labels.
    fn backend_name(&self) -> &'static str;
}

/// One member of a consumer group.
#[async_trait]
pub trait Consumer: Send {
    /// Waits up to `timeout` for records of the partitions this member owns; at most `max`.
    /// Records of one partition come in offset order.
    async fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<Record>>;
    /// The partitions this member owns now.
    fn assignment(&self) -> Vec<TopicPartition>;
    /// Marks everything before each given offset as processed. Offsets of partitions this member
    /// no longer owns are ignored. Durable at once on the embedded bus; on Kafka stored and
    /// committed within `auto.commit.interval.ms`, and synchronously on revoke and close.
    async fn commit(&mut self, offsets: &[(TopicPartition, u64)]) -> Result<()>;
    /// Health of this member.
    fn health(&self) -> ConsumerHealth;
    /// Commits what was marked and leaves the group.
    async fn close(self: Box<Self>) -> Result<()>;
}

/// Opens the bus named by `url`: `embedded` (needs the embedded database) or `kafka://…`.
pub fn open(
    url: &str,
    db: Option<&dmp_store::embedded::EmbeddedDatabase>,
    cfg: &dmp_core::Config,
) -> Result<Arc<dyn Bus>> {
    let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or(url);
    match scheme {
        "embedded" => {
            let db = db.ok_or_else(|| {
                BusError::Rejected("the embedded bus needs the embedded database".into())
            })?;
            Ok(Arc::new(embedded::EmbeddedBus::open(db, &cfg.bus)?))
        }
        "kafka" => open_kafka(url, cfg),
        other => Err(BusError::Rejected(format!(
            "unknown bus scheme {other:?} in {url:?} (expected embedded or kafka://)"
        ))),
    }
}

#[cfg(feature = "kafka")]
fn open_kafka(url: &str, cfg: &dmp_core::Config) -> Result<Arc<dyn Bus>> {
    Ok(Arc::new(kafka::KafkaBus::from_url(url, &cfg.kafka)?))
}

#[cfg(not(feature = "kafka"))]
fn open_kafka(url: &str, _cfg: &dmp_core::Config) -> Result<Arc<dyn Bus>> {
    Err(BusError::FeatureNotEnabled {
        feature: "kafka",
        url: url.to_string(),
    })
}

/// Creates every dmp topic that does not exist yet; returns the names created.
pub async fn ensure_topics(
    bus: &dyn Bus,
    topics: &dmp_core::config::Topics,
) -> Result<Vec<String>> {
    let mut created = Vec::new();
    for name in topics.all() {
        let cleanup = if topics.compacted(name) {
            Cleanup::Compact
        } else {
            Cleanup::Delete
        };
        if bus
            .create_topic_with(name, topics.partitions, cleanup)
            .await?
        {
            created.push(name.to_string());
        }
    }
    Ok(created)
}

/// Records not yet committed by `group` in each partition of `topic` (`high - committed`, or
/// `high - low` for a group that never committed). On brokers whose high watermark lags (Tansu
/// 0.6) this undercounts; dmp measures waiting by message timestamps for that reason.
pub async fn lag(bus: &dyn Bus, group: &str, topic: &str) -> Result<Vec<u64>> {
    let offsets = bus.offsets(topic).await?;
    let committed = bus.committed(group, topic).await?;
    Ok(offsets
        .iter()
        .zip(committed)
        .map(|(o, c)| o.high.saturating_sub(c.unwrap_or(o.low).max(o.low)))
        .collect())
}

/// How long a consumer waits by default in [`Consumer::poll`].
pub const DEFAULT_POLL_TIMEOUT: Duration = Duration::from_millis(100);
