//! Segment counters in Redis: one HyperLogLog per (segment, day) under
//! `dmp:hll:<segment>:<yyyymmdd>`, updated through a Lua script.
//!
//! - [`SegmentCounters::record`] only queues the user (bounded by `stats.queue_capacity`); a
//!   writer thread sends the queue in script calls bounded by `max_keys_per_call` and
//!   `max_updates_per_call`. When Redis is down the segmenter keeps going: calls are retried with
//!   backoff (PFADD is idempotent, so a retried call never double counts), the queue fills, and
//!   updates beyond it are dropped and counted (`dmp_stats_updates_dropped_total`).
//! - Two scripts, both loaded at start and reloaded when Redis answers NOSCRIPT (after a restart
//!   or `SCRIPT FLUSH`): `batched` carries many users in one call and groups the updates by key
//!   inside the script (one PFADD per key); `per_user` is FACETz's design, one call per user
//!   with that user's keys (calls are pipelined).
//! - Keys expire at the end of their day plus `retention_days` (`EXPIREAT`).
//! - [`SegmentCounters::flush`] waits until everything queued before it is in Redis (or fails
//!   after `flush_timeout_ms`, so the segmenter defers its offset commit).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::counters::{epoch_ms_of, SegmentCounters, StatsError, ALL};
use crate::hll::Hll;
use crate::redis_format::RedisHll;

/// Key prefix of the counters.
pub const PREFIX: &str = "dmp:hll:";

