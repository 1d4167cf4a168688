//! The Redis counters against real redis-servers: the conformance suite in both modes, keys made
//! dense early with the registers of the same PFADDs, scripts
//! lost to `SCRIPT FLUSH` and to a restart, and Redis down (the segmenter's calls never block,
//! updates queue within the bound, flush reports the outage, everything queued lands after).
//! Needs `DMP_TEST_REDIS=redis://127.0.0.1:PORT` (scripts/test.sh starts one) and `redis-server`
//! on the PATH (the restart tests start their own).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dmp_stats::redis_counters::{Mode, RedisCounters, RedisOptions};
use dmp_stats::SegmentCounters;

fn shared_url() -> String {
    std::env::var("DMP_TEST_REDIS").expect("DMP_TEST_REDIS is not set (run scripts/test.sh)")
}

fn options(url: &str, mode: Mode) -> RedisOptions {
    RedisOptions {
        url: url.to_string(),
        mode,
        retention_days: 30,
        queue_capacity: 100_000,
        max_keys_per_call: 1000,
        max_updates_per_call: 20_000,
        response_timeout: Duration::from_millis(2000),
        flush_timeout: Duration::from_secs(10),
    }
}

fn prefix(tag: &str) -> String {
    format!("t{}{tag}:", std::process::id())
}

#[test]
#[ignore = "needs a redis-server: run scripts/test.sh"]
fn given_batched_script_when_counting_then_conformance_suite_passes() {
    let c = RedisCounters::open(options(&shared_url(), Mode::Batched)).unwrap();
    let failed = dmp_stats::conformance::run(&c, &prefix("b"));
    assert!(failed.is_empty(), "{failed:?}");
}

#[test]
#[ignore = "needs a redis-server: run scripts/test.sh"]
fn given_per_user_script_when_counting_then_conformance_suite_passes() {
    let c = RedisCounters::open(options(&shared_url(), Mode::PerUser)).unwrap();
    let failed = dmp_stats::conformance::run(&c, &prefix("p"));
    assert!(failed.is_empty(), "{failed:?}");
}

#[test]
#[ignore = "needs a redis-server: run scripts/test.sh"]
fn given_keys_when_written_then_they_expire_after_retention() {
    let url = shared_url();
    let c = RedisCounters::open(options(&url, Mode::Batched)).unwrap();
    let seg = format!("{}ttl", prefix("e"));
    c.record(20_261_122, "u", &[&seg]);
    c.flush().unwrap();
    let mut con = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let at: i64 = redis::cmd("EXPIRETIME")
        .arg(dmp_stats::redis_counters::key(&seg, 20_261_122))
        .query(&mut con)
        .unwrap();
    // 2026-11-22 00:00 UTC + 31 days.
    assert_eq!(at, 1_795_305_600 + 31 * 86_400);
}

#[test]
#[ignore = "needs a redis-server: run scripts/test.sh"]
fn given_many_users_per_call_when_counted_then_keys_go_dense_early_with_the_same_registers() {
    let url = shared_url();
    let c = RedisCounters::open(options(&url, Mode::Batched)).unwrap();
    let (big, slow) = (
        format!("{}big", prefix("d")),
        format!("{}slow", prefix("d")),
    );
    let day = 20_261_122;
    let (mut big_truth, mut slow_truth) = (dmp_stats::Hll::new(), dmp_stats::Hll::new());
    // 1000 users in one call: created dense.
    for i in 0..1000 {
        let uid = format!("b{i}");
        c.record(day, &uid, &[&big]);
        big_truth.add(uid.as_bytes());
    }
    c.flush().unwrap();
    // 400 users 4 per call stay sparse (PFADD's encoding); then 300 more at once (calls of many
    // users) turn the sketch dense by a merge, long before Redis would (3000 bytes).
    let mut con = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let get = |con: &mut redis::Connection, seg: &str| -> Vec<u8> {
        redis::cmd("GET")
            .arg(dmp_stats::redis_counters::key(seg, day))
            .query(con)
            .unwrap()
    };
    for i in 0..700 {
        if i == 400 {
            let sparse = get(&mut con, &slow);
            assert_eq!(sparse[4], 1, "4 users a call leave the key sparse");
            assert!(sparse.len() > 300, "{} bytes", sparse.len());
        }
        let uid = format!("s{i}");
        c.record(day, &uid, &[&slow]);
        slow_truth.add(uid.as_bytes());
        if i % 4 == 3 && i < 400 {
            c.flush().unwrap();
        }
    }
    c.flush().unwrap();
    for (seg, truth) in [(&big, &big_truth), (&slow, &slow_truth)] {
        let bytes = get(&mut con, seg);
        assert_eq!(bytes[4], 0, "{seg} is dense");
        let h = dmp_stats::RedisHll::from_bytes(&bytes).unwrap();
        assert_eq!(
            &h.to_hll(),
            truth,
            "{seg}: the registers of the same PFADDs"
        );
        let count: u64 = redis::cmd("PFCOUNT")
            .arg(dmp_stats::redis_counters::key(seg, day))
            .query(&mut con)
            .unwrap();
        assert_eq!(count, truth.count(), "{seg}");
    }
    let scratch: bool = redis::cmd("EXISTS")
        .arg("dmp:hll:dense-empty")
        .query(&mut con)
        .unwrap();
    assert!(!scratch, "the merge's scratch key is gone");
}

