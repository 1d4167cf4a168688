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
//! - The batched script turns keys that get many users dense early (see [`BATCHED_SCRIPT`]):
//!   Redis's sparse encoding costs a scan per added element, most of Redis's time when every key
//!   of a new day is small.
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

/// The Lua that makes key `k` dense early when it gets `n` users in this call: see
/// [`BATCHED_SCRIPT`].
macro_rules! make_dense_lua {
    () => {
        r#"
  if n >= 16 then
    local enc = redis.call('GETRANGE', KEYS[k], 4, 4)
    if enc == '' then
      if dense == nil then dense = 'HYLL' .. string.rep('\0', 12300) end
      redis.call('SET', KEYS[k], dense)
    elseif enc == '\1' and redis.call('STRLEN', KEYS[k]) > 300 then
      if dense == nil then dense = 'HYLL' .. string.rep('\0', 12300) end
      redis.call('SET', 'dmp:hll:dense-empty', dense)
      redis.call('PFMERGE', KEYS[k], 'dmp:hll:dense-empty')
      redis.call('DEL', 'dmp:hll:dense-empty')
    end
  end
"#
    };
}

/// The batched script. KEYS: the distinct keys of the call. ARGV[1..#KEYS]: the EXPIREAT time of
/// each key (0: none); then pairs (uid, its keys), the keys as 2-byte big-endian indexes into KEYS
/// (0-based), so a user costs two arguments whatever its segment count. Updates are grouped by key
/// inside the script, and each key gets one PFADD (in slices of 4000, under Lua's unpack limit).
///
/// Keys that get at least 16 users in one call are made dense early: created as an empty dense
/// HyperLogLog (`HYLL`, encoding 0, a valid cached count of 0, 12288 zero bytes of registers)
/// when new, or merged into one (PFMERGE writes dense when a source is dense) once their sparse
/// bytes pass 300. PFADD would keep them sparse up to `hll-sparse-max-bytes` (3000), and a
/// sparse sketch costs Redis a scan of its bytes per added element: most of Redis's time at the
/// start of each day, when every key is new. The registers, and so the counts, are the same; a
/// key of a few hundred users takes 12 KiB instead of a few hundred bytes.
pub const BATCHED_SCRIPT: &str = concat!(
    r#"
local nkeys = #KEYS
local groups, counts = {}, {}
local byte = string.byte
for i = nkeys + 1, #ARGV, 2 do
  local uid = ARGV[i]
  local ks = ARGV[i + 1]
  for j = 1, #ks, 2 do
    local hi, lo = byte(ks, j, j + 1)
    local k = hi * 256 + lo + 1
    local n = counts[k]
    if n == nil then
      groups[k] = {uid}; counts[k] = 1
    else
      n = n + 1; counts[k] = n; groups[k][n] = uid
    end
  end
end
local changed = 0
local dense = nil
for k, uids in pairs(groups) do
  local n = counts[k]
"#,
    make_dense_lua!(),
    r#"
  for s = 1, n, 4000 do
    changed = changed + redis.call('PFADD', KEYS[k], unpack(uids, s, math.min(s + 3999, n)))
  end
  local at = tonumber(ARGV[k])
  if at > 0 then redis.call('EXPIREAT', KEYS[k], at) end
end
return changed
"#
);

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

/// One user's memberships of one day (segments as interned ids, [`ALL`] included).
struct Update {
    day: u32,
    uid: Box<str>,
    segments: Vec<u32>,
}

/// Segment names <-> small ids, shared by the recording threads and the writer: a user's update
/// then carries numbers, not strings.
#[derive(Default)]
struct Names {
    ids: std::collections::HashMap<Box<str>, u32, foldhash::fast::RandomState>,
    names: Vec<Arc<str>>,
}

type SharedNames = Arc<parking_lot::RwLock<Names>>;

fn intern(names: &SharedNames, segment: &str) -> u32 {
    if let Some(id) = names.read().ids.get(segment) {
        return *id;
    }
    let mut w = names.write();
    if let Some(id) = w.ids.get(segment) {
        return *id;
    }
    let id = w.names.len() as u32;
    w.names.push(segment.into());
    w.ids.insert(segment.into(), id);
    id
}

