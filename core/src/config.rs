//! Layered configuration: the built-in defaults (`config/dmp.toml`, compiled in), then an optional
//! file, then `DMP__SECTION__KEY` environment variables. Unknown keys are rejected and every
//! error names the key at fault.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The built-in defaults, fully commented.
pub const DEFAULT_TOML: &str = include_str!("../../config/dmp.toml");

/// A configuration error. The message always names the key or the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file is not valid TOML.
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax {
        /// The file.
        path: String,
        /// The parser's message.
        message: String,
    },
    /// A key is unknown or has a value of the wrong type.
    #[error("config key `{key}`: {message}")]
    Key {
        /// The dotted key.
        key: String,
        /// What is wrong.
        message: String,
    },
}

impl ConfigError {
    fn key(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Key {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the embedded backends keep their data.
    pub data_dir: PathBuf,
    /// Which backend serves each layer, by URL.
    pub backends: Backends,
    /// Topic names and the shape dmp creates them with.
    pub topics: Topics,
    /// The embedded database shared by the embedded bus and store.
    pub embedded: Embedded,
    /// The embedded bus.
    pub bus: BusConfig,
    /// The Kafka backend.
    pub kafka: KafkaConfig,
    /// The user store.
    pub store: StoreConfig,
    /// The HTTP API.
    pub api: ApiConfig,
    /// Where ingest puts events while the bus is unavailable.
    pub spill: SpillConfig,
    /// The storage writer role.
    pub storage_writer: StorageWriterConfig,
    /// The segmenter role.
    pub segmenter: SegmenterConfig,
    /// Segment counters and audience estimates.
    pub stats: StatsConfig,
    /// The process's memory.
    pub memory: MemoryConfig,
    /// Logs and metrics.
    pub telemetry: TelemetryConfig,
}

/// `[backends]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backends {
    /// `embedded` or `kafka://host:port[,host:port]`.
    pub bus: String,
    /// `embedded` or `hbase://host:port`.
    pub store: String,
    /// `embedded` or `redis://host:port`.
    pub stats: String,
}

/// `[topics]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topics {
    /// Raw events.
    pub events: String,
    /// Changed user ids.
    pub user_changes: String,
    /// Segment records for partners.
    pub segments: String,
    /// The latest segment record of each user, compacted (partners start from it).
    pub segments_current: String,
    /// Segment records of rules in shadow mode.
    pub segments_shadow: String,
    /// Rejected records with their reason.
    pub dead_letter: String,
    /// Partitions of each topic dmp creates.
    pub partitions: u32,
    /// Replication factor on Kafka.
    pub replication: u32,
}

impl Topics {
    /// Whether dmp creates topic `name` compacted (the latest record per key) rather than deleted
    /// by age and size.
    pub fn compacted(&self, name: &str) -> bool {
        name == self.segments_current
    }

    /// Every topic dmp uses.
    pub fn all(&self) -> [&str; 6] {
        [
            &self.events,
            &self.user_changes,
            &self.segments,
            &self.segments_current,
            &self.segments_shadow,
            &self.dead_letter,
        ]
    }
}

/// `[embedded]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Embedded {
    /// Block cache, MiB.
    pub cache_mb: u64,
    /// Memtable of each keyspace, MiB.
    pub memtable_mb: u64,
    /// Journal size before forced flushes, MiB.
    pub journal_mb: u64,
    /// 0 = fsync every batch; N = fsync every N ms.
    pub fsync_interval_ms: u64,
    /// Nice value of the database's background threads (flushes, compactions), 0..=19.
    pub background_nice: u64,
}

/// `[bus]`: the embedded bus.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusConfig {
    /// Age retention, hours.
    pub retention_hours: u64,
    /// Size retention per partition, bytes.
    pub retention_bytes: u64,
    /// Records per retention segment.
    pub segment_records: u64,
    /// Records written since a compacted partition's last compaction that trigger the next one.
    pub compact_min_dirty_records: u64,
    /// Hours a tombstone on a compacted topic is kept before a compaction removes it.
    pub tombstone_retention_hours: u64,
    /// MiB of the newest produced chunks kept in memory for consumers at the tail (0: off): one
    /// budget for all partitions, the oldest chunk leaving first whatever its partition.
    pub tail_cache_mb: u64,
}

