//! The Kafka backend (rdkafka, bundled librdkafka with ssl and zstd).
//!
//! - **Producer**: idempotent (`enable.idempotence=true`), partition chosen by dmp's murmur2 (the
//!   Java client's default partitioner, which librdkafka's default is not), acknowledged when the
//!   broker has every record of the batch.
//! - **Consumer** (STYLE.md #10): `enable.auto.offset.store=false`; a dedicated thread polls
//!   librdkafka every 100 ms whatever the application does, into a bounded buffer; when the buffer
//!   is full it pauses the assigned partitions and keeps polling, so slow processing never makes
//!   the member exceed `max.poll.interval.ms` and leave its group. [`Consumer::commit`] stores
//!   offsets only for partitions still owned; librdkafka commits them every
//!   `auto.commit.interval.ms`, and synchronously before partitions are revoked and at close.
//!   Buffered records of revoked partitions are dropped (the new owner reads them again). A
//!   MAXPOLL error still counts in `dmp_bus_max_poll_exceeded_total` and marks the member
//!   unhealthy.
//! - Any librdkafka property can be passed through `[kafka.common]`, `[kafka.producer]` and
//!   `[kafka.consumer]` (SASL, TLS, tuning).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use dmp_core::clock::now_ms;
use dmp_core::config::KafkaConfig;
use dmp_core::partition::partition_for_key;

use crate::metrics as m;
use crate::{
    Bus, BusError, Cleanup, Consumer, ConsumerHealth, Delivered, PartitionOffsets, ProduceRecord,
    Record, Result, TopicInfo, TopicPartition,
};

const META_TIMEOUT: Duration = Duration::from_secs(10);

fn map_err(e: KafkaError) -> BusError {
    let code = e.rdkafka_error_code();
    match code {
        Some(RDKafkaErrorCode::UnknownTopicOrPartition) | Some(RDKafkaErrorCode::UnknownTopic) => {
            BusError::UnknownTopic(e.to_string())
        }
        Some(RDKafkaErrorCode::MessageTimedOut)
        | Some(RDKafkaErrorCode::OperationTimedOut)
        | Some(RDKafkaErrorCode::RequestTimedOut) => BusError::Timeout(e.to_string()),
        Some(RDKafkaErrorCode::BrokerTransportFailure)
        | Some(RDKafkaErrorCode::AllBrokersDown)
        | Some(RDKafkaErrorCode::Resolve)
        | Some(RDKafkaErrorCode::NetworkException) => BusError::Unavailable(e.to_string()),
        Some(RDKafkaErrorCode::InvalidConfig) | Some(RDKafkaErrorCode::InvalidArgument) => {
            BusError::Rejected(e.to_string())
        }
        _ => BusError::Backend(e.to_string()),
    }
}

/// The Kafka bus.
pub struct KafkaBus {
    brokers: String,
    cfg: KafkaConfig,
    replication: i32,
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    meta: Arc<BaseConsumer>,
    partitions: RwLock<HashMap<String, u32>>,
}

impl KafkaBus {
    /// Connects to `kafka://host:port[,host:port]`. Creating clients does not wait for the
    /// broker; the first call that needs it does.
    pub fn from_url(url: &str, cfg: &KafkaConfig) -> Result<KafkaBus> {
        Self::from_url_with_replication(url, cfg, 1)
    }

    /// As [`KafkaBus::from_url`], creating topics with `replication` replicas.
    pub fn from_url_with_replication(
        url: &str,
        cfg: &KafkaConfig,
        replication: u32,
    ) -> Result<KafkaBus> {
        let brokers = url
            .strip_prefix("kafka://")
            .filter(|b| !b.is_empty())
            .ok_or_else(|| BusError::Rejected(format!("{url:?} is not kafka://host:port[,…]")))?
            .trim_end_matches('/')
            .to_string();
        let mut pc = base_config(&brokers, cfg);
        pc.set("enable.idempotence", "true")
            .set("message.timeout.ms", cfg.produce_timeout_ms.to_string());
        for (k, v) in &cfg.producer {
            pc.set(k, v);
        }
        let producer: FutureProducer = pc.create().map_err(map_err)?;
        let admin: AdminClient<DefaultClientContext> =
            base_config(&brokers, cfg).create().map_err(map_err)?;
        let mut mc = base_config(&brokers, cfg);
        mc.set("group.id", "dmp-metadata")
            .set("enable.auto.commit", "false");
        let meta: Arc<BaseConsumer> = Arc::new(mc.create().map_err(map_err)?);
        Ok(KafkaBus {
            brokers,
            cfg: cfg.clone(),
            replication: replication as i32,
            producer,
            admin,
            meta,
            partitions: RwLock::new(HashMap::new()),
        })
    }