struct Shared {
    names: SharedNames,
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
            names: SharedNames::default(),
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
            closed: false,
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
        let names = &self.shared.names;
        let update = Update {
            day,
            uid: uid.into(),
            segments: segments
                .iter()
                .chain(std::iter::once(&ALL))
                .map(|s| intern(names, s))
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

    /// One MGET for all the days.
    fn range_sketch(&self, segment: &str, days: &[u32]) -> Result<Option<Hll>, StatsError> {
        if days.is_empty() {
            return Ok(None);
        }
        let keys: Vec<String> = days.iter().map(|d| key(segment, *d)).collect();
        let values: Vec<Option<Vec<u8>>> = self.read(|c| redis::cmd("MGET").arg(&keys).query(c))?;
        let mut out: Option<Hll> = None;
        for (k, v) in keys.iter().zip(values) {
            let Some(bytes) = v else { continue };
            let h = RedisHll::from_bytes(&bytes)
                .map_err(|e| StatsError::Corrupt(format!("{k}: {e}")))?;
            match &mut out {
                Some(o) => h.max_into_hll(o),
                None => out = Some(h.to_hll()),
            }
        }
        Ok(out)
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

/// Calls in flight at most (batched mode).
const PIPELINE_DEPTH: usize = 2;

/// Users taken from the queue for one call.
struct Batch {
    users: Vec<Update>,
    updates: usize,
}

/// When a day's key expires (0: never).
fn expire_at(opts: &RedisOptions, day: u32) -> i64 {
    if opts.retention_days == 0 {
        return 0;
    }
    epoch_ms_of(day) / 1000 + (opts.retention_days as i64 + 1) * 86_400
}

/// The batched script's call for these users.
fn build_batched(
    script: &redis::Script,
    names: &SharedNames,
    opts: &RedisOptions,
    users: &[Update],
) -> redis::Cmd {
    let names = names.read();
    let mut index: std::collections::HashMap<(u32, u32), u16, foldhash::fast::RandomState> =
        Default::default();
    let mut keys: Vec<String> = Vec::new();
    let mut expire: Vec<i64> = Vec::new();
    let mut per_user: Vec<u8> = Vec::with_capacity(users.len() * 16);
    let mut ends = Vec::with_capacity(users.len());
    for u in users {
        for s in &u.segments {
            let i = *index.entry((u.day, *s)).or_insert_with(|| {
                keys.push(key(&names.names[*s as usize], u.day));
                expire.push(expire_at(opts, u.day));
                (keys.len() - 1) as u16
            });
            per_user.extend_from_slice(&i.to_be_bytes());
        }
        ends.push(per_user.len());
    }
    drop(names);
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(keys.len()).arg(&keys);
    cmd.arg(&expire);
    let mut from = 0;
    for (u, end) in users.iter().zip(ends) {
        cmd.arg(u.uid.as_ref()).arg(&per_user[from..end]);
        from = end;
    }
    cmd
}

struct Writer {
    rx: Receiver<Update>,
    con: Option<redis::Connection>,
    client: redis::Client,
    opts: RedisOptions,
    shared: Arc<Shared>,
    batched: redis::Script,
    per_user: redis::Script,
    /// The queue is closed (the counters are being dropped).
    closed: bool,
}

impl Writer {
    /// The next call's users: blocks for the first one only when `block` (None: nothing
    /// queued, or the queue is closed and empty).
    fn take(&mut self, carry: &mut Option<Update>, block: bool) -> Option<Batch> {
        let first = match carry.take() {
            Some(u) => u,
            None if block => match self.rx.recv_timeout(Duration::from_millis(100)) {
                Ok(u) => u,
                Err(RecvTimeoutError::Timeout) => return None,
                Err(RecvTimeoutError::Disconnected) => {
                    self.closed = true;
                    return None;
                }
            },
            None => self.rx.try_recv().ok()?,
        };
        // Users until a bound is reached.
        let mut users = vec![first];
        let mut updates = users[0].segments.len();
        let mut keys: std::collections::HashSet<(u32, u32), foldhash::fast::RandomState> = users[0]
            .segments
            .iter()
            .map(|s| (users[0].day, *s))
            .collect();
        while updates < self.opts.max_updates_per_call {
            let Ok(u) = self.rx.try_recv() else { break };
            let new_keys = u
                .segments
                .iter()
                .filter(|s| !keys.contains(&(u.day, **s)))
                .count();
            if keys.len() + new_keys > self.opts.max_keys_per_call
                || updates + u.segments.len() > self.opts.max_updates_per_call
            {
                *carry = Some(u);
                break;
            }
            updates += u.segments.len();
            keys.extend(u.segments.iter().map(|s| (u.day, *s)));
            users.push(u);
        }
        metrics::gauge!(metric::QUEUE).decrement(users.len() as f64);
        Some(Batch { users, updates })
    }

    fn done(&self, b: &Batch) {
        self.shared
            .written
            .fetch_add(b.users.len() as u64, Ordering::AcqRel);
        metrics::counter!(metric::UPDATES, "backend" => "redis").increment(b.updates as u64);
    }

    fn run(mut self) {
        let mut carry: Option<Update> = None;
        // Batched calls are pipelined: the next call is encoded and sent while Redis runs the
        // previous one. Replies come back in order, so `written` advances in queue order.
        let mut inflight: std::collections::VecDeque<(Batch, Instant)> =
            std::collections::VecDeque::new();
        loop {
            while inflight.len() < PIPELINE_DEPTH {
                let Some(b) = self.take(&mut carry, inflight.is_empty()) else {
                    break;
                };
                if self.opts.mode == Mode::PerUser {
                    // The per-user calls of a batch go out as one pipeline, synchronously.
                    if !self.send_with_retry(&b.users, b.updates) {
                        return;
                    }
                    self.done(&b);
                    continue;
                }
                let cmd = self.build_call(&b.users);
                let sent = self
                    .connected()
                    .and_then(|con| con.send_packed_command(&cmd.get_packed_command()));
                inflight.push_back((b, Instant::now()));
                if sent.is_err() {
                    break; // the reply read below fails too and takes the slow path
                }
            }
            let Some((_, started)) = inflight.front() else {
                if self.closed {
                    return;
                }
                continue;
            };
            let started = *started;
            let reply = self
                .connected()
                .and_then(|con| con.recv_response())
                .and_then(|v| v.extract_error());
            match reply {
                Ok(_) => {
                    metrics::counter!(metric::CALLS, "outcome" => "ok").increment(1);
                    metrics::histogram!(metric::CALL_TIME).record(started.elapsed().as_secs_f64());
                    let (b, _) = inflight.pop_front().expect("checked above");
                    self.done(&b);
                }
                Err(e) => {
                    // Anything unexpected (a lost connection, NOSCRIPT after a restart or SCRIPT
                    // FLUSH): a fresh connection loads the scripts, and every call in flight is
                    // sent again, one by one, until it works. PFADD is idempotent.
                    metrics::counter!(metric::CALLS, "outcome" => "error").increment(1);
                    tracing::warn!(error = %e, "a counter call failed; resending the calls in flight");
                    *self.shared.last_error.lock() = Some(e.to_string());
                    self.con = None;
                    while let Some((b, _)) = inflight.pop_front() {
                        if !self.send_with_retry(&b.users, b.updates) {
                            return;
                        }
                        self.done(&b);
                    }
                }
            }
        }
    }

    fn connected(&mut self) -> redis::RedisResult<&mut redis::Connection> {
        if self.con.is_none() {
            let mut con = connect(&self.client, self.opts.response_timeout)?;
            load_scripts(&mut con)?;
            self.con = Some(con);
        }
        Ok(self.con.as_mut().expect("connected above"))
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

    fn send(&mut self, users: &[Update]) -> redis::RedisResult<()> {
        self.connected()?;
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

    /// The batched script's call for these users.
    fn build_call(&self, users: &[Update]) -> redis::Cmd {
        build_batched(&self.batched, &self.shared.names, &self.opts, users)
    }

    fn send_batched(&mut self, users: &[Update]) -> redis::RedisResult<()> {
        let cmd = self.build_call(users);
        let _: i64 = cmd.query(self.connected()?)?;
        Ok(())
    }

    fn send_per_user(&mut self, users: &[Update]) -> redis::RedisResult<()> {
        let names = self.shared.names.read().names.clone();
        let mut pipe = redis::pipe();
        for u in users {
            let at = expire_at(&self.opts, u.day);
            let cmd = pipe
                .cmd("EVALSHA")
                .arg(self.per_user.get_hash())
                .arg(u.segments.len());
            for s in &u.segments {
                cmd.arg(key(&names[*s as usize], u.day));
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