/// `[kafka]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Buffered records per consumer before it pauses.
    pub max_buffered_records: usize,
    /// Produce acknowledgement timeout, ms.
    pub produce_timeout_ms: u64,
    /// librdkafka properties for both sides.
    #[serde(default)]
    pub common: BTreeMap<String, String>,
    /// librdkafka properties for producers.
    #[serde(default)]
    pub producer: BTreeMap<String, String>,
    /// librdkafka properties for consumers.
    #[serde(default)]
    pub consumer: BTreeMap<String, String>,
}

/// `[store]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Cap on cells of a whole-row read.
    pub max_row_cells: usize,
    /// Repack a row when a read finds more unpacked writes than this.
    pub repack_after_deltas: usize,
    /// MiB of recently read rows the embedded store keeps merged in memory (0: off).
    pub row_cache_mb: u64,
    /// Column families.
    pub families: BTreeMap<String, FamilyConfig>,
}

/// `[store.families.NAME]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FamilyConfig {
    /// Days a cell lives after its version time; 0 = forever.
    pub ttl_days: u64,
    /// Versions kept per qualifier.
    pub max_versions: u32,
}

/// `[api]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Listen address.
    pub listen: String,
    /// Largest body after decompression, bytes.
    pub max_body_bytes: usize,
    /// Most events in one POST.
    pub max_batch_events: usize,
    /// Client IP header set by a trusted proxy ("" = peer address).
    pub trusted_proxy_header: String,
    /// Cookie holding the pixel's uid.
    pub uid_cookie: String,
    /// Lifetime of that cookie, days.
    pub uid_cookie_max_age_days: u64,
    /// How long ingest waits for the bus before spilling, ms.
    pub ingest_timeout_ms: u64,
    /// Sources counted by name in metrics.
    pub metric_sources: Vec<String>,
    /// API keys per caller role.
    pub keys: ApiKeys,
    /// Requests per second per caller on the keyed endpoints (0 = no limit).
    pub rate_limit_per_second: u32,
    /// Burst allowed above the rate.
    pub rate_limit_burst: u32,
    /// A consuming role with work in flight and no progress for this long makes /readyz fail, s.
    pub ready_stuck_secs: u64,
    /// How long a deleted user's events are dropped, s.
    pub deleted_user_suppress_secs: u64,
}

/// `[api.keys]`: API keys per caller role. A role with no keys needs none.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeys {
    /// `POST /v1/events`.
    pub ingest: Vec<String>,
    /// `GET /v1/users/{uid}/segments`.
    pub lookup: Vec<String>,
    /// `GET /v1/audience`, `GET /v1/segments`.
    pub planner: Vec<String>,
    /// `GET /v1/stream/segments`.
    pub partner: Vec<String>,
    /// Everything above, and `GET /v1/topics`.
    pub admin: Vec<String>,
}

/// `[spill]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpillConfig {
    /// Directory ("" = `<data_dir>/spill`).
    pub dir: String,
    /// Largest spill file, bytes.
    pub max_bytes: u64,
    /// Replay attempt interval, ms.
    pub replay_interval_ms: u64,
}

impl Config {
    /// The spill directory in force.
    pub fn spill_dir(&self) -> PathBuf {
        if self.spill.dir.is_empty() {
            self.data_dir.join("spill")
        } else {
            PathBuf::from(&self.spill.dir)
        }
    }
}