    /// A topic's configuration as the broker describes it (for example `cleanup.policy`).
    pub async fn topic_config(&self, name: &str) -> Result<BTreeMap<String, String>> {
        let opts = AdminOptions::new().request_timeout(Some(META_TIMEOUT));
        let results = self
            .admin
            .describe_configs(&[ResourceSpecifier::Topic(name)], &opts)
            .await
            .map_err(map_err)?;
        match results.into_iter().next() {
            Some(Ok(resource)) => Ok(resource
                .entries
                .into_iter()
                .filter_map(|e| e.value.map(|v| (e.name, v)))
                .collect()),
            Some(Err(code)) => Err(map_err(KafkaError::AdminOp(code))),
            None => Err(BusError::Backend("no result for describe_configs".into())),
        }
    }

    fn consumer_config(&self, group: &str) -> ClientConfig {
        let mut c = base_config(&self.brokers, &self.cfg);
        c.set("group.id", group)
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false");
        for (k, v) in &self.cfg.consumer {
            c.set(k, v);
        }
        // These make the at-least-once pattern; a passed-through property must not undo them.
        c.set("enable.auto.offset.store", "false");
        c
    }

    async fn partition_count(&self, topic: &str) -> Result<u32> {
        if let Some(n) = self.partitions.read().get(topic) {
            return Ok(*n);
        }
        let md = blocking({
            let c = self.meta_client()?;
            let topic = topic.to_string();
            move || c.fetch_metadata(Some(&topic), META_TIMEOUT)
        })
        .await?;
        let t = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .ok_or_else(|| BusError::UnknownTopic(topic.to_string()))?;
        if t.error().is_some() || t.partitions().is_empty() {
            return Err(BusError::UnknownTopic(topic.to_string()));
        }
        let n = t.partitions().len() as u32;
        self.partitions.write().insert(topic.to_string(), n);
        Ok(n)
    }

    /// For each partition with a broker answer, reads forward from it to the first record whose
    /// timestamp reaches `ts_ms` (bounded to a few seconds in all).
    async fn refine_offsets_for_time(
        &self,
        topic: &str,
        ts_ms: i64,
        broker: &[Option<u64>],
    ) -> Result<Vec<Option<u64>>> {
        if broker.iter().all(|o| o.is_none()) {
            return Ok(broker.to_vec());
        }
        let mut cfg = base_config(&self.brokers, &self.cfg);
        cfg.set("group.id", "dmp-offsets-for-time")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false");
        let c: BaseConsumer = cfg.create().map_err(map_err)?;
        let topic = topic.to_string();
        let start = broker.to_vec();
        blocking(move || {
            let mut tpl = TopicPartitionList::new();
            for (p, o) in start.iter().enumerate() {
                if let Some(o) = o {
                    tpl.add_partition_offset(&topic, p as i32, Offset::Offset(*o as i64))?;
                }
            }
            c.assign(&tpl)?;
            let mut out = start.clone();
            let mut open: BTreeSet<usize> =
                (0..start.len()).filter(|p| start[*p].is_some()).collect();
            let deadline = Instant::now() + Duration::from_secs(3);
            let mut quiet_since = Instant::now();
            while !open.is_empty() && Instant::now() < deadline {
                match c.poll(Duration::from_millis(100)) {
                    Some(Ok(m)) => {
                        quiet_since = Instant::now();
                        let p = m.partition() as usize;
                        if !open.contains(&p) {
                            continue;
                        }
                        let ts = m.timestamp().to_millis().unwrap_or(i64::MAX);
                        if ts >= ts_ms {
                            out[p] = Some(m.offset() as u64);
                            open.remove(&p);
                        } else {
                            // Not there yet: the answer is after this record (or the end).
                            out[p] = Some(m.offset() as u64 + 1);
                        }
                    }
                    Some(Err(e)) => return Err(e),
                    None if quiet_since.elapsed() > Duration::from_millis(700) => break,
                    None => {}
                }
            }
            Ok(out)
        })
        .await
    }