fn script_flush(url: &str) {
    let mut con = redis::Client::open(url).unwrap().get_connection().unwrap();
    let _: () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut con).unwrap();
}

#[test]
#[ignore = "needs a redis-server: run scripts/test.sh"]
fn given_script_flush_when_counting_then_scripts_are_loaded_again() {
    let url = shared_url();
    for mode in [Mode::Batched, Mode::PerUser] {
        let c = RedisCounters::open(options(&url, mode)).unwrap();
        let seg = format!("{}noscript{mode:?}", prefix("n"));
        c.record(20_261_122, "before", &[&seg]);
        c.flush().unwrap();
        script_flush(&url);
        c.record(20_261_122, "after", &[&seg]);
        c.flush().unwrap();
        assert_eq!(c.count(&seg, 20_261_122).unwrap(), 2, "{mode:?}");
    }
}

/// A redis-server of our own (appendonly, so a restart keeps the data).
struct Server {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Server {
    fn start(port: u16, dir: tempfile::TempDir) -> Server {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on the PATH");
        let url = format!("redis://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let up = redis::Client::open(url.as_str())
                .and_then(|c| c.get_connection())
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if up.is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Server { child, port, dir }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// kill -9, keeping the data directory.
    fn kill(mut self) -> (u16, tempfile::TempDir) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = tempfile::tempdir().unwrap();
        let dir = std::mem::replace(&mut self.dir, dir);
        (self.port, dir)
    }
}

impl Drop for Server {
    /// Never leaves a redis-server behind, whatever the test's outcome.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
#[ignore = "needs redis-server on the PATH: run scripts/test.sh"]
fn given_redis_restart_when_counting_then_nothing_blocks_and_queued_updates_land_after() {
    let server = Server::start(free_port(), tempfile::tempdir().unwrap());
    let mut opts = options(&server.url(), Mode::Batched);
    opts.queue_capacity = 300;
    opts.flush_timeout = Duration::from_millis(500);
    opts.response_timeout = Duration::from_millis(300);
    let c = RedisCounters::open(opts).unwrap();
    let day = 20_261_122;
    for i in 0..100 {
        c.record(day, &format!("a{i}"), &["seg"]);
    }
    c.flush().unwrap();
    let (port, dir) = server.kill();
    // Down: recording never blocks; flush says what is pending; past the bound, updates drop.
    // The first user goes into the call in hand (retried until Redis is back)...
    c.record(day, "b-first", &["seg"]);
    std::thread::sleep(Duration::from_millis(300));
    // ...the next 300 fill the queue, and the other 700 are dropped.
    let started = Instant::now();
    for i in 0..1000 {
        c.record(day, &format!("b{i}"), &["seg"]);
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "recording blocked for {:?} while redis was down",
        started.elapsed()
    );
    let e = c.flush().unwrap_err().to_string();
    assert!(e.contains("not yet counted"), "{e}");
    // Back (an empty script cache): the queued users are written, the dropped ones are not.
    // (The writer retries with backoff; the segmenter calls flush at every commit tick.)
    let server = Server::start(port, dir);
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = c.flush() {
        assert!(Instant::now() < deadline, "never caught up: {e}");
    }
    let n = c.count("seg", day).unwrap();
    // 100 before, the one in hand and the queue's 300 (within HLL error).
    assert!((389..=413).contains(&n), "{n} counted, expected about 401");
    drop(c);
    drop(server);
}