/// The batched script. KEYS: the distinct keys of the call. ARGV[1..#KEYS]: the EXPIREAT time of
/// each key (0: none); then pairs (key index, uid). Updates are grouped by key, and each key gets
/// one PFADD (in slices of 4000 to stay under Lua's unpack limit).
pub const BATCHED_SCRIPT: &str = r#"
local nkeys = #KEYS
local groups = {}
for i = nkeys + 1, #ARGV, 2 do
  local k = tonumber(ARGV[i])
  local g = groups[k]
  if g == nil then g = {}; groups[k] = g end
  g[#g + 1] = ARGV[i + 1]
end
local changed = 0
for k, uids in pairs(groups) do
  for s = 1, #uids, 4000 do
    changed = changed + redis.call('PFADD', KEYS[k], unpack(uids, s, math.min(s + 3999, #uids)))
  end
  local at = tonumber(ARGV[k])
  if at > 0 then redis.call('EXPIREAT', KEYS[k], at) end
end
return changed
"#;

/// The per-user script. KEYS: the user's keys. ARGV[1]: the user; ARGV[2..]: the EXPIREAT time of
/// each key (0: none).
pub const PER_USER_SCRIPT: &str = r#"
local changed = 0
for i = 1, #KEYS do
  changed = changed + redis.call('PFADD', KEYS[i], ARGV[1])
  local at = tonumber(ARGV[i + 1])
  if at > 0 then redis.call('EXPIREAT', KEYS[i], at) end
end
return changed
"#;

/// The counter key of a segment on a day.
pub fn key(segment: &str, day: u32) -> String {
    format!("{PREFIX}{segment}:{day}")
}

/// How updates are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Many users per script call, grouped by key inside the script.
    Batched,
    /// One script call per user (pipelined).
    PerUser,
}

/// Settings of the Redis counters.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// `redis://host:port[/db]`.
    pub url: String,
    /// Batched or per-user calls.
    pub mode: Mode,
    /// Days a key lives after its day (0: no expiry).
    pub retention_days: u32,
    /// Users queued at most.
    pub queue_capacity: usize,
    /// Distinct keys per call at most.
    pub max_keys_per_call: usize,
    /// (key, user) updates per call at most.
    pub max_updates_per_call: usize,
    /// Reply timeout.
    pub response_timeout: Duration,
    /// How long `flush` waits.
    pub flush_timeout: Duration,
}

impl RedisOptions {
    /// From the `[stats]` section and the backend URL.
    pub fn from_config(url: &str, cfg: &dmp_core::config::StatsConfig) -> RedisOptions {
        RedisOptions {
            url: url.to_string(),
            mode: if cfg.redis_mode == "per_user" {
                Mode::PerUser
            } else {
                Mode::Batched
            },
            retention_days: cfg.retention_days,
            queue_capacity: cfg.queue_capacity,
            max_keys_per_call: cfg.max_keys_per_call,
            max_updates_per_call: cfg.max_updates_per_call,
            response_timeout: Duration::from_millis(cfg.response_timeout_ms),
            flush_timeout: Duration::from_millis(cfg.flush_timeout_ms),
        }
    }
}

mod metric {
    pub const UPDATES: &str = "dmp_stats_updates_total";
    pub const DROPPED: &str = "dmp_stats_updates_dropped_total";
    pub const CALLS: &str = "dmp_stats_redis_calls_total";
    pub const CALL_TIME: &str = "dmp_stats_redis_call_duration_seconds";
    pub const SCRIPT_LOADS: &str = "dmp_stats_redis_script_loads_total";
    pub const QUEUE: &str = "dmp_stats_queue_users";
}

/// One user's memberships of one day.
struct Update {
    day: u32,
    uid: Box<str>,
    segments: Vec<Box<str>>,
}

struct Shared {
    /// Users queued so far, and users written so far (in queue order).
    queued: AtomicU64,
    written: AtomicU64,
    last_error: Mutex<Option<String>>,
    stop: AtomicBool,
}

/// Counters in Redis.
pub struct RedisCounters {
    tx: Option<SyncSender<Update>>,
    shared: Arc<Shared>,
    reader: Mutex<Option<redis::Connection>>,
    client: redis::Client,
    opts: RedisOptions,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn redis_err(e: redis::RedisError) -> StatsError {
    StatsError::Redis(e.to_string())
}

fn connect(client: &redis::Client, timeout: Duration) -> redis::RedisResult<redis::Connection> {
    let con = client.get_connection_with_timeout(timeout)?;
    con.set_read_timeout(Some(timeout))?;
    con.set_write_timeout(Some(timeout))?;
    Ok(con)
}

impl RedisCounters {
    /// Connects (failing fast when Redis cannot be reached at start), loads the scripts and starts
    /// the writer thread.
    pub fn open(opts: RedisOptions) -> Result<RedisCounters, StatsError> {
        let client = redis::Client::open(opts.url.as_str()).map_err(redis_err)?;
        let mut con = connect(&client, opts.response_timeout).map_err(redis_err)?;
        load_scripts(&mut con).map_err(redis_err)?;
        let (tx, rx) = sync_channel(opts.queue_capacity);
        let shared = Arc::new(Shared {
            queued: AtomicU64::new(0),
            written: AtomicU64::new(0),
            last_error: Mutex::new(None),
            stop: AtomicBool::new(false),
        });
        let writer = Writer {
            rx,
            con: Some(con),
            client: client.clone(),
            opts: opts.clone(),
            shared: shared.clone(),
            batched: redis::Script::new(BATCHED_SCRIPT),
            per_user: redis::Script::new(PER_USER_SCRIPT),
        };
        let thread = std::thread::Builder::new()
            .name("dmp-stats-redis".into())
            .spawn(move || writer.run())
            .map_err(|e| StatsError::Redis(format!("starting the writer thread: {e}")))?;
        Ok(RedisCounters {
            tx: Some(tx),
            shared,
            reader: Mutex::new(None),
            client,
            opts,
            thread: Some(thread),
        })
    }

    /// Runs `f` on the reader connection, reconnecting once if it broke.
    fn read<T>(
        &self,
        f: impl Fn(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, StatsError> {
        let mut guard = self.reader.lock();
        for attempt in 0..2 {
            if guard.is_none() {
                *guard =
                    Some(connect(&self.client, self.opts.response_timeout).map_err(redis_err)?);
            }
            match f(guard.as_mut().expect("connected above")) {
                Ok(v) => return Ok(v),
                Err(e) if attempt == 0 && (e.is_io_error() || e.is_connection_dropped()) => {
                    *guard = None;
                }
                Err(e) => return Err(redis_err(e)),
            }
        }
        unreachable!("the loop returns")
    }
}

impl SegmentCounters for RedisCounters {
    fn record(&self, day: u32, uid: &str, segments: &[&str]) {
        let n = segments.len() as u64 + 1;
        let update = Update {
            day,
            uid: uid.into(),
            segments: segments
                .iter()
                .map(|s| Box::from(*s))
                .chain(std::iter::once(Box::from(ALL)))
                .collect(),
        };
        let Some(tx) = &self.tx else { return };
        match tx.try_send(update) {
            Ok(()) => {
                // Counted before the caller goes on: a flush that follows waits for this user.
                self.shared.queued.fetch_add(1, Ordering::AcqRel);
                metrics::gauge!(metric::QUEUE).increment(1.0);
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                metrics::counter!(metric::DROPPED).increment(n);
            }
        }
    }

    fn sketch(&self, segment: &str, day: u32) -> Result<Option<Hll>, StatsError> {
        let k = key(segment, day);
        let bytes: Option<Vec<u8>> = self.read(|c| redis::cmd("GET").arg(&k).query(c))?;
        match bytes {
            None => Ok(None),
            Some(b) => RedisHll::from_bytes(&b)
                .map(|h| Some(h.to_hll()))
                .map_err(|e| StatsError::Corrupt(format!("{k}: {e}"))),
        }
    }

    fn count(&self, segment: &str, day: u32) -> Result<u64, StatsError> {
        let k = key(segment, day);
        self.read(|c| redis::cmd("PFCOUNT").arg(&k).query(c))
    }

    fn segments(&self) -> Result<Vec<(String, u32)>, StatsError> {
        let keys: Vec<String> = self.read(|c| {
            let mut out = Vec::new();
            let mut cursor: u64 = 0;
            loop {
                let (next, page): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(format!("{PREFIX}*"))
                    .arg("COUNT")
                    .arg(1000)
                    .query(c)?;
                out.extend(page);
                if next == 0 {
                    return Ok(out);
                }
                cursor = next;
            }
        })?;
        let mut out: Vec<(String, u32)> = keys
            .iter()
            .filter_map(|k| {
                let rest = k.strip_prefix(PREFIX)?;
                let (seg, day) = rest.rsplit_once(':')?;
                Some((seg.to_string(), day.parse().ok()?))
            })
            .collect();
        out.sort();
        Ok(out)
    }

    fn flush(&self) -> Result<(), StatsError> {
        let target = self.shared.queued.load(Ordering::Acquire);
        let deadline = Instant::now() + self.opts.flush_timeout;
        while self.shared.written.load(Ordering::Acquire) < target {
            if Instant::now() >= deadline {
                let pending = target - self.shared.written.load(Ordering::Acquire);
                let why = self
                    .shared
                    .last_error
                    .lock()
                    .clone()
                    .unwrap_or_else(|| "slow".into());
                return Err(StatsError::Redis(format!(
                    "{pending} users not yet counted after {} ms ({why})",
                    self.opts.flush_timeout.as_millis()
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    fn backend_name(&self) -> &'static str {
        "redis"
    }
}

impl Drop for RedisCounters {
    fn drop(&mut self) {
        // Give queued updates up to flush_timeout, then stop retrying.
        let _ = self.flush();
        self.shared.stop.store(true, Ordering::Release);
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn load_scripts(con: &mut redis::Connection) -> redis::RedisResult<()> {
    for s in [BATCHED_SCRIPT, PER_USER_SCRIPT] {
        let _: String = redis::cmd("SCRIPT").arg("LOAD").arg(s).query(con)?;
    }
    metrics::counter!(metric::SCRIPT_LOADS).increment(1);
    Ok(())
}

struct Writer {
    rx: Receiver<Update>,
    con: Option<redis::Connection>,
    client: redis::Client,
    opts: RedisOptions,
    shared: Arc<Shared>,
    batched: redis::Script,
    per_user: redis::Script,
}

impl Writer {
    fn run(mut self) {
        let mut carry: Option<Update> = None;
        loop {
            let first = match carry.take() {
                Some(u) => u,
                None => match self.rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(u) => u,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                },
            };
            // A call: users until a bound is reached.
            let mut users = vec![first];
            let mut updates = users[0].segments.len();
            let mut keys: std::collections::HashSet<(u32, Box<str>)> = users[0]
                .segments
                .iter()
                .map(|s| (users[0].day, s.clone()))
                .collect();
            while updates < self.opts.max_updates_per_call {
                let Ok(u) = self.rx.try_recv() else { break };
                let new_keys = u
                    .segments
                    .iter()
                    .filter(|s| !keys.contains(&(u.day, (*s).clone())))
                    .count();
                if keys.len() + new_keys > self.opts.max_keys_per_call
                    || updates + u.segments.len() > self.opts.max_updates_per_call
                {
                    carry = Some(u);
                    break;
                }
                updates += u.segments.len();
                keys.extend(u.segments.iter().map(|s| (u.day, s.clone())));
                users.push(u);
            }
            metrics::gauge!(metric::QUEUE).decrement(users.len() as f64);
            if !self.send_with_retry(&users, updates) {
                return; // stopping while Redis is unreachable
            }
            self.shared
                .written
                .fetch_add(users.len() as u64, Ordering::AcqRel);
            metrics::counter!(metric::UPDATES, "backend" => "redis").increment(updates as u64);
        }
    }

    /// Sends until it worked (true) or the counters are being dropped (false).
    fn send_with_retry(&mut self, users: &[Update], updates: usize) -> bool {
        let mut backoff = Duration::from_millis(50);
        loop {
            let started = Instant::now();
            match self.send(users) {
                Ok(()) => {
                    metrics::counter!(metric::CALLS, "outcome" => "ok").increment(1);
                    metrics::histogram!(metric::CALL_TIME).record(started.elapsed().as_secs_f64());
                    *self.shared.last_error.lock() = None;
                    return true;
                }
                Err(e) => {
                    metrics::counter!(metric::CALLS, "outcome" => "error").increment(1);
                    tracing::warn!(error = %e, users = users.len(), updates, "counting in redis failed; retrying");
                    *self.shared.last_error.lock() = Some(e.to_string());
                    if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
                        self.con = None;
                    }
                    if self.shared.stop.load(Ordering::Acquire) {
                        return false;
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    fn expire_at(&self, day: u32) -> i64 {
        if self.opts.retention_days == 0 {
            return 0;
        }
        epoch_ms_of(day) / 1000 + (self.opts.retention_days as i64 + 1) * 86_400
    }

    fn send(&mut self, users: &[Update]) -> redis::RedisResult<()> {
        if self.con.is_none() {
            let mut con = connect(&self.client, self.opts.response_timeout)?;
            load_scripts(&mut con)?;
            self.con = Some(con);
        }
        let result = match self.opts.mode {
            Mode::Batched => self.send_batched(users),
            Mode::PerUser => self.send_per_user(users),
        };
        match result {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                // Redis restarted or SCRIPT FLUSH: load again and resend (PFADD is idempotent).
                tracing::info!("redis lost the counter scripts; loading them again");
                load_scripts(self.con.as_mut().expect("connected above"))?;
                match self.opts.mode {
                    Mode::Batched => self.send_batched(users),
                    Mode::PerUser => self.send_per_user(users),
                }
            }
            r => r,
        }
    }

    fn send_batched(&mut self, users: &[Update]) -> redis::RedisResult<()> {
        let mut index: std::collections::HashMap<(u32, &str), usize> =
            std::collections::HashMap::new();
        let mut keys: Vec<String> = Vec::new();
        let mut expire: Vec<i64> = Vec::new();
        let mut pairs: Vec<(usize, &str)> = Vec::new();
        for u in users {
            for s in &u.segments {
                let i = *index.entry((u.day, s.as_ref())).or_insert_with(|| {
                    keys.push(key(s, u.day));
                    expire.push(self.expire_at(u.day));
                    keys.len()
                });
                pairs.push((i, &u.uid));
            }
        }
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.batched.get_hash()).arg(keys.len()).arg(&keys);
        cmd.arg(&expire);
        for (i, uid) in pairs {
            cmd.arg(i).arg(uid);
        }
        let _: i64 = cmd.query(self.con.as_mut().expect("connected"))?;
        Ok(())
    }

    fn send_per_user(&mut self, users: &[Update]) -> redis::RedisResult<()> {
        let mut pipe = redis::pipe();
        for u in users {
            let at = self.expire_at(u.day);
            let cmd = pipe
                .cmd("EVALSHA")
                .arg(self.per_user.get_hash())
                .arg(u.segments.len());
            for s in &u.segments {
                cmd.arg(key(s, u.day));
            }
            cmd.arg(u.uid.as_ref());
            for _ in &u.segments {
                cmd.arg(at);
            }
        }
        let _: Vec<i64> = pipe.query(self.con.as_mut().expect("connected"))?;
        Ok(())
    }
}
