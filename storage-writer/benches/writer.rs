#![allow(missing_docs)] // bench binary
//! Storage writer and ingest figures (issue: writer >= 150K events/s on one core for pageviews;
//! p99 event-on-topic -> change-emitted <= 50 ms at 50K events/s; POST /v1/events >= 100K
//! events/s with batches of 500 from a load tool on the same machine).
//!
//! `taskset -c 0 cargo bench -p dmp-storage-writer --bench writer` for the one-core figure; the
//! latency and HTTP parts print their own reports (HDR histograms) and take `DMP_BENCH_*` knobs
//! (`DMP_BENCH_PARTS=a` runs only the throughput part); `DMP__SECTION__KEY` variables override the
//! configuration as for the binary.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dmp_api::ingest::Ingest;
use dmp_api::spill::Spill;
use dmp_bus::embedded::EmbeddedBus;
use dmp_bus::{Bus, ProduceRecord};
use dmp_core::{Config, UserChange};
use dmp_storage_writer::enrich::{Enricher, IpMode, SHIPPED_CRAWLER_LIST};
use dmp_storage_writer::StorageWriter;
use dmp_store::embedded::{EmbeddedDatabase, EmbeddedStore};
use dmp_store::Schema;
use tokio::sync::watch;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const UAS: [&str; 4] = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0",
    "Mozilla/5.0 (Linux; Android 14; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.6099.144 Mobile Safari/537.36",
];

fn pageview(i: u64, uid: &str, ts: i64) -> Vec<u8> {
    format!(
        r#"{{"uid":"{uid}","ts":{ts},"type":"pageview","url":"https://news.example.ru/article/{}","ref":"https://www.google.com/","ip":"178.49.{}.{}","ua":"{}","src":"pixel"}}"#,
        i % 50_000,
        (i / 256) % 256,
        i % 256,
        UAS[(i % 4) as usize]
    )
    .into_bytes()
}

struct Setup {
    _dir: tempfile::TempDir,
    cfg: Config,
    bus: Arc<dyn Bus>,
    store: Arc<EmbeddedStore>,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    // The defaults, with DMP__SECTION__KEY overrides as for the binary.
    let mut cfg = Config::load_from_env(None).expect("a valid configuration");
    cfg.data_dir = dir.path().to_path_buf();
    if let Some(b) = std::env::var("DMP_BENCH_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        cfg.storage_writer.batch_max_events = b;
    }
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

fn writer(s: &Setup) -> StorageWriter {
    let enricher = Enricher::new(IpMode::Truncate, Vec::new(), SHIPPED_CRAWLER_LIST).unwrap();
    StorageWriter::new(s.bus.clone(), s.store.clone(), &s.cfg, enricher)
}

async fn committed_total(s: &Setup) -> u64 {
    s.bus
        .committed(&s.cfg.storage_writer.group, &s.cfg.topics.events)
        .await
        .unwrap()
        .iter()
        .map(|c| c.unwrap_or(0))
        .sum()
}

/// (a) Throughput: preload N events, then time the writer from start to everything committed.
async fn throughput(n: u64) {
    let s = setup().await;
    let ts = dmp_core::clock::now_ms() - 60_000;
    for chunk in 0..n / 1000 {
        let records: Vec<ProduceRecord> = (0..1000)
            .map(|j| {
                let i = chunk * 1000 + j;
                let uid = format!("u{:07}", (i * 7919) % 200_000);
                ProduceRecord::new(uid.clone(), pageview(i, &uid, ts + i as i64))
            })
            .collect();
        s.bus.produce(&s.cfg.topics.events, records).await.unwrap();
    }
    let (stop, rx) = watch::channel(false);
    let w = writer(&s);
    let started = Instant::now();
    let task = tokio::spawn(async move { w.run(rx).await.unwrap() });
    while committed_total(&s).await < n {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let _ = stop.send(true);
    task.await.unwrap();
    let row = dmp_store::UserStore::get(s.store.as_ref(), &dmp_store::Get::row("u0000000"))
        .unwrap()
        .unwrap();
    let per_event = row.cells.len() as f64 / row.versions("e", "url").count().max(1) as f64;
    println!(
        "(a) storage writer: {n} pageview events in {secs:.2} s = {:.0} events/s (~{per_event:.0} cells per event, 200K users)",
        n as f64 / secs
    );
}

/// (b) Latency at a fixed open-loop rate: produce batches every 10 ms with unique uids; a consumer
/// of dmp.user-changes records when each uid's change arrives.
async fn latency(rate: u64, secs: u64) {
    let s = setup().await;
    let (stop, rx) = watch::channel(false);
    let w = writer(&s);
    let task = tokio::spawn(async move { w.run(rx).await.unwrap() });
    let sent: Arc<parking_lot_free::Map> = Arc::new(parking_lot_free::Map::default());
    let mut consumer = s
        .bus
        .consumer(
            "latency-probe",
            std::slice::from_ref(&s.cfg.topics.user_changes),
        )
        .await
        .unwrap();
    let total = rate * secs;
    let per_tick = rate / 100;
    let producer = {
        let (bus, topic, sent) = (s.bus.clone(), s.cfg.topics.events.clone(), sent.clone());
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let mut i = 0u64;
            for tick in 0..secs * 100 {
                tokio::time::sleep_until(start + Duration::from_millis(tick * 10)).await;
                let now = Instant::now();
                let ts = dmp_core::clock::now_ms();
                let records: Vec<ProduceRecord> = (0..per_tick)
                    .map(|_| {
                        i += 1;
                        let uid = format!("l{i}");
                        ProduceRecord::new(uid.clone(), pageview(i, &uid, ts))
                    })
                    .collect();
                sent.insert_range(i + 1 - per_tick, i, now);
                bus.produce(&topic, records).await.unwrap();
            }
        })
    };
    let mut hist = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs + 30);
    while hist.len() < total && Instant::now() < deadline {
        for r in consumer
            .poll(10_000, Duration::from_millis(50))
            .await
            .unwrap()
        {
            let c = UserChange::from_json(&r.value).unwrap();
            if let Some(at) = sent.get(c.uid[1..].parse().unwrap()) {
                hist.record(at.elapsed().as_micros() as u64).unwrap();
            }
        }
    }
    producer.await.unwrap();
    let _ = stop.send(true);
    task.await.unwrap();
    println!(
        "(b) event on dmp.events -> change on dmp.user-changes at {rate} events/s for {secs} s: p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, max {:.1} ms ({} of {total} seen)",
        hist.value_at_quantile(0.5) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0,
        hist.value_at_quantile(0.999) as f64 / 1000.0,
        hist.max() as f64 / 1000.0,
        hist.len()
    );
}

