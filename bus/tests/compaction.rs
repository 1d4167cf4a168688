//! Compaction of the embedded bus: a compacted topic keeps the newest record of each key at its
//! original offset, drops tombstones once they are older than `tombstone_retention_hours`, runs
//! by itself only past the dirty threshold, survives a restart, is never cut by age or size
//! retention, and a reader polling while it runs still gets every key's newest record in order.

use std::collections::HashMap;
use std::time::Duration;

use dmp_bus::embedded::EmbeddedBus;
use dmp_bus::{Bus, Cleanup, ProduceRecord, Record};
use dmp_core::clock::{now_ms, DAY_MS};
use dmp_store::embedded::EmbeddedDatabase;
use dmp_store::Schema;

fn open(dir: &std::path::Path, min_dirty: u64) -> EmbeddedBus {
    let mut cfg = dmp_core::Config::defaults();
    cfg.bus.retention_hours = 1;
    cfg.bus.retention_bytes = 1 << 20;
    cfg.bus.segment_records = 1024;
    cfg.bus.compact_min_dirty_records = min_dirty;
    cfg.bus.tombstone_retention_hours = 24;
    let db = EmbeddedDatabase::open(dir, &cfg.embedded, &Schema::dmp_default()).unwrap();
    EmbeddedBus::open(&db, &cfg.bus).unwrap()
}

fn rec(key: &str, value: &str, ts: i64) -> ProduceRecord {
    ProduceRecord {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
        timestamp: Some(ts),
    }
}

/// Every record of `topic` from the start, read by a fresh group (nothing is produced meanwhile,
/// so the first empty poll means the end).
async fn read_all(bus: &EmbeddedBus, topic: &str, group: &str) -> Vec<Record> {
    let mut c = bus.consumer(group, &[topic.to_string()]).await.unwrap();
    let mut out = Vec::new();
    loop {
        let rs = c.poll(10_000, Duration::from_millis(100)).await.unwrap();
        if rs.is_empty() {
            break;
        }
        out.extend(rs);
    }
    c.close().await.unwrap();
    out
}

/// Key -> (offset, value) of the newest record of each key, from what was produced.
type Truth = HashMap<String, (u64, String)>;

async fn produce_rounds(
    bus: &EmbeddedBus,
    topic: &str,
    keys: usize,
    rounds: usize,
    ts: i64,
) -> Truth {
    let mut truth = Truth::new();
    for round in 0..rounds {
        let batch: Vec<ProduceRecord> = (0..keys)
            .filter(|k| round == 0 || k % (round + 1) == 0)
            .map(|k| rec(&format!("u{k}"), &format!("r{round}"), ts))
            .collect();
        let keys_of: Vec<String> = batch
            .iter()
            .map(|r| String::from_utf8(r.key.clone()).unwrap())
            .collect();
        let delivered = bus.produce(topic, batch).await.unwrap();
        for (k, d) in keys_of.into_iter().zip(delivered) {
            truth.insert(k, (d.offset, format!("r{round}")));
        }
    }
    truth
}

fn check_latest(records: &[Record], truth: &Truth) {
    let mut got: HashMap<String, (u64, String)> = HashMap::new();
    let mut last_offset: HashMap<u32, u64> = HashMap::new();
    for r in records {
        if let Some(prev) = last_offset.insert(r.partition, r.offset) {
            assert!(r.offset > prev, "offsets rise within a partition");
        }
        let key = String::from_utf8(r.key.clone()).unwrap();
        assert!(
            got.insert(
                key.clone(),
                (r.offset, String::from_utf8(r.value.clone()).unwrap())
            )
            .is_none(),
            "{key} appears once after compaction"
        );
    }
    assert_eq!(
        &got, truth,
        "exactly the newest record of each key, at its offset"
    );
}

#[tokio::test]
async fn given_rewritten_keys_when_compacted_then_only_the_newest_record_of_each_key_remains() {
    let dir = tempfile::tempdir().unwrap();
    let now = now_ms();
    let truth;
    let high_before;
    {
        let bus = open(dir.path(), 1_000_000);
        assert!(bus
            .create_topic_with("cur", 4, Cleanup::Compact)
            .await
            .unwrap());
        bus.create_topic("plain", 1).await.unwrap();
        // 3000 keys, rewritten in 4 rounds (round r rewrites every (r+1)-th key): 3000 + 1500 +
        // 1000 + 750 records, in chunks of up to 1000 per partition and produce.
        truth = produce_rounds(&bus, "cur", 3000, 4, now).await;
        bus.produce("plain", vec![rec("a", "1", now), rec("a", "2", now)])
            .await
            .unwrap();
        high_before = bus.offsets("cur").await.unwrap();
        assert_eq!(high_before.iter().map(|o| o.high).sum::<u64>(), 6250);
        // Below the dirty threshold nothing runs by itself.
        assert_eq!(bus.compact(now, false).unwrap(), 0);
        let removed = bus.compact(now, true).unwrap();
        assert_eq!(removed, 6250 - 3000, "every replaced record goes");
        check_latest(&read_all(&bus, "cur", "g1").await, &truth);
        assert_eq!(
            read_all(&bus, "plain", "g1").await.len(),
            2,
            "a topic that is not compacted keeps every record"
        );
        // Retention never cuts a compacted topic, even far past its age bound.
        bus.enforce_retention(now + 30 * DAY_MS).unwrap();
        check_latest(&read_all(&bus, "cur", "g2").await, &truth);
        // A second compaction with nothing new changes nothing.
        assert_eq!(bus.compact(now, true).unwrap(), 0);
    }
    // After a restart: the same records, and offsets continue where they were.
    let bus = open(dir.path(), 1_000_000);
    assert_eq!(bus.offsets("cur").await.unwrap(), high_before);
    check_latest(&read_all(&bus, "cur", "g3").await, &truth);
    let d = bus
        .produce("cur", vec![rec("u0", "after", now)])
        .await
        .unwrap();
    let p = d[0].partition as usize;
    assert_eq!(d[0].offset, high_before[p].high, "no offset is reused");
}

