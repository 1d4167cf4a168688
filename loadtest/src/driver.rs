//! Open-loop drivers: events are due on a schedule that does not wait for dmp, each stamped with
//! the time it was due, so a slow dmp shows as latency and backlog instead of hiding behind a
//! slower sender (no coordinated omission).
//!
//! Every tick the driver starts as many sessions as the rate asks for (a session's later pages
//! are due seconds later; sessions that began in the 90 s before the start are generated first,
//! so the rate is steady from the first second), sends the events that are due, and every `partner_every_seconds`
//! sends a partner dump in one burst. Events go, in batches of at most `batch_max`, with at most
//! `connections` batches in flight:
//! - `http`: `POST /v1/events` as NDJSON;
//! - `bus`: produced to `topics.events` on Kafka, as dmp's ingest would;
//! - `files`: one NDJSON file per batch, handed to `dmp import`.
//!
//! A batch that fails is retried until dmp takes it (events are idempotent in the store). Only
//! acknowledged events reach the [`Oracle`].
//!
//! With `prerender` the same schedule is ticked through before the clock starts, in the drive's
//! own time, and every batch is made then (NDJSON bodies included); while the traffic runs the
//! driver sends the batches of each tick, their times moved to the clock (written over in place).
//! The loadtest shares the machine with dmp, and making the traffic was half of its CPU.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::generator::{Event, Generator};
use crate::measure::{DumpArrivals, Percentiles};
use crate::oracle::Oracle;
use crate::scenario::{Driver, Traffic};

/// Where events go.
#[derive(Clone)]
pub enum Target {
    /// dmp's HTTP API at this base URL.
    Http(String),
    /// A Kafka bus and the events topic.
    Bus(Arc<dyn dmp_bus::Bus>, String),
    /// `dmp import` of files written under this directory, into the API at this base URL.
    Files {
        /// The dmp binary.
        dmp: PathBuf,
        /// Where the files go.
        dir: PathBuf,
        /// The API's base URL.
        api: String,
    },
}

/// Shared counters the sampler reads while the driver runs.
#[derive(Debug, Default)]
pub struct Progress {
    /// Events made due.
    pub offered: AtomicU64,
    /// Events acknowledged.
    pub acked: AtomicU64,
    /// Batches that failed and were sent again.
    pub retries: AtomicU64,
}

/// What one drive did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Driven {
    /// Events made due.
    pub offered: u64,
    /// Events acknowledged.
    pub acked: u64,
    /// Batches sent again after a failure.
    pub retries: u64,
    /// Seconds from the first due event to the last acknowledgement.
    pub seconds: f64,
    /// Acknowledgement latency from the time each batch's first event was due, ms.
    pub ack_latency_ms: Percentiles,
}

/// Everything a drive needs.
pub struct Drive<'a> {
    /// Where events go.
    pub target: Target,
    /// The traffic generator.
    pub gen: &'a mut Generator,
    /// The ground truth, fed with acknowledged events.
    pub oracle: Arc<Mutex<Oracle>>,
    /// Partner dump arrival times per uid.
    pub dumps: DumpArrivals,
    /// Counters for the sampler.
    pub progress: Arc<Progress>,
    /// The scenario's traffic.
    pub traffic: &'a Traffic,
    /// The scenario's driver settings.
    pub driver: &'a Driver,
}

struct Batch {
    events: Vec<Event>,
    /// The uid of each event, where the target or a dump needs them (empty otherwise).
    uids: Vec<String>,
    /// NDJSON; shared, not copied, by each attempt to send it.
    body: bytes::Bytes,
    due_ms: i64,
    dump: bool,
}

/// A batch as made, before it is sent: its times can still be moved.
struct Made {
    events: Vec<Event>,
    uids: Vec<String>,
    body: Vec<u8>,
    /// Where in `body` the digits of each event's time are.
    ts_at: Vec<std::ops::Range<usize>>,
    dump: bool,
}

