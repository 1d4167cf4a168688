#![allow(missing_docs)] // bench binary
//! Counter update rates (issue: >= 4M (user, segment) updates/s into one local redis-server with
//! the batched script, side by side with the once-per-user script and plain pipelined PFADD;
//! embedded >= 10M updates/s per core) and audience query latency.
//!
//! `DMP_BENCH_REDIS=redis://127.0.0.1:6379 cargo bench -p dmp-stats --bench counters`
//! Knobs: `DMP_BENCH_USERS` (default 1000000), `DMP_BENCH_SEGMENTS` (segments per user, default 5),
//! `DMP_BENCH_REDIS_MODES` (e.g. `batched`: only those Redis modes).

use std::time::{Duration, Instant};

use dmp_stats::redis_counters::{Mode, RedisCounters, RedisOptions};
use dmp_stats::{EmbeddedCounters, SegmentCounters};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DAY: u32 = 20_261_122;

fn env(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// Each user is in `per_user` of 100 segments (and `all`): (user, segment) updates = users x
/// (per_user + 1).
fn workload(users: usize, per_user: usize, tag: &str) -> Vec<(String, Vec<String>)> {
    (0..users)
        .map(|u| {
            let segs = (0..per_user)
                .map(|j| format!("{tag}seg{}", (u * 7 + j * 13) % 100))
                .collect();
            (format!("user-{u}-{}", u.wrapping_mul(2_654_435_761)), segs)
        })
        .collect()
}

fn run(c: &dyn SegmentCounters, w: &[(String, Vec<String>)]) -> f64 {
    let started = Instant::now();
    for (uid, segs) in w {
        let s: Vec<&str> = segs.iter().map(String::as_str).collect();
        c.record(DAY, uid, &s);
    }
    c.flush().expect("flush");
    started.elapsed().as_secs_f64()
}

fn redis_opts(url: &str, mode: Mode) -> RedisOptions {
    RedisOptions {
        url: url.into(),
        mode,
        retention_days: 0,
        queue_capacity: 10_000_000,
        max_keys_per_call: 1000,
        max_updates_per_call: 20_000,
        response_timeout: Duration::from_secs(4),
        flush_timeout: Duration::from_secs(600),
    }
}

fn plain_pfadd(url: &str, w: &[(String, Vec<String>)]) -> f64 {
    let mut con = redis::Client::open(url).unwrap().get_connection().unwrap();
    let started = Instant::now();
    for chunk in w.chunks(200) {
        let mut pipe = redis::pipe();
        for (uid, segs) in chunk {
            for s in segs.iter().map(String::as_str).chain(["all"]) {
                pipe.cmd("PFADD")
                    .arg(dmp_stats::redis_counters::key(s, DAY))
                    .arg(uid)
                    .ignore();
            }
        }
        let _: () = pipe.query(&mut con).unwrap();
    }
    started.elapsed().as_secs_f64()
}

/// CPU seconds redis-server has used (`INFO cpu`: user + system).
fn redis_cpu(url: &str) -> f64 {
    let mut con = redis::Client::open(url).unwrap().get_connection().unwrap();
    let info: String = redis::cmd("INFO").arg("cpu").query(&mut con).unwrap();
    info.lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| *k == "used_cpu_sys" || *k == "used_cpu_user")
        .map(|(_, v)| v.trim().parse::<f64>().unwrap_or(0.0))
        .sum()
}

fn flushdb(url: &str) {
    let mut con = redis::Client::open(url).unwrap().get_connection().unwrap();
    let _: () = redis::cmd("FLUSHDB").query(&mut con).unwrap();
}