#[tokio::test]
async fn given_tombstones_when_compacted_then_they_stay_for_the_retention_and_then_go() {
    let dir = tempfile::tempdir().unwrap();
    let bus = open(dir.path(), 1_000_000);
    bus.create_topic_with("cur", 2, Cleanup::Compact)
        .await
        .unwrap();
    let now = now_ms();
    let mut truth = produce_rounds(&bus, "cur", 100, 1, now).await;
    // Users 0..10 are deleted: a tombstone (empty value) each.
    let tombstones: Vec<ProduceRecord> = (0..10).map(|k| rec(&format!("u{k}"), "", now)).collect();
    let d = bus.produce("cur", tombstones).await.unwrap();
    for (k, d) in (0..10).zip(d) {
        truth.insert(format!("u{k}"), (d.offset, String::new()));
    }
    bus.compact(now, true).unwrap();
    check_latest(&read_all(&bus, "cur", "early").await, &truth);
    // Past the tombstone retention the deleted users are gone altogether.
    bus.produce("cur", vec![rec("u50", "again", now)])
        .await
        .unwrap();
    let later = now + 25 * 3_600_000;
    assert_eq!(
        bus.compact(now + 3_600_000, false).unwrap(),
        0,
        "tombstones within their retention keep their partitions from being due"
    );
    assert_eq!(
        bus.compact(later, false).unwrap(),
        11,
        "past the retention the partitions that kept tombstones are due: 10 tombstones and u50's old record"
    );
    for k in 0..10 {
        truth.remove(&format!("u{k}"));
    }
    let off = read_all(&bus, "cur", "late")
        .await
        .iter()
        .find(|r| r.key == b"u50")
        .map(|r| r.offset)
        .unwrap();
    truth.insert("u50".into(), (off, "again".into()));
    check_latest(&read_all(&bus, "cur", "late2").await, &truth);
}

#[tokio::test]
async fn given_dirty_threshold_when_maintenance_runs_then_compaction_starts_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let bus = open(dir.path(), 500);
    bus.create_topic_with("cur", 1, Cleanup::Compact)
        .await
        .unwrap();
    let now = now_ms();
    produce_rounds(&bus, "cur", 400, 1, now).await;
    assert_eq!(bus.compact(now, false).unwrap(), 0, "400 dirty < 500");
    produce_rounds(&bus, "cur", 400, 1, now).await;
    assert_eq!(bus.compact(now, false).unwrap(), 400, "800 dirty >= 500");
    // Now 400 are kept: the next pass waits for 500 dirty records (more than the 400 kept).
    produce_rounds(&bus, "cur", 400, 1, now).await;
    assert_eq!(bus.compact(now, false).unwrap(), 0);
    produce_rounds(&bus, "cur", 100, 1, now).await;
    assert_eq!(
        bus.compact(now, false).unwrap(),
        500,
        "the third round replaces 400, the fourth 100 of those"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_reader_polling_when_compaction_runs_then_it_still_sees_every_newest_record() {
    let dir = tempfile::tempdir().unwrap();
    let bus = open(dir.path(), 1_000_000);
    bus.create_topic_with("cur", 1, Cleanup::Compact)
        .await
        .unwrap();
    let now = now_ms();
    let mut truth = Truth::new();
    let mut c = bus.consumer("slow", &["cur".to_string()]).await.unwrap();
    let mut seen: HashMap<String, (u64, String)> = HashMap::new();
    let mut last = None;
    for round in 0..20 {
        truth.extend(
            produce_rounds(&bus, "cur", 2000, 1, now)
                .await
                .into_iter()
                .map(|(k, (o, _))| (k, (o, "r0".to_string()))),
        );
        // Compact on another thread while this reader polls in small steps.
        let b = bus.clone();
        let compaction = std::thread::spawn(move || b.compact(now, true).unwrap());
        for _ in 0..(round % 3 + 1) {
            for r in c.poll(300, Duration::from_millis(10)).await.unwrap() {
                assert!(last.is_none_or(|l| r.offset > l), "offsets rise");
                last = Some(r.offset);
                seen.insert(
                    String::from_utf8(r.key.clone()).unwrap(),
                    (r.offset, String::from_utf8(r.value.clone()).unwrap()),
                );
            }
        }
        compaction.join().unwrap();
    }
    loop {
        let rs = c.poll(5000, Duration::from_millis(200)).await.unwrap();
        if rs.is_empty() {
            break;
        }
        for r in rs {
            assert!(last.is_none_or(|l| r.offset > l), "offsets rise");
            last = Some(r.offset);
            seen.insert(
                String::from_utf8(r.key.clone()).unwrap(),
                (r.offset, String::from_utf8(r.value.clone()).unwrap()),
            );
        }
    }
    assert_eq!(
        seen, truth,
        "the reader ends with every key's newest record"
    );
}