    fn meta_client(&self) -> Result<Arc<BaseConsumer>> {
        Ok(self.meta.clone())
    }
}

fn base_config(brokers: &str, cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    for (k, v) in &cfg.common {
        c.set(k, v);
    }
    c
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::result::Result<T, KafkaError> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BusError::Backend(e.to_string()))?
        .map_err(map_err)
}

#[async_trait]
impl Bus for KafkaBus {
    async fn create_topic_with(
        &self,
        name: &str,
        partitions: u32,
        cleanup: Cleanup,
    ) -> Result<bool> {
        dmp_core::config::check_topic_name("topic", name)
            .map_err(|e| BusError::Rejected(e.to_string()))?;
        let mut topic = NewTopic::new(
            name,
            partitions as i32,
            TopicReplication::Fixed(self.replication),
        );
        if cleanup == Cleanup::Compact {
            topic = topic.set("cleanup.policy", "compact");
        }
        let opts = AdminOptions::new().operation_timeout(Some(META_TIMEOUT));
        let results = self
            .admin
            .create_topics(&[topic], &opts)
            .await
            .map_err(map_err)?;
        match results.into_iter().next() {
            Some(Ok(_)) => {
                // Wait until the topic is visible in metadata, so a produce right after works.
                let deadline = Instant::now() + META_TIMEOUT;
                while self.partition_count(name).await.is_err() {
                    if Instant::now() > deadline {
                        return Err(BusError::Timeout(format!("topic {name:?} never appeared")));
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(true)
            }
            Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => Ok(false),
            Some(Err((_, code))) => Err(map_err(KafkaError::AdminOp(code))),
            None => Err(BusError::Backend("no result for create_topics".into())),
        }
    }

    async fn topics(&self) -> Result<Vec<TopicInfo>> {
        let c = self.meta_client()?;
        let md = blocking(move || c.fetch_metadata(None, META_TIMEOUT)).await?;
        let mut out: Vec<TopicInfo> = md
            .topics()
            .iter()
            .filter(|t| !t.name().starts_with("__") && t.error().is_none())
            .map(|t| TopicInfo {
                name: t.name().to_string(),
                partitions: t.partitions().len() as u32,
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn produce(&self, topic: &str, records: Vec<ProduceRecord>) -> Result<Vec<Delivered>> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let start = Instant::now();
        let n = self.partition_count(topic).await?;
        let now = now_ms();
        let mut futures = Vec::with_capacity(records.len());
        let mut bytes = 0u64;
        for r in &records {
            let partition = partition_for_key(&r.key, n) as i32;
            bytes += (r.key.len() + r.value.len()) as u64;
            let mut rec = FutureRecord::<[u8], [u8]>::to(topic)
                .key(&r.key[..])
                .partition(partition)
                .timestamp(r.timestamp.unwrap_or(now));
            // An empty value travels as a null payload: a tombstone on a compacted topic.
            if !r.value.is_empty() {
                rec = rec.payload(&r.value[..]);
            }
            loop {
                match self.producer.send_result(rec) {
                    Ok(f) => {
                        futures.push(f);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        rec = back;
                        self.producer.poll(Duration::from_millis(1));
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Err((e, _)) => return Err(map_err(e)),
                }
            }
        }
        let mut delivered = Vec::with_capacity(futures.len());
        let mut first_err = None;
        for f in futures {
            match f.await {
                Ok(Ok(d)) => delivered.push(Delivered {
                    partition: d.partition as u32,
                    offset: d.offset as u64,
                }),
                Ok(Err((e, _))) => {
                    first_err.get_or_insert(map_err(e));
                }
                Err(_) => {
                    first_err.get_or_insert(BusError::Closed);
                }
            }
        }
        metrics::histogram!(m::PRODUCE_DURATION, "backend" => "kafka")
            .record(start.elapsed().as_secs_f64());
        if let Some(e) = first_err {
            metrics::counter!(m::ERRORS, "backend" => "kafka", "kind" => e.kind().as_str())
                .increment(1);
            return Err(e);
        }
        metrics::counter!(m::PRODUCED_RECORDS, "backend" => "kafka")
            .increment(records.len() as u64);
        metrics::counter!(m::PRODUCED_BYTES, "backend" => "kafka").increment(bytes);
        Ok(delivered)
    }

    async fn consumer(&self, group: &str, topics: &[String]) -> Result<Box<dyn Consumer>> {
        if topics.is_empty() {
            return Err(BusError::Rejected("subscribe to at least one topic".into()));
        }
        let shared = Arc::new(Shared::default());
        let ctx = DmpContext {
            shared: shared.clone(),
        };
        let consumer: BaseConsumer<DmpContext> = self
            .consumer_config(group)
            .create_with_context(ctx)
            .map_err(map_err)?;
        let names: Vec<&str> = topics.iter().map(|s| s.as_str()).collect();
        consumer.subscribe(&names).map_err(map_err)?;
        let consumer = Arc::new(consumer);
        let cap = self.cfg.max_buffered_records;
        let thread = {
            let (consumer, shared) = (consumer.clone(), shared.clone());
            std::thread::Builder::new()
                .name("dmp-kafka-poll".into())
                .spawn(move || poll_loop(&consumer, &shared, cap))
                .map_err(|e| BusError::Backend(e.to_string()))?
        };
        Ok(Box::new(KafkaConsumer {
            consumer,
            shared,
            thread: Some(thread),
            topics: topics.iter().map(|t| Arc::from(t.as_str())).collect(),
        }))
    }

    async fn offsets(&self, topic: &str) -> Result<Vec<PartitionOffsets>> {
        let n = self.partition_count(topic).await?;
        let c = self.meta_client()?;
        let topic = topic.to_string();
        blocking(move || {
            (0..n)
                .map(|p| {
                    c.fetch_watermarks(&topic, p as i32, META_TIMEOUT)
                        .map(|(low, high)| PartitionOffsets {
                            partition: p,
                            low: low.max(0) as u64,
                            high: high.max(0) as u64,
                        })
                })
                .collect()
        })
        .await
    }

    async fn committed(&self, group: &str, topic: &str) -> Result<Vec<Option<u64>>> {
        let n = self.partition_count(topic).await?;
        let c: BaseConsumer = self
            .consumer_config(group)
            .set("enable.auto.commit", "false")
            .create()
            .map_err(map_err)?;
        let topic = topic.to_string();
        let tpl = blocking(move || {
            let mut tpl = TopicPartitionList::new();
            for p in 0..n {
                tpl.add_partition(&topic, p as i32);
            }
            c.committed_offsets(tpl, META_TIMEOUT)
        })
        .await?;
        Ok(tpl
            .elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(o) if o >= 0 => Some(o as u64),
                _ => None,
            })
            .collect())
    }

    async fn offsets_for_time(&self, topic: &str, ts_ms: i64) -> Result<Vec<u64>> {
        let n = self.partition_count(topic).await?;
        let ends = self.offsets(topic).await?;
        let c = self.meta_client()?;
        let topic_owned = topic.to_string();
        let tpl = blocking(move || {
            let mut tpl = TopicPartitionList::new();
            for p in 0..n {
                tpl.add_partition_offset(&topic_owned, p as i32, Offset::Offset(ts_ms))?;
            }
            c.offsets_for_times(tpl, META_TIMEOUT)
        })
        .await?;
        let broker: Vec<Option<u64>> = tpl
            .elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(o) if o >= 0 => Some(o as u64),
                _ => None,
            })
            .collect();
        // Some brokers (Tansu 0.6) answer with the first offset of the batch holding the target;
        // read forward to the first record that reaches it, so replays are exact on any broker.
        let refined = self.refine_offsets_for_time(topic, ts_ms, &broker).await?;
        Ok(refined
            .into_iter()
            .enumerate()
            .map(|(p, o)| o.unwrap_or(ends[p].high))
            .collect())
    }

    async fn commit_group(&self, group: &str, topic: &str, offsets: &[(u32, u64)]) -> Result<()> {
        let n = self.partition_count(topic).await?;
        if let Some((p, _)) = offsets.iter().find(|(p, _)| *p as usize >= n as usize) {
            return Err(BusError::Rejected(format!(
                "topic {topic:?} has no partition {p} (it has {n})"
            )));
        }
        let c: BaseConsumer = self
            .consumer_config(group)
            .set("enable.auto.commit", "false")
            .create()
            .map_err(map_err)?;
        let topic = topic.to_string();
        let to_commit = offsets.to_vec();
        blocking(move || {
            let mut tpl = TopicPartitionList::new();
            for (p, o) in &to_commit {
                tpl.add_partition_offset(&topic, *p as i32, Offset::Offset(*o as i64))?;
            }
            // A commit from outside the group: the broker refuses it while the group has members.
            c.commit(&tpl, CommitMode::Sync)
        })
        .await
        .map_err(|e| match e {
            BusError::Backend(m) => BusError::Rejected(format!(
                "cannot move the offsets of group {group:?} (stop its members first): {m}"
            )),
            other => other,
        })
    }

    fn backend_name(&self) -> &'static str {
        "kafka"
    }
}

