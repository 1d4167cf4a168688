//! kill -9 of a process counting into the embedded counters loses nothing it flushed.
//!
//! The test re-runs its own binary as a child (`crash_child`, ignored in normal runs) that records
//! users into two days (today, written in memory, and a day ten days back, whose theta sketch
//! leaves memory at every flush and is read back by the next late user), flushes, and after each
//! flush prints the users it covers: that log is the independent oracle. The parent SIGKILLs the
//! child at a random moment, reopens the database and checks, for every acknowledged user, that
//! the HyperLogLog register it sets is there and that the theta sketch holds its sample hash
//! when it is below the sketch's threshold (a theta sketch holds every element below it). Three
//! crash cycles on the same data dir; k = 4096, so the sketches go from exact to sampling.

#[path = "../../testsupport/kill9.rs"]
mod kill9;

use std::io::Write;

use dmp_stats::hll::{hash_of, register_of};
use dmp_stats::theta::sample_hash;
use dmp_stats::{day_of, days_before, EmbeddedCounters, SegmentCounters};
use dmp_store::embedded::EmbeddedDatabase;
use dmp_store::Schema;

const LG_K: u8 = 12;

fn open(dir: &std::path::Path) -> (EmbeddedDatabase, EmbeddedCounters) {
    let cfg = dmp_core::Config::defaults();
    let db = EmbeddedDatabase::open(dir, &cfg.embedded, &Schema::dmp_default()).unwrap();
    let c = EmbeddedCounters::open(&db).unwrap().with_theta(LG_K);
    (db, c)
}

fn days() -> [u32; 2] {
    let today = day_of(dmp_core::clock::now_ms());
    [today, days_before(today, 10)]
}

/// The child: counts until killed. Only runs when the parent sets `DMP_CRASH_DIR`.
#[test]
#[ignore = "child process of given_counting_killed_when_reopened_then_every_flushed_user_is_counted"]
fn crash_child() {
    let dir = std::env::var("DMP_CRASH_DIR").expect("run by the crash test");
    let cycle: u64 = std::env::var("DMP_CRASH_CYCLE").unwrap().parse().unwrap();
    let (_db, c) = open(std::path::Path::new(&dir));
    let [today, old] = days();
    let mut stdout = std::io::stdout();
    for batch in 0u64.. {
        let users: Vec<String> = (0..300)
            .map(|i| format!("c{cycle}-b{batch}-u{i}"))
            .collect();
        for (i, u) in users.iter().enumerate() {
            c.record(today, u, &["cats"]);
            if i % 10 == 0 {
                c.record(old, u, &["cats"]);
            }
        }
        c.flush().unwrap();
        writeln!(stdout, "ack {batch} {}", users.join(" ")).unwrap();
        stdout.flush().unwrap();
    }
}

#[test]
fn given_counting_killed_when_reopened_then_every_flushed_user_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let mut acked: Vec<String> = Vec::new();
    for cycle in 0..3u64 {
        let lines = kill9::run_and_kill(dir.path(), cycle);
        let before = acked.len();
        for l in &lines {
            let mut words = l.split(' ');
            if words.next() == Some("ack") {
                words.next();
                acked.extend(words.map(str::to_string));
            }
        }
        assert!(acked.len() > before, "cycle {cycle} acknowledged nothing");
        let (_db, c) = open(dir.path());
        let [today, old] = days();
        for (day, every) in [(today, 1), (old, 10)] {
            let hll = c.sketch("cats", day).unwrap().expect("a sketch");
            let theta = c.theta("cats", day).unwrap().expect("a theta sketch");
            let mut sampled = 0;
            for (n, u) in acked.iter().enumerate() {
                // The child records every user today and every tenth of a batch on the old day.
                let i: usize = u.rsplit_once("-u").unwrap().1.parse().unwrap();
                if day == old && !i.is_multiple_of(every) {
                    continue;
                }
                let (reg, v) = register_of(u.as_bytes());
                assert!(
                    hll.registers()[reg] >= v,
                    "cycle {cycle}, day {day}: user {n} ({u}) missing from the HyperLogLog"
                );
                let s = sample_hash(hash_of(u.as_bytes()));
                if s < theta.theta() {
                    sampled += 1;
                    assert!(
                        theta.hashes().binary_search(&s).is_ok(),
                        "cycle {cycle}, day {day}: user {u} below theta but not in the sketch"
                    );
                }
            }
            assert!(sampled > 0, "cycle {cycle}, day {day}: nothing sampled");
        }
        let t = c.theta("cats", today).unwrap().unwrap();
        if acked.len() > 6 * 1024 {
            assert!(!t.is_exact(), "past 1.5k users the sketch samples");
        }
    }
}