/// `[segmenter]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmenterConfig {
    /// Consumer group.
    pub group: String,
    /// Rule file ("" = built-in rules only).
    pub rules: String,
    /// Rule file check interval, ms.
    pub reload_interval_ms: u64,
    /// Workers (0 = cores).
    pub workers: usize,
    /// Pin workers to cores.
    pub pin_cores: bool,
    /// Nice value of the workers (0 = the process's own priority).
    pub worker_nice: u64,
    /// Changes queued per worker.
    pub queue_capacity: usize,
    /// Skip changes an earlier read already saw (and coalesce a user's changes in one batch).
    pub dedupe: bool,
    /// Users each worker remembers (dedupe and blacklist state, one map): at most this many,
    /// and always the most recently used half.
    pub dedupe_capacity: usize,
    /// A change is read no sooner than this many ms after it was written (a user's burst is one
    /// evaluation); 0 = at once.
    pub coalesce_ms: u64,
    /// Users each worker keeps a summary of (the row pruned to the events the rules depend on),
    /// to evaluate a change from what it wrote instead of the whole row; 0 = always the whole row.
    pub summaries_per_worker: usize,
    /// Skip users changing faster than `blacklist_max_changes` per window.
    pub blacklist: bool,
    /// Blacklist window, seconds, on the users' time (their changes' newest events), not the
    /// workers'.
    pub blacklist_window_secs: u64,
    /// Changes within the window above which a user is a bot.
    pub blacklist_max_changes: u32,
    /// How long a bot stays blacklisted, seconds.
    pub blacklist_ban_secs: u64,
    /// Changes within the blacklist's window above which a user is evaluated at most once per
    /// `throttle_interval_ms` (0 = off; needs `blacklist` and `dedupe`).
    pub throttle_after_changes: u32,
    /// A throttled user's least time between evaluations, ms.
    pub throttle_interval_ms: u64,
    /// A change whose newest event is older than its write by more than this (a partner's file,
    /// a replayed backlog) is backfill: handled after live changes, ms (0 = no priority).
    pub backfill_age_ms: u64,
    /// The longest a backfill change waits behind live ones, ms.
    pub backfill_max_wait_ms: u64,
    /// Backfill changes a worker holds back at most; beyond, they are handled in turn.
    pub backfill_max_held: usize,
    /// How often due re-evaluation timers are scanned, ms.
    pub timer_scan_interval_ms: u64,
    /// Due timers handed to workers per partition per scan.
    pub timer_scan_max: usize,
    /// Commit interval, ms.
    pub commit_interval_ms: u64,
}

/// `[stats]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsConfig {
    /// Days a (segment, day) sketch is kept after its day.
    pub retention_days: u32,
    /// Redis: `batched` (many users per script call) or `per_user` (one call per user).
    pub redis_mode: String,
    /// Redis: users waiting to be counted; beyond, updates are dropped (and counted).
    pub queue_capacity: usize,
    /// Redis: distinct keys per script call.
    pub max_keys_per_call: usize,
    /// Redis: (key, user) updates per script call.
    pub max_updates_per_call: usize,
    /// Redis: how long to wait for a reply, ms.
    pub response_timeout_ms: u64,
    /// How long `flush` waits for queued updates to be written, ms.
    pub flush_timeout_ms: u64,
    /// Embedded counters: `lg k` of the theta sketches kept beside the HyperLogLogs (0: none).
    pub theta_lg_k: u8,
}

/// `[storage_writer]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageWriterConfig {
    /// Consumer group.
    pub group: String,
    /// Most events per store batch.
    pub batch_max_events: usize,
    /// `full`, `truncate` or `hash`.
    pub ip_mode: String,
    /// Key for `hash`.
    pub ip_hash_key: String,
    /// GeoLite2-City .mmdb files.
    pub geoip: Vec<PathBuf>,
    /// Crawler list ("" = shipped copy).
    pub crawler_list: String,
    /// How often suppressions (deleted users) made by other processes are picked up, ms.
    pub suppression_reload_ms: u64,
}

/// `[memory]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// MiB faulted in when a long-running command starts and given to the allocator to use
    /// first (0: none). Used in whole blocks of [`PRETOUCH_BLOCK_MB`].
    pub pretouch_mb: u64,
}

/// The allocator's arenas come in blocks of this many MiB (mimalloc 3's smallest arena): a
/// pretouch is at least one and is rounded down to whole ones.
pub const PRETOUCH_BLOCK_MB: u64 = 32;

/// `[telemetry]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Log filter.
    pub log_level: String,
    /// `text` or `json`.
    pub log_format: String,
}

impl Config {
    /// Loads the layers: defaults, then `file` if given, then the `DMP__…` variables of `env`.
    pub fn load<I>(file: Option<&Path>, env: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        Config::load_effective(file, env).map(|(c, _)| c)
    }