#[derive(Default)]
struct Shared {
    buffer: Mutex<VecDeque<Record>>,
    notify: tokio::sync::Notify,
    assignment: Mutex<BTreeSet<(String, i32)>>,
    paused: AtomicBool,
    max_poll_exceeded: AtomicBool,
    stop: AtomicBool,
}

struct DmpContext {
    shared: Arc<Shared>,
}

impl ClientContext for DmpContext {}

impl ConsumerContext for DmpContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            // Commit what the application finished before anyone else owns these partitions.
            if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                if e.rdkafka_error_code() != Some(RDKafkaErrorCode::NoOffset) {
                    tracing::warn!(error = %e, "commit on revoke failed");
                }
            }
            let revoked: BTreeSet<(String, i32)> = tpl
                .elements()
                .iter()
                .map(|e| (e.topic().to_string(), e.partition()))
                .collect();
            {
                let mut a = self.shared.assignment.lock();
                for tp in &revoked {
                    a.remove(tp);
                }
            }
            self.shared
                .buffer
                .lock()
                .retain(|r| !revoked.contains(&(r.topic.to_string(), r.partition as i32)));
            metrics::counter!(m::REBALANCES, "backend" => "kafka", "event" => "revoke")
                .increment(1);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let mut a = self.shared.assignment.lock();
            for e in tpl.elements() {
                a.insert((e.topic().to_string(), e.partition()));
            }
            if self.shared.paused.load(Ordering::Acquire) {
                let _ = consumer.pause(tpl);
            }
            metrics::counter!(m::REBALANCES, "backend" => "kafka", "event" => "assign")
                .increment(1);
        }
    }
}

