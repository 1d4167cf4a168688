//! kill -9 of a process writing to the embedded bus loses nothing it acknowledged.
//!
//! The test re-runs its own binary as a child (`crash_child`, ignored in normal runs) that
//! produces batches and, after each acknowledgement, prints the acknowledged values to stdout:
//! that log is the independent oracle. The parent SIGKILLs the child at a random moment, reopens
//! the database, reads the whole topic with a fresh group and checks every acknowledged value is
//! there exactly once, that offsets are contiguous (none reused after recovery) and that the
//! child's last acknowledged group commit survived. Three crash cycles on the same data dir.

#[path = "../../testsupport/kill9.rs"]
mod kill9;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::time::Duration;

use dmp_bus::embedded::EmbeddedBus;
use dmp_bus::{Bus, ProduceRecord, TopicPartition};
use dmp_store::embedded::EmbeddedDatabase;
use dmp_store::Schema;

const TOPIC: &str = "crash.events";
const GROUP: &str = "crash-group";

fn open(dir: &std::path::Path) -> EmbeddedBus {
    let cfg = dmp_core::Config::defaults();
    let db = EmbeddedDatabase::open(dir, &cfg.embedded, &Schema::dmp_default()).unwrap();
    EmbeddedBus::open(&db, &cfg.bus).unwrap()
}

/// The child: produces until killed. Only runs when the parent sets `DMP_CRASH_DIR`.
#[tokio::test]
#[ignore = "child process of given_writer_killed_when_reopened_then_every_acknowledged_record_is_there"]
async fn crash_child() {
    let dir = std::env::var("DMP_CRASH_DIR").expect("run by the crash test");
    let cycle: u64 = std::env::var("DMP_CRASH_CYCLE").unwrap().parse().unwrap();
    let bus = open(std::path::Path::new(&dir));
    bus.create_topic(TOPIC, 4).await.unwrap();
    let mut consumer = bus.consumer(GROUP, &[TOPIC.to_string()]).await.unwrap();
    let mut stdout = std::io::stdout();
    for batch in 0u64.. {
        let records: Vec<ProduceRecord> = (0..50)
            .map(|i| {
                let v = format!("c{cycle}-b{batch}-i{i}");
                ProduceRecord::new(format!("user-{}", (batch * 50 + i) % 97), v)
            })
            .collect();
        let values: Vec<String> = records
            .iter()
            .map(|r| String::from_utf8(r.value.clone()).unwrap())
            .collect();
        bus.produce(TOPIC, records).await.unwrap();
        writeln!(stdout, "ack {}", values.join(" ")).unwrap();
        // Consume a little and commit what was read, acknowledging the commit too.
        let got = consumer.poll(200, Duration::from_millis(1)).await.unwrap();
        let mut marks: BTreeMap<u32, u64> = BTreeMap::new();
        for r in &got {
            marks.insert(r.partition, r.offset + 1);
        }
        let commits: Vec<(TopicPartition, u64)> = marks
            .iter()
            .map(|(p, o)| (TopicPartition::new(TOPIC, *p), *o))
            .collect();
        consumer.commit(&commits).await.unwrap();
        for (p, o) in marks {
            writeln!(stdout, "commit {p} {o}").unwrap();
        }
        stdout.flush().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_writer_killed_when_reopened_then_every_acknowledged_record_is_there() {
    let dir = tempfile::tempdir().unwrap();
    let mut acked: BTreeSet<String> = BTreeSet::new();
    let mut committed: BTreeMap<u32, u64> = BTreeMap::new();
    for cycle in 0..3u64 {
        let lines = kill9::run_and_kill(dir.path(), cycle);
        let before = acked.len();
        for l in lines.iter() {
            if let Some(rest) = l.strip_prefix("ack ") {
                acked.extend(rest.split(' ').map(str::to_string));
            } else if let Some(rest) = l.strip_prefix("commit ") {
                let mut it = rest.split(' ');
                let p: u32 = it.next().unwrap().parse().unwrap();
                let o: u64 = it.next().unwrap().parse().unwrap();
                committed.insert(p, o);
            }
        }
        assert!(
            acked.len() > before,
            "cycle {cycle}: the child acknowledged nothing"
        );
    }

    let bus = open(dir.path());
    let offsets = bus.offsets(TOPIC).await.unwrap();
    let mut c = bus
        .consumer("verifier", &[TOPIC.to_string()])
        .await
        .unwrap();
    let total: u64 = offsets.iter().map(|o| o.high - o.low).sum();
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    let mut per_partition: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    let mut read = 0u64;
    while read < total {
        let got = c.poll(5000, Duration::from_secs(2)).await.unwrap();
        assert!(!got.is_empty(), "read {read} of {total} records");
        for r in got {
            read += 1;
            *seen.entry(String::from_utf8(r.value).unwrap()).or_default() += 1;
            per_partition.entry(r.partition).or_default().push(r.offset);
        }
    }
    let missing: Vec<&String> = acked.iter().filter(|v| !seen.contains_key(*v)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged records lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert!(seen.values().all(|n| *n == 1), "a record is stored twice");
    for (p, offs) in per_partition {
        assert!(
            offs.windows(2).all(|w| w[1] == w[0] + 1),
            "partition {p} offsets not contiguous"
        );
    }
    let stored = bus.committed(GROUP, TOPIC).await.unwrap();
    for (p, o) in committed {
        let s = stored[p as usize].expect("an acknowledged commit was lost");
        assert!(s >= o, "partition {p}: committed {s} < acknowledged {o}");
    }
    println!(
        "{} acknowledged records of {} stored survived 3 kill -9 cycles",
        acked.len(),
        total
    );
}