    /// As [`Config::load`], also returning the effective configuration as TOML text.
    pub fn load_effective<I>(file: Option<&Path>, env: I) -> Result<(Config, String), ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut root = parse_toml(DEFAULT_TOML, "<built-in defaults>")?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            let layer = parse_toml(&text, &path.display().to_string())?;
            merge(&mut root, layer);
        }
        for (name, raw) in env {
            let Some(rest) = name.strip_prefix("DMP__") else {
                continue;
            };
            let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
            if path.iter().any(|p| p.is_empty()) {
                return Err(ConfigError::key(
                    name,
                    "empty path segment in variable name",
                ));
            }
            set_path(&mut root, &path, env_value(&raw))
                .map_err(|m| ConfigError::key(path.join("."), m))?;
        }
        let text = toml::to_string_pretty(&root).unwrap_or_default();
        Ok((Config::from_table(root)?, text))
    }

    /// Loads from the process's environment.
    pub fn load_from_env(file: Option<&Path>) -> Result<Config, ConfigError> {
        Config::load(file, std::env::vars())
    }

    /// The built-in defaults alone.
    pub fn defaults() -> Config {
        Config::load(None, std::iter::empty()).expect("the built-in defaults are valid")
    }

    fn from_table(root: toml::Table) -> Result<Config, ConfigError> {
        let de = toml::Value::Table(root);
        let cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            ConfigError::key(path, e.into_inner().to_string())
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the limits of every key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_backend("backends.bus", &self.backends.bus, &["kafka"])?;
        check_backend("backends.store", &self.backends.store, &["hbase"])?;
        check_backend("backends.stats", &self.backends.stats, &["redis"])?;
        range("topics.partitions", self.topics.partitions as u64, 1, 1024)?;
        range("topics.replication", self.topics.replication as u64, 1, 16)?;
        for (key, name) in [
            ("topics.events", &self.topics.events),
            ("topics.user_changes", &self.topics.user_changes),
            ("topics.segments", &self.topics.segments),
            ("topics.segments_current", &self.topics.segments_current),
            ("topics.segments_shadow", &self.topics.segments_shadow),
            ("topics.dead_letter", &self.topics.dead_letter),
        ] {
            check_topic_name(key, name)?;
        }
        range("embedded.cache_mb", self.embedded.cache_mb, 8, 1 << 20)?;
        range("embedded.memtable_mb", self.embedded.memtable_mb, 1, 4096)?;
        range("embedded.journal_mb", self.embedded.journal_mb, 64, 65_536)?;
        range(
            "embedded.fsync_interval_ms",
            self.embedded.fsync_interval_ms,
            0,
            3_600_000,
        )?;
        range(
            "embedded.background_nice",
            self.embedded.background_nice,
            0,
            19,
        )?;
        range("bus.retention_hours", self.bus.retention_hours, 1, 87_600)?;
        range(
            "bus.retention_bytes",
            self.bus.retention_bytes,
            1 << 20,
            u64::MAX,
        )?;
        range(
            "bus.segment_records",
            self.bus.segment_records,
            1024,
            1 << 24,
        )?;
        range(
            "bus.compact_min_dirty_records",
            self.bus.compact_min_dirty_records,
            1,
            100_000_000,
        )?;
        range(
            "bus.tombstone_retention_hours",
            self.bus.tombstone_retention_hours,
            0,
            87_600,
        )?;
        range("bus.tail_cache_mb", self.bus.tail_cache_mb, 0, 65_536)?;
        range(
            "kafka.max_buffered_records",
            self.kafka.max_buffered_records as u64,
            100,
            10_000_000,
        )?;
        range(
            "kafka.produce_timeout_ms",
            self.kafka.produce_timeout_ms,
            100,
            600_000,
        )?;
        range(
            "store.max_row_cells",
            self.store.max_row_cells as u64,
            1,
            10_000_000,
        )?;
        range(
            "store.repack_after_deltas",
            self.store.repack_after_deltas as u64,
            1,
            1024,
        )?;
        range_or_off(
            "store.row_cache_mb",
            self.store.row_cache_mb,
            8,
            1 << 20,
            "no row cache",
        )?;
        if self.store.families.is_empty() {
            return Err(ConfigError::key(
                "store.families",
                "at least one family is required",
            ));
        }
        for (name, fam) in &self.store.families {
            if name.is_empty()
                || name.len() > 16
                || !name.bytes().all(|b| b.is_ascii_alphanumeric())
            {
                return Err(ConfigError::key(
                    format!("store.families.{name}"),
                    "a family name is 1 to 16 ASCII letters or digits",
                ));
            }
            range(
                &format!("store.families.{name}.max_versions"),
                fam.max_versions as u64,
                1,
                100_000,
            )?;
            range(
                &format!("store.families.{name}.ttl_days"),
                fam.ttl_days,
                0,
                36_500,
            )?;
        }
        self.api
            .listen
            .parse::<std::net::SocketAddr>()
            .map_err(|e| ConfigError::key("api.listen", format!("not a socket address: {e}")))?;
        range(
            "api.max_body_bytes",
            self.api.max_body_bytes as u64,
            1024,
            1 << 30,
        )?;
        range(
            "api.max_batch_events",
            self.api.max_batch_events as u64,
            1,
            1_000_000,
        )?;
        range(
            "api.uid_cookie_max_age_days",
            self.api.uid_cookie_max_age_days,
            1,
            3650,
        )?;
        range(
            "api.ingest_timeout_ms",
            self.api.ingest_timeout_ms,
            10,
            60_000,
        )?;
        if self.api.uid_cookie.is_empty()
            || !self
                .api
                .uid_cookie
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(ConfigError::key(
                "api.uid_cookie",
                "a cookie name is 1 or more of a-z A-Z 0-9 _ -",
            ));
        }
        range("spill.max_bytes", self.spill.max_bytes, 1 << 20, u64::MAX)?;
        range(
            "spill.replay_interval_ms",
            self.spill.replay_interval_ms,
            10,
            600_000,
        )?;
        if self.storage_writer.group.is_empty() {
            return Err(ConfigError::key(
                "storage_writer.group",
                "must not be empty",
            ));
        }
        range(
            "storage_writer.batch_max_events",
            self.storage_writer.batch_max_events as u64,
            1,
            100_000,
        )?;
        match self.storage_writer.ip_mode.as_str() {
            "full" | "truncate" => {}
            "hash" if self.storage_writer.ip_hash_key.len() >= 16 => {}
            "hash" => {
                return Err(ConfigError::key(
                    "storage_writer.ip_hash_key",
                    "ip_mode = \"hash\" needs a key of at least 16 bytes",
                ))
            }
            other => {
                return Err(ConfigError::key(
                    "storage_writer.ip_mode",
                    format!("must be \"full\", \"truncate\" or \"hash\", not {other:?}"),
                ))
            }
        }
        for (i, p) in self.storage_writer.geoip.iter().enumerate() {
            if !p.is_file() {
                return Err(ConfigError::key(
                    format!("storage_writer.geoip[{i}]"),
                    format!("{} is not a readable file", p.display()),
                ));
            }
        }
        if !self.storage_writer.crawler_list.is_empty()
            && !Path::new(&self.storage_writer.crawler_list).is_file()
        {
            return Err(ConfigError::key(
                "storage_writer.crawler_list",
                format!(
                    "{} is not a readable file",
                    self.storage_writer.crawler_list
                ),
            ));
        }
        let sg = &self.segmenter;
        if sg.group.is_empty() {
            return Err(ConfigError::key("segmenter.group", "must not be empty"));
        }
        if !sg.rules.is_empty() && !Path::new(&sg.rules).is_file() {
            return Err(ConfigError::key(
                "segmenter.rules",
                format!("{} is not a readable file", sg.rules),
            ));
        }
        range(
            "segmenter.reload_interval_ms",
            sg.reload_interval_ms,
            100,
            600_000,
        )?;
        range("segmenter.workers", sg.workers as u64, 0, 256)?;
        range("segmenter.worker_nice", sg.worker_nice, 0, 19)?;
        range(
            "segmenter.queue_capacity",
            sg.queue_capacity as u64,
            1,
            1_000_000,
        )?;
        range(
            "segmenter.dedupe_capacity",
            sg.dedupe_capacity as u64,
            1,
            100_000_000,
        )?;
        range("segmenter.coalesce_ms", sg.coalesce_ms, 0, 10_000)?;
        range(
            "segmenter.summaries_per_worker",
            sg.summaries_per_worker as u64,
            0,
            100_000_000,
        )?;
        range(
            "segmenter.blacklist_window_secs",
            sg.blacklist_window_secs,
            1,
            86_400,
        )?;
        range(
            "segmenter.blacklist_max_changes",
            sg.blacklist_max_changes as u64,
            1,
            10_000_000,
        )?;
        range(
            "segmenter.blacklist_ban_secs",
            sg.blacklist_ban_secs,
            1,
            30 * 86_400,
        )?;
        range(
            "segmenter.throttle_after_changes",
            sg.throttle_after_changes as u64,
            0,
            10_000_000,
        )?;
        range(
            "segmenter.throttle_interval_ms",
            sg.throttle_interval_ms,
            1,
            60_000,
        )?;
        range_or_off(
            "segmenter.backfill_age_ms",
            sg.backfill_age_ms,
            1_000,
            30 * 86_400_000,
            "no backfill priority",
        )?;
        range(
            "segmenter.backfill_max_wait_ms",
            sg.backfill_max_wait_ms,
            1,
            600_000,
        )?;
        if sg.backfill_max_wait_ms >= self.api.ready_stuck_secs.saturating_mul(1000) {
            // Held changes hold the committed offsets back; readiness would call that stuck.
            return Err(ConfigError::key(
                "segmenter.backfill_max_wait_ms",
                format!(
                    "{} ms is not below api.ready_stuck_secs ({} s): readiness would report \
                     the segmenter stuck while backfill waits",
                    sg.backfill_max_wait_ms, self.api.ready_stuck_secs
                ),
            ));
        }
        range(
            "segmenter.backfill_max_held",
            sg.backfill_max_held as u64,
            1,
            100_000_000,
        )?;
        range(
            "segmenter.timer_scan_interval_ms",
            sg.timer_scan_interval_ms,
            100,
            60_000,
        )?;
        range(
            "segmenter.timer_scan_max",
            sg.timer_scan_max as u64,
            1,
            1_000_000,
        )?;
        range(
            "segmenter.commit_interval_ms",
            sg.commit_interval_ms,
            10,
            60_000,
        )?;
        range(
            "api.rate_limit_per_second",
            self.api.rate_limit_per_second as u64,
            0,
            10_000_000,
        )?;
        range("api.ready_stuck_secs", self.api.ready_stuck_secs, 1, 86_400)?;
        range(
            "api.deleted_user_suppress_secs",
            self.api.deleted_user_suppress_secs,
            1,
            3650 * 86_400,
        )?;
        range(
            "storage_writer.suppression_reload_ms",
            self.storage_writer.suppression_reload_ms,
            100,
            600_000,
        )?;
        range(
            "api.rate_limit_burst",
            self.api.rate_limit_burst as u64,
            1,
            10_000_000,
        )?;
        for (role, keys) in [
            ("ingest", &self.api.keys.ingest),
            ("lookup", &self.api.keys.lookup),
            ("planner", &self.api.keys.planner),
            ("partner", &self.api.keys.partner),
            ("admin", &self.api.keys.admin),
        ] {
            if let Some(k) = keys
                .iter()
                .find(|k| k.len() < 16 || k.chars().any(char::is_whitespace))
            {
                return Err(ConfigError::key(
                    format!("api.keys.{role}"),
                    format!(
                        "a key of {} characters: keys need at least 16 and no whitespace",
                        k.chars().count()
                    ),
                ));
            }
        }
        let st = &self.stats;
        range("stats.retention_days", st.retention_days as u64, 1, 3650)?;
        if !matches!(st.redis_mode.as_str(), "batched" | "per_user") {
            return Err(ConfigError::key(
                "stats.redis_mode",
                format!(
                    "must be \"batched\" or \"per_user\", not {:?}",
                    st.redis_mode
                ),
            ));
        }
        range(
            "stats.queue_capacity",
            st.queue_capacity as u64,
            1,
            100_000_000,
        )?;
        range(
            "stats.max_keys_per_call",
            st.max_keys_per_call as u64,
            1,
            65_536,
        )?;
        range(
            "stats.max_updates_per_call",
            st.max_updates_per_call as u64,
            1,
            1_000_000,
        )?;
        // Below Redis's busy-reply threshold (5 s by default): a slow call is retried by us
        // before Redis starts answering BUSY to everyone.
        range(
            "stats.response_timeout_ms",
            st.response_timeout_ms,
            10,
            4_000,
        )?;
        range("stats.flush_timeout_ms", st.flush_timeout_ms, 10, 600_000)?;
        range_or_off(
            "stats.theta_lg_k",
            u64::from(st.theta_lg_k),
            8,
            20,
            "no theta sketches",
        )?;
        range_or_off(
            "memory.pretouch_mb",
            self.memory.pretouch_mb,
            PRETOUCH_BLOCK_MB,
            1 << 20,
            "none",
        )?;
        if !matches!(self.telemetry.log_format.as_str(), "text" | "json") {
            return Err(ConfigError::key(
                "telemetry.log_format",
                format!(
                    "must be \"text\" or \"json\", not {:?}",
                    self.telemetry.log_format
                ),
            ));
        }
        Ok(())
    }
}