fn poll_loop(consumer: &BaseConsumer<DmpContext>, shared: &Shared, cap: usize) {
    let mut topic_names: HashMap<String, Arc<str>> = HashMap::new();
    let mut last_warn = Instant::now() - Duration::from_secs(60);
    while !shared.stop.load(Ordering::Acquire) {
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(msg)) => {
                let topic = topic_names
                    .entry(msg.topic().to_string())
                    .or_insert_with(|| Arc::from(msg.topic()))
                    .clone();
                let rec = Record {
                    topic,
                    partition: msg.partition() as u32,
                    offset: msg.offset() as u64,
                    timestamp: msg.timestamp().to_millis().unwrap_or_else(now_ms),
                    key: msg.key().unwrap_or_default().to_vec(),
                    value: msg.payload().unwrap_or_default().to_vec(),
                };
                shared.buffer.lock().push_back(rec);
                shared.notify.notify_one();
            }
            Some(Err(KafkaError::MessageConsumption(RDKafkaErrorCode::PollExceeded))) => {
                shared.max_poll_exceeded.store(true, Ordering::Release);
                metrics::counter!(m::MAX_POLL_EXCEEDED).increment(1);
                tracing::error!("kafka consumer exceeded max.poll.interval.ms and left its group");
            }
            Some(Err(e)) => {
                metrics::counter!(m::ERRORS, "backend" => "kafka", "kind" => map_err(e.clone()).kind().as_str())
                    .increment(1);
                if last_warn.elapsed() > Duration::from_secs(10) {
                    last_warn = Instant::now();
                    tracing::warn!(error = %e, "kafka consumer error");
                }
            }
        }
        let len = shared.buffer.lock().len();
        metrics::gauge!(m::CONSUMER_BUFFERED_RECORDS).set(len as f64);
        let paused = shared.paused.load(Ordering::Acquire);
        if !paused && len >= cap {
            if let Ok(a) = consumer.assignment() {
                if consumer.pause(&a).is_ok() {
                    shared.paused.store(true, Ordering::Release);
                    metrics::counter!(m::CONSUMER_PAUSES).increment(1);
                }
            }
        } else if paused && len <= cap / 2 {
            if let Ok(a) = consumer.assignment() {
                if consumer.resume(&a).is_ok() {
                    shared.paused.store(false, Ordering::Release);
                }
            }
        }
    }
}