/// 30 days of 3 segments (40K users a day each, overlapping) and `all`; then 200 queries of
/// "a and b and not c" over the 30 days: p50 and p99 in ms.
fn audience_latency(c: &dyn SegmentCounters, tag: &str) -> (f64, f64) {
    let days = dmp_stats::audience::days(20_261_024, 20_261_122).unwrap();
    let days = &days[days.len() - 30..];
    for (k, day) in days.iter().enumerate() {
        for u in 0..60_000usize {
            let uid = format!("user-{}", u + k * 5_000);
            let mut segs = Vec::new();
            for (s, range) in [
                ("a", 0..40_000),
                ("b", 20_000..60_000),
                ("c", 30_000..35_000),
            ] {
                if range.contains(&u) {
                    segs.push(format!("{tag}{s}"));
                }
            }
            let s: Vec<&str> = segs.iter().map(String::as_str).collect();
            c.record(*day, &uid, &s);
        }
    }
    c.flush().unwrap();
    let expr = dmp_stats::audience::parse(&format!("{tag}a and {tag}b and not {tag}c")).unwrap();
    let mut times: Vec<f64> = (0..200)
        .map(|_| {
            let started = Instant::now();
            dmp_stats::audience::estimate(c, &expr, days).unwrap();
            started.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    times.sort_by(|a, b| a.total_cmp(b));
    (times[100], times[197])
}

fn main() {
    if std::env::args().any(|a| a == "--test") {
        return;
    }
    let users = env("DMP_BENCH_USERS", 1_000_000);
    let per_user = env("DMP_BENCH_SEGMENTS", 5);
    let updates = (users * (per_user + 1)) as f64;
    let w = workload(users, per_user, "");
    for (what, lg_k) in [
        ("HLL only", 0u8),
        ("HLL + theta", dmp_stats::theta::DEFAULT_LG_K),
    ] {
        let c = EmbeddedCounters::in_memory().with_theta(lg_k);
        let secs = run(&c, &w);
        // The same users again (they come back during the day): no new sketch memory, and a
        // repeat is a register compare and a threshold compare or a table hit.
        let again = run(&c, &w);
        println!(
            "embedded, {what} (in memory, flushed nowhere): {users} users x {} segments = {updates} updates in {secs:.2} s = {:.1}M updates/s; the same users again: {:.1}M updates/s",
            per_user + 1,
            updates / secs / 1e6,
            updates / again / 1e6
        );
    }
    for (what, lg_k) in [
        ("HLL only", 0u8),
        ("HLL + theta", dmp_stats::theta::DEFAULT_LG_K),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (db, _store) = dmp_store::embedded::open_temp(dir.path()).unwrap();
        let c = EmbeddedCounters::open(&db).unwrap().with_theta(lg_k);
        let (p50, p99) = audience_latency(&c, "q");
        println!(
            "audience, embedded {what} (flushed to disk; the 27 older days' theta sketches read from it): 3 segments x 30 days, \"a and b and not c\": p50 {p50:.2} ms, p99 {p99:.2} ms"
        );
    }
    let Ok(url) = std::env::var("DMP_BENCH_REDIS") else {
        println!("DMP_BENCH_REDIS not set: Redis figures skipped");
        return;
    };
    // Twice each, alternating, on an emptied database. `DMP_BENCH_REDIS_MODES=batched` (a
    // comma-separated subset of batched, per_user, plain) runs only those.
    let only = std::env::var("DMP_BENCH_REDIS_MODES").unwrap_or_default();
    for round in 1..=2 {
        for (tag, name, mode) in [
            ("batched", "batched script", Some(Mode::Batched)),
            (
                "per_user",
                "per-user script (pipelined)",
                Some(Mode::PerUser),
            ),
            ("plain", "plain pipelined PFADD", None),
        ] {
            if !only.is_empty() && !only.split(',').any(|m| m == tag) {
                continue;
            }
            flushdb(&url);
            let cpu_before = redis_cpu(&url);
            let secs = match mode {
                Some(m) => {
                    let c = RedisCounters::open(redis_opts(&url, m)).unwrap();
                    run(&c, &w)
                }
                None => plain_pfadd(&url, &w),
            };
            let busy = (redis_cpu(&url) - cpu_before) / secs;
            println!(
                "redis, round {round}, {name}: {updates} updates in {secs:.2} s = {:.2}M updates/s (redis-server busy {:.0}% of a core)",
                updates / secs / 1e6,
                busy * 100.0
            );
        }
    }
    flushdb(&url);
    let c = RedisCounters::open(redis_opts(&url, Mode::Batched)).unwrap();
    let (p50, p99) = audience_latency(&c, "q");
    println!(
        "audience, redis: 3 segments x 30 days, \"a and b and not c\": p50 {p50:.2} ms, p99 {p99:.2} ms"
    );
    drop(c);
    flushdb(&url);
}
