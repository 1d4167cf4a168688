#![allow(missing_docs)] // bench binary
//! User lookups over HTTP on loopback (issue: >= 20K requests/s with p99 <= 2 ms).
//!
//! `cargo bench -p dmp-api --bench lookup`. 100K users with memberships in an embedded store; a
//! closed loop of `DMP_BENCH_CONNECTIONS` (default 32) keep-alive connections from the same
//! process (the client shares the 2 cores with the server) for `DMP_BENCH_SECS` (default 10).

#[path = "../../testsupport/ingest.rs"]
mod ingest;

use std::time::{Duration, Instant};

use dmp_core::cell::FAMILY_SEGMENTS;
use dmp_core::{Cell, Config};
use dmp_store::{Put, UserStore};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn main() {
    if std::env::args().any(|a| a == "--test") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let users = 100_000u64;
    let conns = env("DMP_BENCH_CONNECTIONS", 32);
    let secs = env("DMP_BENCH_SECS", 10);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::defaults();
    cfg.data_dir = dir.path().to_path_buf();
    let served = ingest::serve(&cfg, None).await;
    let now = dmp_core::clock::now_ms();
    for chunk in (0..users).collect::<Vec<_>>().chunks(1000) {
        let puts: Vec<Put> = chunk
            .iter()
            .map(|u| Put {
                row: format!("user-{u}"),
                cells: vec![
                    Cell::new(
                        FAMILY_SEGMENTS,
                        "current",
                        now,
                        format!(r#"{{"cats":{now},"seg{}":{now}}}"#, u % 50).into_bytes(),
                    ),
                    Cell::new(
                        FAMILY_SEGMENTS,
                        "evaluated",
                        now,
                        format!(r#"{{"at":{now},"last_event_ts":{now},"rules_version":"bench"}}"#)
                            .into_bytes(),
                    ),
                    Cell::new("e", "url", now - 5, b"https://cats.example/".to_vec()),
                ],
            })
            .collect();
        served.store.put(&puts).unwrap();
    }
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(conns as usize)
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for c in 0..conns {
        let (client, url) = (client.clone(), served.url.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(100_000);
            let mut i = c * 7919;
            while Instant::now() < deadline {
                i = (i * 48_271 + 11) % users;
                let started = Instant::now();
                let r = client
                    .get(format!("{url}/v1/users/user-{i}/segments"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                let _ = r.bytes().await.unwrap();
                lat.push(started.elapsed().as_micros() as u64);
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_unstable();
    let q = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)] as f64 / 1000.0;
    println!(
        "lookup over HTTP, {conns} connections, {secs} s: {} requests = {:.0}/s; p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms",
        all.len(),
        all.len() as f64 / secs as f64,
        q(0.5),
        q(0.99),
        q(0.999)
    );
    let _ = served.stop.send(true);
}