/// A member of a Kafka consumer group.
pub struct KafkaConsumer {
    consumer: Arc<BaseConsumer<DmpContext>>,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
    topics: Vec<Arc<str>>,
}

impl KafkaConsumer {
    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[async_trait]
impl Consumer for KafkaConsumer {
    async fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<Record>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut buf = self.shared.buffer.lock();
                if !buf.is_empty() {
                    let n = buf.len().min(max);
                    let out: Vec<Record> = buf.drain(..n).collect();
                    metrics::counter!(m::CONSUMED_RECORDS, "backend" => "kafka")
                        .increment(out.len() as u64);
                    return Ok(out);
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    fn assignment(&self) -> Vec<TopicPartition> {
        self.shared
            .assignment
            .lock()
            .iter()
            .filter(|(t, _)| self.topics.iter().any(|x| **x == **t))
            .map(|(t, p)| TopicPartition::new(t.clone(), *p as u32))
            .collect()
    }

    async fn commit(&mut self, offsets: &[(TopicPartition, u64)]) -> Result<()> {
        let mut tpl = TopicPartitionList::new();
        {
            let owned = self.shared.assignment.lock();
            for (tp, off) in offsets {
                if owned.contains(&(tp.topic.clone(), tp.partition as i32)) {
                    tpl.add_partition_offset(
                        &tp.topic,
                        tp.partition as i32,
                        Offset::Offset(*off as i64),
                    )
                    .map_err(map_err)?;
                }
            }
        }
        if tpl.count() == 0 {
            return Ok(());
        }
        match self.consumer.store_offsets(&tpl) {
            Ok(()) => Ok(()),
            // Revoked between our check and the store: the new owner re-reads; nothing is lost.
            Err(e) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::State) => Ok(()),
            Err(e) => Err(map_err(e)),
        }
    }

    fn health(&self) -> ConsumerHealth {
        ConsumerHealth {
            max_poll_exceeded: self.shared.max_poll_exceeded.load(Ordering::Acquire),
            paused: self.shared.paused.load(Ordering::Acquire),
        }
    }

    async fn close(mut self: Box<Self>) -> Result<()> {
        self.stop();
        let consumer = self.consumer.clone();
        blocking(move || {
            match consumer.commit_consumer_state(CommitMode::Sync) {
                Err(e) if e.rdkafka_error_code() != Some(RDKafkaErrorCode::NoOffset) => {
                    return Err(e)
                }
                _ => {}
            }
            consumer.unsubscribe();
            Ok(())
        })
        .await
    }
}

impl Drop for KafkaConsumer {
    fn drop(&mut self) {
        self.stop();
    }
}