/// (c) HTTP ingest: 4 connections post pre-built JSON batches of 500 events for `secs`.
async fn http_ingest(secs: u64, with_writer: bool) {
    let s = setup().await;
    let spill = Arc::new(Spill::open(&s.cfg.spill_dir(), s.cfg.spill.max_bytes).unwrap());
    let ingest = Arc::new(Ingest::new(
        s.bus.clone(),
        s.cfg.topics.events.clone(),
        spill,
        s.cfg.api.clone(),
    ));
    let state = dmp_api::AppState::new(
        s.bus.clone(),
        s.store.clone(),
        dmp_core::telemetry::init_metrics(),
        ingest,
        &s.cfg,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/events", listener.local_addr().unwrap());
    let (stop, rx) = watch::channel(false);
    let mut srx = rx.clone();
    tokio::spawn(dmp_api::serve(listener, state, async move {
        let _ = srx.changed().await;
    }));
    let task = with_writer.then(|| {
        let w = writer(&s);
        tokio::spawn(async move { w.run(rx).await.unwrap() })
    });
    let ts = dmp_core::clock::now_ms();
    let bodies: Vec<Vec<u8>> = (0..64u64)
        .map(|b| {
            let events: Vec<serde_json::Value> = (0..500u64)
                .map(|j| {
                    let i = b * 500 + j;
                    serde_json::from_slice(&pageview(i, &format!("h{i}"), ts)).unwrap()
                })
                .collect();
            serde_json::to_vec(&events).unwrap()
        })
        .collect();
    let bodies = Arc::new(bodies);
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let mut clients = Vec::new();
    for c in 0..4usize {
        let (url, bodies) = (url.clone(), bodies.clone());
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let (mut n, mut k) = (0u64, c);
            while Instant::now() < until {
                let r = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(bodies[k % bodies.len()].clone())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 202);
                let _ = r.bytes().await;
                n += 500;
                k += 4;
            }
            n
        }));
    }
    let mut total = 0;
    for c in clients {
        total += c.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let _ = stop.send(true);
    if let Some(t) = task {
        t.await.unwrap();
    }
    println!(
        "(c) POST /v1/events, 4 connections, batches of 500{}: {total} events in {elapsed:.1} s = {:.0} events/s",
        if with_writer { ", storage writer running alongside" } else { "" },
        total as f64 / elapsed
    );
}

/// A tiny concurrent map of send times (avoids pulling another crate into the bench).
mod parking_lot_free {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::time::Instant;

    #[derive(Default)]
    pub struct Map(Mutex<HashMap<u64, Instant>>);

    impl Map {
        pub fn insert_range(&self, from: u64, to: u64, at: Instant) {
            let mut m = self.0.lock().unwrap();
            for i in from..=to {
                m.insert(i, at);
            }
        }
        pub fn get(&self, i: u64) -> Option<Instant> {
            self.0.lock().unwrap().get(&i).copied()
        }
    }
}

fn main() {
    if std::env::args().any(|a| a == "--test") {
        return; // `cargo test --benches`: nothing to check here
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
    // DMP_BENCH_PARTS picks parts, e.g. "a" or "bc" (default: all).
    let parts = std::env::var("DMP_BENCH_PARTS").unwrap_or_else(|_| "abc".into());
    rt.block_on(async {
        if parts.contains('a') {
            throughput(env("DMP_BENCH_EVENTS", 500_000)).await;
        }
        if parts.contains('b') {
            latency(env("DMP_BENCH_RATE", 50_000), env("DMP_BENCH_SECS", 10)).await;
        }
        if parts.contains('c') {
            http_ingest(env("DMP_BENCH_SECS", 10), false).await;
            http_ingest(env("DMP_BENCH_SECS", 10), true).await;
        }
    });
}
