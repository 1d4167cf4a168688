#![allow(missing_docs)] // bench binary
//! Segmenter figures (issue: worker throughput with realistic dedupe >= 100K changes/s on 2
//! cores; dedupe cache of 10M users <= 1 GiB; change -> segment record p99 <= 20 ms at 20K/s).
//!
//! `cargo bench -p dmp-segmenter --bench segmenter` prints a report; `DMP_BENCH_USERS`,
//! `DMP_BENCH_RATE`, `DMP_BENCH_SECS` change the sizes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dmp_bus::embedded::EmbeddedBus;
use dmp_bus::{Bus, ProduceRecord};
use dmp_core::clock::{now_ms, DAY_MS};
use dmp_core::{Cell, Config, SegmentUpdate, UserChange};
use dmp_segmenter::blacklist::Limits;
use dmp_segmenter::users::Users;
use dmp_segmenter::{FixedRules, Segmenter};
use dmp_storage_writer::cells::written_cell;
use dmp_store::embedded::{EmbeddedDatabase, EmbeddedStore};
use dmp_store::{Put, Schema, UserStore};
use tokio::sync::watch;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const RULES: &str = include_str!("../../rules/examples/dmp-rules.toml");

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

struct Setup {
    _dir: tempfile::TempDir,
    cfg: Config,
    bus: Arc<dyn Bus>,
    store: Arc<EmbeddedStore>,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::defaults();
    cfg.data_dir = dir.path().to_path_buf();
    cfg.segmenter.workers = 2;
    let db = EmbeddedDatabase::open(dir.path(), &cfg.embedded, &Schema::dmp_default()).unwrap();
    let store = Arc::new(EmbeddedStore::open(&db, &cfg.store).unwrap());
    let bus: Arc<dyn Bus> = Arc::new(EmbeddedBus::open(&db, &cfg.bus).unwrap());
    dmp_bus::ensure_topics(bus.as_ref(), &cfg.topics)
        .await
        .unwrap();
    Setup {
        _dir: dir,
        cfg,
        bus,
        store,
    }
}

/// A user's row: 10 events of 3 cells over a month, written at `written`.
fn user_put(uid: &str, i: u64, written: i64) -> Put {
    let mut cells = Vec::new();
    for e in 0..10i64 {
        let ts = now_ms() - e * 3 * DAY_MS;
        let kind = if (i as i64 + e) % 3 == 0 {
            "search"
        } else {
            "pageview"
        };
        cells.push(Cell::new("e", "type", ts, kind.as_bytes().to_vec()));
        cells.push(Cell::new(
            "e",
            "url",
            ts,
            format!("https://site{}.example/p/{e}", i % 50).into_bytes(),
        ));
        cells.push(Cell::new(
            "e",
            "q",
            ts,
            "ипотека калькулятор".as_bytes().to_vec(),
        ));
    }
    cells.push(Cell::new(
        "m",
        "first_seen",
        i64::MAX - (now_ms() - 40 * DAY_MS),
        (now_ms() - 40 * DAY_MS).to_be_bytes().to_vec(),
    ));
    cells.push(written_cell(written));
    Put {
        row: uid.to_string(),
        cells,
    }
}

fn segmenter(s: &Setup) -> Segmenter {
    let (v, rules) = dmp_rules::file::parse_rules("example", RULES).unwrap();
    let mut rules = rules;
    rules.extend(dmp_rules::builtin::builtin_rules());
    let set = dmp_rules::RuleSet::new(v, rules, "example").unwrap();
    Segmenter::with_rules(
        s.bus.clone(),
        s.store.clone(),
        &s.cfg,
        Arc::new(FixedRules(Arc::new(set))),
    )
}

async fn committed(s: &Setup) -> u64 {
    s.bus
        .committed(&s.cfg.segmenter.group, &s.cfg.topics.user_changes)
        .await
        .unwrap()
        .iter()
        .map(|c| c.unwrap_or(0))
        .sum()
}