impl Made {
    /// The batch to send, every time in it moved by `by` ms: the times' digits are written over
    /// in place (a time in ms keeps its 13 digits from 2001 to 2286); a time whose digits would
    /// not fit is made again with the rest of the batch.
    fn shifted(mut self, by: i64, gen: &Generator) -> Batch {
        if by != 0 {
            let mut fits = true;
            for (e, at) in self.events.iter_mut().zip(&self.ts_at) {
                e.ts += by;
                let mut num = itoa::Buffer::new();
                let digits = num.format(e.ts).as_bytes();
                if digits.len() == at.len() {
                    self.body[at.clone()].copy_from_slice(digits);
                } else {
                    fits = false;
                }
            }
            if !fits {
                self.body.clear();
                for e in &self.events {
                    gen.write_ndjson(e, &mut self.body);
                }
            }
        }
        Batch {
            due_ms: self.events.iter().map(|e| e.ts).min().unwrap_or(0),
            events: self.events,
            uids: self.uids,
            body: bytes::Bytes::from(self.body),
            dump: self.dump,
        }
    }
}

async fn send(target: &Target, batch: &Batch, seq: u64) -> anyhow::Result<()> {
    match target {
        Target::Http(base) => {
            let r = client()
                .post(format!("{base}/v1/events"))
                .header("content-type", "application/x-ndjson")
                .body(batch.body.clone())
                .send()
                .await?;
            if !r.status().is_success() {
                anyhow::bail!("ingest answered {}", r.status());
            }
            Ok(())
        }
        Target::Bus(bus, topic) => {
            let now = dmp_core::clock::now_ms();
            let records: Vec<dmp_bus::ProduceRecord> = batch
                .body
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .zip(&batch.uids)
                .map(|(line, uid)| dmp_bus::ProduceRecord {
                    key: uid.as_bytes().to_vec(),
                    value: line.to_vec(),
                    timestamp: Some(now),
                })
                .collect();
            bus.produce(topic, records).await?;
            Ok(())
        }
        Target::Files { dmp, dir, api } => {
            let path = dir.join(format!("batch-{seq}.ndjson"));
            tokio::fs::write(&path, &batch.body).await?;
            let out = tokio::process::Command::new(dmp)
                .arg("import")
                .arg("--source")
                .arg("loadtest")
                .arg("--api")
                .arg(api)
                .arg(&path)
                .stdout(std::process::Stdio::null())
                .output()
                .await?;
            if !out.status.success() {
                anyhow::bail!(
                    "dmp import failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            let _ = tokio::fs::remove_file(&path).await;
            Ok(())
        }
    }
}

fn client() -> reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT
        .get_or_init(|| {
            reqwest::Client::builder()
                .pool_max_idle_per_host(64)
                .build()
                .expect("an HTTP client")
        })
        .clone()
}

/// Events not yet due, by due time, each millisecond's in the order they were made (the order
/// of a heap of (time, sequence)). A ring of one slot per millisecond over the next two minutes,
/// where sessions fall (a session's pages span at most about 80 s): a map keyed by millisecond
/// was a quarter of the driver's CPU, each insert a walk of cold tree nodes. Events outside the
/// ring (already due, or further ahead) wait in a map.
struct Pending {
    /// The next millisecond to drain: the ring holds `[next, next + RING)`.
    next: i64,
    ring: Vec<Vec<Event>>,
    /// Events whose time was outside the ring when they were added.
    outside: BTreeMap<i64, Vec<Event>>,
    len: usize,
}

impl Pending {
    const RING: i64 = 1 << 17; // 131 s

    fn new(from_ms: i64) -> Pending {
        Pending {
            next: from_ms,
            ring: (0..Self::RING).map(|_| Vec::new()).collect(),
            outside: BTreeMap::new(),
            len: 0,
        }
    }

    fn push(&mut self, e: Event) {
        self.len += 1;
        if e.ts >= self.next && e.ts < self.next + Self::RING {
            let slot = (e.ts & (Self::RING - 1)) as usize;
            self.ring[slot].push(e);
        } else {
            self.outside.entry(e.ts).or_default().push(e);
        }
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every event due by `until` (inclusive), by time and then in the order added.
    fn drain_until(&mut self, until: i64, out: &mut Vec<Event>) {
        // Added when their time had already been drained.
        while let Some(entry) = self.outside.first_entry() {
            if *entry.key() >= self.next || *entry.key() > until {
                break;
            }
            let v = entry.remove();
            self.len -= v.len();
            out.extend(v);
        }
        while self.next <= until {
            // A millisecond's events added while it was beyond the ring came first.
            if self
                .outside
                .first_key_value()
                .is_some_and(|(ts, _)| *ts == self.next)
            {
                let v = self.outside.pop_first().map(|(_, v)| v).unwrap_or_default();
                self.len -= v.len();
                out.extend(v);
            }
            // Taken, not appended from: a slot keeping its capacity would hold a buffer for every
            // millisecond of the ring (700 MB at 100K events/s).
            let slot = std::mem::take(&mut self.ring[(self.next & (Self::RING - 1)) as usize]);
            self.len -= slot.len();
            out.extend(slot);
            self.next += 1;
        }
    }

    /// Whether every event left is due after `ms`.
    fn all_after(&self, ms: i64) -> bool {
        self.next > ms
            && self
                .outside
                .first_key_value()
                .is_none_or(|(ts, _)| *ts > ms)
    }
}

/// What is due when: the sessions started at the rate (times the daily curve), their pages
/// falling due, and the partner dumps, made into batches tick by tick. One state machine serves
/// both ways to drive: ticks of the running clock, or (with `prerender`) ticks counted before
/// the clock starts, in the drive's own time.
struct Schedule {
    /// The drive's time 0, epoch ms.
    start_ms: i64,
    rate: f64,
    seconds: u64,
    /// Events not yet due (a heap of a million pending pages was a quarter of the driver's CPU
    /// at 50K events/s, and a map by millisecond a quarter again).
    pending: Pending,
    /// Events the rate asked for so far, and those made.
    started: f64,
    generated: u64,
    /// The previous tick, s.
    last: f64,
    next_dump: f64,
    /// Each user's last event time, by user index (a hashed map was a tenth of the driver).
    last_ts: Vec<i64>,
    session_buf: Vec<Event>,
}

impl Schedule {
    fn new(drive: &Drive<'_>, rate: f64, seconds: u64, start_ms: i64, prewarm: Vec<Event>) -> Self {
        let mut pending = Pending::new(start_ms);
        for e in prewarm {
            pending.push(e);
        }
        Schedule {
            start_ms,
            rate,
            seconds,
            pending,
            started: 0.0,
            generated: 0,
            last: 0.0,
            next_dump: drive.traffic.partner_every_seconds as f64,
            last_ts: vec![i64::MIN; drive.gen.users().len()],
            session_buf: Vec::new(),
        }
    }

    /// The batches due `elapsed` s after the start, and whether the drive is over with them.
    fn tick(&mut self, drive: &mut Drive<'_>, elapsed: f64) -> (Vec<Made>, bool) {
        let now_ms = self.start_ms + (elapsed * 1000.0) as i64;
        let running = elapsed < self.seconds as f64;
        if running {
            let r = if drive.traffic.daily_curve {
                let phase = (elapsed / drive.traffic.day_seconds as f64).fract();
                self.rate * crate::generator::day_curve(phase)
            } else {
                self.rate
            };
            self.started += r * (elapsed - self.last);
            self.last = elapsed;
            // Sessions whose events sum to the rate; later pages are due later.
            while (self.generated as f64) < self.started {
                self.session_buf.clear();
                self.generated += drive.gen.session(now_ms, &mut self.session_buf) as u64;
                for e in self.session_buf.drain(..) {
                    self.pending.push(e);
                }
            }
        }
        let end_ms = self.start_ms + self.seconds as i64 * 1000;
        let mut due: Vec<Event> = Vec::new();
        self.pending
            .drain_until(if running { now_ms } else { now_ms.min(end_ms) }, &mut due);
        for e in &mut due {
            // A user's row keeps one version per millisecond (HBase's model): two events of one
            // user in the same millisecond would be one, so the later moves on.
            let last = &mut self.last_ts[e.user as usize];
            if e.ts <= *last {
                e.ts = *last + 1;
            }
            *last = e.ts;
        }
        let mut batches: Vec<Made> = Vec::new();
        for chunk in due.chunks(drive.driver.batch_max) {
            batches.push(drive.batch(chunk.to_vec(), false));
        }
        if running
            && drive.traffic.partner_dump_events > 0
            && elapsed >= self.next_dump
            && drive.traffic.partner_every_seconds > 0
        {
            self.next_dump += drive.traffic.partner_every_seconds as f64;
            let dump = drive
                .gen
                .partner_dump(now_ms, drive.traffic.partner_dump_events);
            for chunk in dump.chunks(drive.driver.batch_max) {
                batches.push(drive.batch(chunk.to_vec(), true));
            }
        }
        // Pages of sessions that would have continued past the end are not sent.
        let over = !running && (self.pending.is_empty() || self.pending.all_after(end_ms));
        (batches, over)
    }
}

/// A drive made ready before its clock starts ([`Drive::prepare`]), to be sent with
/// [`Drive::send`].
pub struct Prepared {
    rate: f64,
    seconds: u64,
    /// When it was made (the drive's own time starts there).
    made_at: i64,
    traffic: Ahead,
}

/// What a drive made before its clock starts.
enum Ahead {
    /// With `prerender`: every batch, by the tick it is due at.
    Batches(VecDeque<(f64, Vec<Made>)>),
    /// Without: the sessions that began before the traffic, for a schedule ticked by the clock.
    Prewarm(Vec<Event>),
}

/// Where a running drive's batches come from at each tick.
enum Source {
    /// Made ahead: those of the ticks now due.
    Ahead(VecDeque<(f64, Vec<Made>)>),
    /// Made as the clock ticks.
    Clock(Box<Schedule>),
}

impl Drive<'_> {
    /// Drives traffic at `rate` events/s (times the daily curve when on) for `seconds`.
    pub async fn run(&mut self, rate: f64, seconds: u64) -> Driven {
        let prepared = self.prepare(rate, seconds);
        self.send(prepared).await
    }

    /// What a drive makes before its clock starts: the sessions that began before the traffic
    /// did, and with `prerender` every batch. A caller that measures the drive (`find_max`'s
    /// steps) starts its measurement after this, so the making is not counted as traffic time.
    pub fn prepare(&mut self, rate: f64, seconds: u64) -> Prepared {
        // Sessions that began before the traffic did: their later pages fall due from the first
        // tick, so the rate is steady from the start (sessions last up to a minute and a half).
        // Made before the clock starts (at 100K events/s that is about a second of the driver's
        // CPU; with the clock running, the first tick found that second's events all due and sent
        // them at once) and moved to it after.
        let made_at = dmp_core::clock::now_ms();
        let prewarm = self.prewarm(rate, made_at);
        // With `prerender`, every batch of the drive, made now in the drive's own time (from
        // `made_at`) and moved to the clock's as it is sent; without, a schedule ticked by the
        // clock.
        let traffic = if self.driver.prerender {
            Ahead::Batches(self.prerender(rate, seconds, made_at, prewarm))
        } else {
            Ahead::Prewarm(prewarm)
        };
        Prepared {
            rate,
            seconds,
            made_at,
            traffic,
        }
    }

    /// Starts the clock and sends a prepared drive.
    pub async fn send(&mut self, prepared: Prepared) -> Driven {
        let Prepared {
            rate,
            seconds,
            made_at,
            traffic,
        } = prepared;
        let tick = Duration::from_millis(self.driver.tick_ms);
        let sem = Arc::new(tokio::sync::Semaphore::new(self.driver.connections));
        let hist = Arc::new(Mutex::new(
            Histogram::<u64>::new_with_bounds(1, 3_600_000, 3).expect("valid bounds"),
        ));
        let start = Instant::now();
        let start_ms = dmp_core::clock::now_ms();
        // Batches made ahead have their times moved to the clock as they are sent; a schedule
        // ticked by the clock makes them in its time, from the prewarm moved to it now.
        let (by, mut source) = match traffic {
            Ahead::Batches(ticks) => (start_ms - made_at, Source::Ahead(ticks)),
            Ahead::Prewarm(mut prewarm) => {
                for e in &mut prewarm {
                    e.ts += start_ms - made_at;
                }
                let schedule = Schedule::new(self, rate, seconds, start_ms, prewarm);
                (0, Source::Clock(Box::new(schedule)))
            }
        };
        let mut tasks = tokio::task::JoinSet::new();
        let mut batch_seq = 0u64;
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            interval.tick().await;
            let elapsed = start.elapsed().as_secs_f64();
            let (batches, over) = match &mut source {
                Source::Ahead(ticks) => {
                    let mut due = Vec::new();
                    while ticks.front().is_some_and(|(t, _)| *t <= elapsed) {
                        due.extend(ticks.pop_front().map(|(_, b)| b).unwrap_or_default());
                    }
                    (due, ticks.is_empty())
                }
                Source::Clock(schedule) => schedule.tick(self, elapsed),
            };
            for made in batches {
                let b = made.shifted(by, self.gen);
                self.progress
                    .offered
                    .fetch_add(b.events.len() as u64, Ordering::Relaxed);
                // Waiting here for a free connection is part of the latency: `due_ms` stays.
                let permit = sem.clone().acquire_owned().await.expect("open semaphore");
                let (target, oracle, dumps, progress, hist) = (
                    self.target.clone(),
                    self.oracle.clone(),
                    self.dumps.clone(),
                    self.progress.clone(),
                    hist.clone(),
                );
                batch_seq += 1;
                let n = batch_seq;
                tasks.spawn(async move {
                    let mut backoff = Duration::from_millis(50);
                    while let Err(e) = send(&target, &b, n).await {
                        tracing::warn!(error = %e, "batch not taken; sending it again");
                        progress.retries.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                    drop(permit);
                    let acked_ms = dmp_core::clock::now_ms();
                    {
                        let mut o = oracle.lock().expect("not poisoned");
                        for e in &b.events {
                            o.observe(e);
                        }
                    }
                    if b.dump {
                        let mut d = dumps.lock().expect("not poisoned");
                        for uid in &b.uids {
                            d.insert(uid.clone(), acked_ms);
                        }
                    } else {
                        let _ = hist
                            .lock()
                            .expect("not poisoned")
                            .record((acked_ms - b.due_ms).max(1) as u64);
                    }
                    progress
                        .acked
                        .fetch_add(b.events.len() as u64, Ordering::Relaxed);
                });
            }
            while tasks.try_join_next().is_some() {}
            if over {
                break;
            }
        }
        while tasks.join_next().await.is_some() {}
        let h = hist.lock().expect("not poisoned");
        Driven {
            offered: self.progress.offered.load(Ordering::Relaxed),
            acked: self.progress.acked.load(Ordering::Relaxed),
            retries: self.progress.retries.load(Ordering::Relaxed),
            seconds: start.elapsed().as_secs_f64(),
            ack_latency_ms: Percentiles::of(&h, 1.0),
        }
    }

    /// Every batch of a drive at `rate` for `seconds` from `start_ms`, by the tick it is due at
    /// (seconds from the start), made before the clock starts.
    fn prerender(
        &mut self,
        rate: f64,
        seconds: u64,
        start_ms: i64,
        prewarm: Vec<Event>,
    ) -> VecDeque<(f64, Vec<Made>)> {
        let mut schedule = Schedule::new(self, rate, seconds, start_ms, prewarm);
        let mut ticks = VecDeque::new();
        let (mut k, mut events) = (1u64, 0usize);
        loop {
            let elapsed = (k * self.driver.tick_ms) as f64 / 1000.0;
            let (batches, over) = schedule.tick(self, elapsed);
            events += batches.iter().map(|b| b.events.len()).sum::<usize>();
            ticks.push_back((elapsed, batches));
            if over {
                break;
            }
            k += 1;
        }
        tracing::info!(
            events,
            seconds = (dmp_core::clock::now_ms() - start_ms) as f64 / 1000.0,
            "drive made before its clock starts"
        );
        ticks
    }

    /// The pages at or after `start_ms` of the sessions begun in the 90 s before it, at `rate`
    /// (the daily curve's start when on).
    fn prewarm(&mut self, rate: f64, start_ms: i64) -> Vec<Event> {
        let r0 = if self.traffic.daily_curve {
            rate * crate::generator::day_curve(0.0)
        } else {
            rate
        };
        let prewarm_ms = 90_000.0;
        let mut made = 0.0f64;
        let mut out = Vec::new();
        let mut session = Vec::new();
        while made < r0 * prewarm_ms / 1000.0 {
            let at = start_ms - prewarm_ms as i64 + (made / r0 * 1000.0) as i64;
            session.clear();
            made += self.gen.session(at, &mut session) as f64;
            out.extend(session.drain(..).filter(|e| e.ts >= start_ms));
        }
        out
    }

    fn batch(&self, events: Vec<Event>, dump: bool) -> Made {
        let mut body = Vec::with_capacity(events.len() * 300);
        let mut ts_at = Vec::with_capacity(events.len());
        for e in &events {
            ts_at.push(self.gen.write_ndjson(e, &mut body));
        }
        body.shrink_to_fit();
        let users = self.gen.users();
        // Keys of bus records, and the arrival of each dumped user.
        let uids = if dump || matches!(self.target, Target::Bus(..)) {
            events
                .iter()
                .map(|e| users[e.user as usize].uid.clone())
                .collect()
        } else {
            Vec::new()
        };
        Made {
            events,
            uids,
            body,
            ts_at,
            dump,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generator::{Kind, Rng};

    /// Answers every HTTP/1.1 request on `s` with 202 (keep-alive), handing each body to
    /// `on_body`.
    async fn accept(mut s: tokio::net::TcpStream, on_body: impl Fn(&[u8])) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf: Vec<u8> = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                continue;
            };
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            while buf.len() < end + 4 + len {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            on_body(&buf[end + 4..end + 4 + len]);
            buf.drain(..end + 4 + len);
            let ok = b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n";
            if s.write_all(ok).await.is_err() {
                return;
            }
        }
    }

    /// For every event in an NDJSON `body` received now, how long after its time it came (ms,
    /// negative when its time was still ahead).
    fn lateness(body: &[u8]) -> Vec<i64> {
        let now = dmp_core::clock::now_ms();
        body.split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|line| {
                let v: serde_json::Value = serde_json::from_slice(line).unwrap();
                now - v["ts"].as_i64().unwrap()
            })
            .collect()
    }

    /// The sessions begun before the traffic are made before its clock starts, so the first
    /// batches go when they are due. (Made after it, at 100K events/s the first tick found the
    /// second they took all due and sent it at once, late.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn given_a_drive_when_it_starts_then_the_first_batches_go_when_due() {
        let sc = crate::scenario::Scenario::parse(
            "name = \"t\"\nusers = 50000\n[traffic]\nmode = \"open\"\nrate = 50000.0\n\
             seconds = 2\nwarmup_seconds = 0\npartner_dump_events = 0\n",
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(accept(s, |_| {}));
            }
        });
        let mut gen = Generator::new(sc.seed, sc.users);
        let mut drive = Drive {
            target: Target::Http(url),
            gen: &mut gen,
            oracle: Arc::new(Mutex::new(Oracle::new(sc.users))),
            dumps: Default::default(),
            progress: Arc::new(Progress::default()),
            traffic: &sc.traffic,
            driver: &sc.driver,
        };
        let started = Instant::now();
        let driven = drive.run(sc.traffic.rate, sc.traffic.seconds).await;
        assert_eq!(driven.acked, driven.offered);
        assert!(driven.offered > 30_000, "{driven:?}");
        // Made with the clock running, the first batches were as late as the sessions took to
        // make (the time the drive took beyond its own clock): p99 0.84-0.89 s in a debug build,
        // against 0.11-0.13 s since.
        let made = started.elapsed().as_secs_f64() - driven.seconds;
        assert!(
            driven.ack_latency_ms.p99 < 450.0,
            "p99 {} ms from due to acknowledged ({made:.2} s spent before the clock started)",
            driven.ack_latency_ms.p99
        );
    }

    /// A drive made before its clock starts sends what a live one does, when it is due, with
    /// the times in the bodies moved to the clock: made in the drive's own time and sent as
    /// made, each event would arrive as late as the drive took to make (over a second here) and
    /// waited before it was sent (half a second).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn given_a_prerendered_drive_then_events_go_when_due_with_their_times_moved() {
        let sc = crate::scenario::Scenario::parse(
            "name = \"t\"\nusers = 50000\n[traffic]\nmode = \"open\"\nrate = 50000.0\n\
             seconds = 2\nwarmup_seconds = 0\npartner_dump_events = 2000\n\
             partner_every_seconds = 1\n[driver]\nprerender = true\n",
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let late = Arc::new(Mutex::new(Vec::new()));
        let seen = late.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(accept(s, move |body| {
                    seen.lock().unwrap().extend(lateness(body))
                }));
            }
        });
        let mut gen = Generator::new(sc.seed, sc.users);
        let dumps: DumpArrivals = Default::default();
        let mut drive = Drive {
            target: Target::Http(url),
            gen: &mut gen,
            oracle: Arc::new(Mutex::new(Oracle::new(sc.users))),
            dumps: dumps.clone(),
            progress: Arc::new(Progress::default()),
            traffic: &sc.traffic,
            driver: &sc.driver,
        };
        let started = Instant::now();
        let prepared = drive.prepare(sc.traffic.rate, sc.traffic.seconds);
        let made = started.elapsed().as_secs_f64();
        // A caller that measures the drive (`find_max`'s steps scrape dmp's counters) starts
        // here: the events are due from when the drive is sent, not from when it was made.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let sending = Instant::now();
        let driven = drive.send(prepared).await;
        assert!(driven.seconds <= sending.elapsed().as_secs_f64());
        assert!(
            driven.seconds < sc.traffic.seconds as f64 + 0.5,
            "{:.2} s of traffic for {} s: the making counted ({made:.2} s)",
            driven.seconds,
            sc.traffic.seconds
        );
        assert_eq!(driven.acked, driven.offered);
        assert!(driven.offered > 30_000, "{driven:?}");
        assert!(made > 0.5, "made in {made:.2} s: too fast to tell");
        let late = late.lock().unwrap();
        assert_eq!(late.len() as u64, driven.offered);
        // Live events: sent when due, so never ahead of the clock and rarely far behind.
        let mut live: Vec<i64> = late.iter().copied().filter(|l| *l < 60_000).collect();
        live.sort_unstable();
        assert!(live[0] >= -20, "an event {} ms ahead of its time", -live[0]);
        let p99 = live[live.len() * 99 / 100];
        assert!(
            p99 < 450,
            "p99 {p99} ms late ({made:.2} s spent before the clock)"
        );
        // The dump went (its events are hours old).
        assert_eq!(late.len() - live.len(), 2000);
        assert!(dumps.lock().unwrap().len() > 1000);
        assert!(driven.ack_latency_ms.p99 < 450.0, "{driven:?}");
    }

    /// Moving a made batch's times writes over their digits, or makes the body again when the
    /// number of digits changes; either way it is the body the moved events would have made.
    #[test]
    fn given_a_made_batch_when_moved_then_its_body_is_that_of_the_moved_events() {
        let gen = Generator::new(1, 100);
        let drive_batch = |events: Vec<Event>| {
            let mut body = Vec::new();
            let ts_at = events
                .iter()
                .map(|e| gen.write_ndjson(e, &mut body))
                .collect();
            Made {
                events,
                uids: Vec::new(),
                body,
                ts_at,
                dump: false,
            }
        };
        for (times, by) in [
            (vec![1_795_341_600_000i64, 1_795_341_600_007], 1234),
            (vec![999_999_999_990, 999_999_999_999], 5), // 12 digits to 13
            (vec![1_795_341_600_000, 1_795_341_600_001], 0),
        ] {
            let events: Vec<Event> = times.iter().map(|t| event(*t, 1)).collect();
            let moved: Vec<Event> = times.iter().map(|t| event(t + by, 1)).collect();
            let b = drive_batch(events).shifted(by, &gen);
            let mut want = Vec::new();
            for e in &moved {
                gen.write_ndjson(e, &mut want);
            }
            assert_eq!(
                String::from_utf8_lossy(&b.body),
                String::from_utf8_lossy(&want)
            );
            assert_eq!(b.events, moved);
            assert_eq!(b.due_ms, times[0] + by);
        }
    }

    fn event(ts: i64, seq: u32) -> Event {
        Event {
            user: 0,
            ts,
            kind: Kind::Pageview,
            host: "h",
            page: seq,
            q: None,
            src: "web",
        }
    }

    /// The ring against the map it replaced: the same events in the same order at every drain,
    /// with events added already due, within the ring, and beyond it.
    #[test]
    fn given_any_pushes_then_drains_match_a_map_by_millisecond() {
        let mut rng = Rng::new(7);
        let start = 1_795_341_600_000i64;
        let mut ring = Pending::new(start);
        let mut model: BTreeMap<i64, Vec<Event>> = BTreeMap::new();
        let (mut now, mut seq) = (start, 0u32);
        for _ in 0..3000 {
            for _ in 0..rng.below(20) {
                let ts = match rng.below(10) {
                    0 => now - rng.below(50) as i64,                   // already due
                    1 => now + Pending::RING + rng.below(9000) as i64, // beyond the ring
                    _ => now + rng.below(90_000) as i64,
                };
                seq += 1;
                ring.push(event(ts, seq));
                model.entry(ts).or_default().push(event(ts, seq));
            }
            now += rng.below(200) as i64;
            let mut got = Vec::new();
            ring.drain_until(now, &mut got);
            let mut want = Vec::new();
            while let Some(entry) = model.first_entry() {
                if *entry.key() > now {
                    break;
                }
                want.extend(entry.remove());
            }
            assert_eq!(got, want, "at {now}");
            assert_eq!(ring.is_empty(), model.is_empty());
            assert_eq!(
                ring.all_after(now),
                model.first_key_value().is_none_or(|(ts, _)| *ts > now)
            );
        }
        assert!(seq > 20_000 && !model.is_empty());
    }
}