fn parse_toml(text: &str, origin: &str) -> Result<toml::Table, ConfigError> {
    text.parse::<toml::Table>()
        .map_err(|e| ConfigError::Syntax {
            path: origin.to_string(),
            message: e.to_string(),
        })
}

/// Later layers win; tables merge key by key.
fn merge(base: &mut toml::Table, layer: toml::Table) {
    for (k, v) in layer {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(l)) => merge(b, l),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn set_path(root: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = path.split_last().expect("path is never empty");
    let mut table = root;
    for p in parents {
        let entry = table
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = match entry {
            toml::Value::Table(t) => t,
            _ => return Err(format!("`{p}` is a value, not a section")),
        };
    }
    table.insert(last.clone(), value);
    Ok(())
}

/// An environment value is TOML when it parses as a TOML value (numbers, booleans, arrays),
/// otherwise a plain string.
fn env_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

fn range(key: &str, v: u64, lo: u64, hi: u64) -> Result<(), ConfigError> {
    if v < lo || v > hi {
        return Err(ConfigError::key(key, format!("{v} is outside {lo}..={hi}")));
    }
    Ok(())
}

/// Like [`range`], for a key where 0 turns the thing off (`off` says what 0 means).
fn range_or_off(key: &str, v: u64, lo: u64, hi: u64, off: &str) -> Result<(), ConfigError> {
    if v != 0 && (v < lo || v > hi) {
        return Err(ConfigError::key(
            key,
            format!("{v} is not 0 ({off}) or {lo}..={hi}"),
        ));
    }
    Ok(())
}

fn check_backend(key: &str, url: &str, schemes: &[&str]) -> Result<(), ConfigError> {
    if url == "embedded" {
        return Ok(());
    }
    match url.split_once("://") {
        Some((scheme, rest)) if schemes.contains(&scheme) && !rest.is_empty() => Ok(()),
        _ => Err(ConfigError::key(
            key,
            format!(
                "{url:?} is not \"embedded\" or a URL with scheme {}",
                schemes
                    .iter()
                    .map(|s| format!("{s}://"))
                    .collect::<Vec<_>>()
                    .join(" or ")
            ),
        )),
    }
}

/// Kafka's topic name rule: 1..=249 of `[a-zA-Z0-9._-]`.
pub fn check_topic_name(key: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::key(
            key,
            format!("{name:?} is not a valid topic name (1 to 249 of a-z A-Z 0-9 . _ -)"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn given_no_layers_when_loaded_then_defaults_are_valid() {
        let c = Config::defaults();
        assert_eq!(c.backends.bus, "embedded");
        assert_eq!(c.topics.events, "dmp.events");
        assert_eq!(c.store.families["e"].max_versions, 1000);
        assert_eq!(c.kafka.producer["compression.type"], "zstd");
    }

    #[test]
    fn given_file_and_env_when_loaded_then_env_wins_over_file_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[topics]\npartitions = 4\nevents = \"file.events\"\n[kafka.common]\n\"sasl.username\" = \"u\"\n",
        )
        .unwrap();
        let c = Config::load(
            Some(&path),
            env(&[
                ("DMP__TOPICS__PARTITIONS", "16"),
                ("DMP__BACKENDS__BUS", "kafka://127.0.0.1:9092"),
                ("DMP__STORE__FAMILIES__E__TTL_DAYS", "30"),
                ("DMP__DATA_DIR", "/tmp/x y"),
                ("OTHER", "ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(c.topics.partitions, 16);
        assert_eq!(c.topics.events, "file.events");
        assert_eq!(c.topics.segments, "dmp.segments");
        assert_eq!(c.backends.bus, "kafka://127.0.0.1:9092");
        assert_eq!(c.store.families["e"].ttl_days, 30);
        assert_eq!(c.store.families["e"].max_versions, 1000);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x y"));
        assert_eq!(c.kafka.common["sasl.username"], "u");
    }

    #[test]
    fn given_unknown_key_when_loaded_then_error_names_it() {
        let err = Config::load(None, env(&[("DMP__BUS__RETENTION_HOURZ", "5")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bus"), "{err}");
        assert!(err.contains("retention_hourz"), "{err}");
        let err = Config::load(None, env(&[("DMP__COLOUR", "red")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("colour"), "{err}");
    }

    #[test]
    fn given_out_of_range_or_wrong_type_when_loaded_then_error_names_the_key() {
        let cases = [
            ("DMP__TOPICS__PARTITIONS", "0", "topics.partitions"),
            ("DMP__TOPICS__PARTITIONS", "many", "topics.partitions"),
            ("DMP__BACKENDS__BUS", "rabbitmq://x", "backends.bus"),
            ("DMP__TOPICS__EVENTS", "bad topic!", "topics.events"),
            ("DMP__API__LISTEN", "nowhere", "api.listen"),
            (
                "DMP__STORE__FAMILIES__E__MAX_VERSIONS",
                "0",
                "store.families.e.max_versions",
            ),
            ("DMP__TELEMETRY__LOG_FORMAT", "xml", "telemetry.log_format"),
            ("DMP__MEMORY__PRETOUCH_MB", "16", "memory.pretouch_mb"),
            ("DMP__MEMORY__PRETOUCH_MB", "-1", "memory.pretouch_mb"),
            (
                "DMP__STORAGE_WRITER__IP_MODE",
                "hash",
                "storage_writer.ip_hash_key",
            ),
            (
                "DMP__STORAGE_WRITER__IP_MODE",
                "mask",
                "storage_writer.ip_mode",
            ),
            (
                "DMP__STORAGE_WRITER__GEOIP",
                "[\"/nope.mmdb\"]",
                "storage_writer.geoip[0]",
            ),
            ("DMP__API__MAX_BODY_BYTES", "10", "api.max_body_bytes"),
            ("DMP__STATS__THETA_LG_K", "4", "stats.theta_lg_k"),
            ("DMP__STATS__THETA_LG_K", "21", "stats.theta_lg_k"),
            (
                "DMP__EMBEDDED__BACKGROUND_NICE",
                "20",
                "embedded.background_nice",
            ),
            ("DMP__BUS__TAIL_CACHE_MB", "65537", "bus.tail_cache_mb"),
            ("DMP__SEGMENTER__WORKER_NICE", "20", "segmenter.worker_nice"),
            (
                "DMP__SEGMENTER__COALESCE_MS",
                "60000",
                "segmenter.coalesce_ms",
            ),
            (
                "DMP__SEGMENTER__SUMMARIES_PER_WORKER",
                "100000001",
                "segmenter.summaries_per_worker",
            ),
            (
                "DMP__SEGMENTER__THROTTLE_INTERVAL_MS",
                "0",
                "segmenter.throttle_interval_ms",
            ),
            (
                "DMP__SEGMENTER__BACKFILL_AGE_MS",
                "999",
                "segmenter.backfill_age_ms",
            ),
            (
                "DMP__SEGMENTER__BACKFILL_MAX_WAIT_MS",
                "0",
                "segmenter.backfill_max_wait_ms",
            ),
            (
                "DMP__SEGMENTER__BACKFILL_MAX_WAIT_MS",
                "120000",
                "segmenter.backfill_max_wait_ms",
            ),
            (
                "DMP__SEGMENTER__BACKFILL_MAX_HELD",
                "0",
                "segmenter.backfill_max_held",
            ),
        ];
        for (k, v, key) in cases {
            let err = Config::load(None, env(&[(k, v)])).unwrap_err().to_string();
            assert!(err.contains(key), "{k}={v}: {err}");
        }
    }

    #[test]
    fn given_bad_toml_file_when_loaded_then_error_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "[topics\n").unwrap();
        let err = Config::load(Some(&path), env(&[])).unwrap_err().to_string();
        assert!(err.contains("bad.toml"), "{err}");
        let err = Config::load(Some(&dir.path().join("missing.toml")), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.toml"), "{err}");
    }
}