/// (a) Bursts of 5 changes per user within 2 s, all written before the segmenter reads.
async fn throughput(users: u64) {
    let s = setup().await;
    let t0 = now_ms();
    for chunk in 0..users.div_ceil(1000) {
        let puts: Vec<Put> = (chunk * 1000..((chunk + 1) * 1000).min(users))
            .map(|i| user_put(&format!("u{i:08}"), i, t0 + 2000))
            .collect();
        s.store.put(&puts).unwrap();
    }
    let mut total = 0u64;
    for chunk in 0..users.div_ceil(1000) {
        let mut recs = Vec::new();
        for i in chunk * 1000..((chunk + 1) * 1000).min(users) {
            let uid = format!("u{i:08}");
            for k in 0..5 {
                let ts = t0 + k * 500;
                recs.push(ProduceRecord::new(
                    uid.clone(),
                    UserChange {
                        uid: uid.clone(),
                        ts,
                        last_event_ts: ts,
                    }
                    .to_json(),
                ));
            }
        }
        total += recs.len() as u64;
        s.bus
            .produce(&s.cfg.topics.user_changes, recs)
            .await
            .unwrap();
    }
    let (stop, rx) = watch::channel(false);
    let seg = segmenter(&s);
    let started = Instant::now();
    let task = tokio::spawn(async move { seg.run(rx).await.unwrap() });
    while committed(&s).await < total {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let _ = stop.send(true);
    task.await.unwrap();
    println!(
        "(a) segmenter, 2 workers: {total} changes ({users} users x 5 within 2 s) in {secs:.2} s = {:.0} changes/s ({:.0} users evaluated/s)",
        total as f64 / secs,
        users as f64 / secs
    );
}

/// (b) A worker's map of users (dedupe and blacklist state) holding 10M users.
fn users_memory(n: u64) {
    let before = rss_mib();
    let mut d = Users::new(
        n as usize,
        Limits {
            window_ms: 60_000,
            max: 100,
            ban_ms: 3_600_000,
        },
    );
    for i in 0..n {
        d.read(
            &format!("{:032x}", i.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            i as i64,
            i as i64,
        );
    }
    let after = rss_mib();
    println!(
        "(b) users' map (dedupe and blacklist) with {} users (32-character uids): {:.0} MiB resident ({:.0} bytes per user)",
        d.len(),
        after - before,
        (after - before) * 1048576.0 / n as f64
    );
}

/// (c) Open loop at `rate` changes/s, each for a user whose segments change (first evaluation).
async fn latency(rate: u64, secs: u64) {
    let s = setup().await;
    let total = rate * secs;
    let t0 = now_ms();
    for chunk in 0..total.div_ceil(1000) {
        let puts: Vec<Put> = (chunk * 1000..((chunk + 1) * 1000).min(total))
            .map(|i| user_put(&format!("l{i}"), i, t0))
            .collect();
        s.store.put(&puts).unwrap();
    }
    let (stop, rx) = watch::channel(false);
    let seg = segmenter(&s);
    let task = tokio::spawn(async move { seg.run(rx).await.unwrap() });
    let sent = Arc::new(std::sync::Mutex::new(vec![None::<Instant>; total as usize]));
    let producer = {
        let (bus, topic, sent) = (
            s.bus.clone(),
            s.cfg.topics.user_changes.clone(),
            sent.clone(),
        );
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let per_tick = rate / 100;
            for tick in 0..secs * 100 {
                tokio::time::sleep_until(start + Duration::from_millis(tick * 10)).await;
                let now = Instant::now();
                let recs: Vec<ProduceRecord> = (tick * per_tick..(tick + 1) * per_tick)
                    .map(|i| {
                        sent.lock().unwrap()[i as usize] = Some(now);
                        let uid = format!("l{i}");
                        ProduceRecord::new(
                            uid.clone(),
                            UserChange {
                                uid,
                                ts: t0,
                                last_event_ts: t0,
                            }
                            .to_json(),
                        )
                    })
                    .collect();
                bus.produce(&topic, recs).await.unwrap();
            }
        })
    };
    let mut consumer = s
        .bus
        .consumer("latency", std::slice::from_ref(&s.cfg.topics.segments))
        .await
        .unwrap();
    let mut hist = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs + 30);
    while hist.len() < total && Instant::now() < deadline {
        for r in consumer
            .poll(10_000, Duration::from_millis(50))
            .await
            .unwrap()
        {
            let u = SegmentUpdate::from_json(&r.value).unwrap();
            let i: usize = u.uid[1..].parse().unwrap();
            if let Some(at) = sent.lock().unwrap()[i] {
                hist.record(at.elapsed().as_micros() as u64).unwrap();
            }
        }
    }
    producer.await.unwrap();
    let _ = stop.send(true);
    task.await.unwrap();
    println!(
        "(c) change on dmp.user-changes -> segment record on dmp.segments at {rate}/s for {secs} s: p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, max {:.1} ms ({} of {total})",
        hist.value_at_quantile(0.5) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0,
        hist.value_at_quantile(0.999) as f64 / 1000.0,
        hist.max() as f64 / 1000.0,
        hist.len()
    );
}

fn main() {
    if std::env::args().any(|a| a == "--test") {
        return;
    }
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(throughput(env("DMP_BENCH_USERS", 100_000)));
    users_memory(env("DMP_BENCH_DEDUPE_USERS", 10_000_000));
    rt.block_on(latency(
        env("DMP_BENCH_RATE", 20_000),
        env("DMP_BENCH_SECS", 5),
    ));
}
