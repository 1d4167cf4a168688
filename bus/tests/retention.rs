//! Retention of the embedded bus: whole segments older than `retention_hours` or beyond
//! `retention_bytes` are deleted, never the newest one; readers and seeks skip what is gone;
//! the new low offset survives a restart.

use std::time::Duration;

use dmp_bus::embedded::EmbeddedBus;
use dmp_bus::{Bus, ProduceRecord};
use dmp_core::clock::{now_ms, DAY_MS};
use dmp_store::embedded::EmbeddedDatabase;
use dmp_store::Schema;

fn open(dir: &std::path::Path, hours: u64, bytes: u64) -> EmbeddedBus {
    let mut cfg = dmp_core::Config::defaults();
    cfg.bus.retention_hours = hours;
    cfg.bus.retention_bytes = bytes;
    cfg.bus.segment_records = 1024;
    let db = EmbeddedDatabase::open(dir, &cfg.embedded, &Schema::dmp_default()).unwrap();
    EmbeddedBus::open(&db, &cfg.bus).unwrap()
}

fn stamped(n: usize, ts: i64, size: usize) -> Vec<ProduceRecord> {
    (0..n)
        .map(|i| ProduceRecord {
            key: b"one-partition".to_vec(),
            value: vec![b'v'; size.max(8)]
                .into_iter()
                .enumerate()
                .map(|(j, b)| {
                    if j < 8 {
                        (i as u64).to_be_bytes()[j]
                    } else {
                        b
                    }
                })
                .collect(),
            timestamp: Some(ts),
        })
        .collect()
}

#[tokio::test]
async fn given_old_segments_when_retention_runs_then_only_recent_records_remain() {
    let dir = tempfile::tempdir().unwrap();
    let now = now_ms();
    {
        let bus = open(dir.path(), 24, 1 << 40);
        bus.create_topic("r", 1).await.unwrap();
        // 5000 records ten days old in chunks of 1000 (segments hold the chunks whose first offset
        // falls in them: 0 and 1000 in [0, 1024), 2000 in [1024, 2048), …), then 100 fresh ones.
        for _ in 0..5 {
            bus.produce("r", stamped(1000, now - 10 * DAY_MS, 50))
                .await
                .unwrap();
        }
        bus.produce("r", stamped(100, now, 50)).await.unwrap();
        let deleted = bus.enforce_retention(now).unwrap();
        assert_eq!(
            deleted, 5000,
            "every old segment goes, the one holding fresh data stays"
        );
        let o = bus.offsets("r").await.unwrap()[0];
        assert_eq!((o.low, o.high), (5000, 5100));
        // A new group starts at the new low.
        let mut c = bus.consumer("g", &["r".to_string()]).await.unwrap();
        let got = c.poll(10_000, Duration::from_secs(1)).await.unwrap();
        assert_eq!(got.first().map(|r| r.offset), Some(5000));
        assert_eq!(got.len(), 100);
        c.close().await.unwrap();
        // A seek to a time before everything kept lands on the low offset.
        assert_eq!(
            bus.offsets_for_time("r", now - 20 * DAY_MS).await.unwrap(),
            vec![5000]
        );
        assert_eq!(
            bus.enforce_retention(now).unwrap(),
            0,
            "retention is idempotent"
        );
    }
    let bus = open(dir.path(), 24, 1 << 40);
    let o = bus.offsets("r").await.unwrap()[0];
    assert_eq!(
        (o.low, o.high),
        (5000, 5100),
        "low and high survive a restart"
    );
    let d = bus.produce("r", stamped(1, now, 50)).await.unwrap();
    assert_eq!(d[0].offset, 5100);
}

#[tokio::test]
async fn given_partition_over_its_byte_bound_when_retention_runs_then_oldest_segments_go() {
    let dir = tempfile::tempdir().unwrap();
    let now = now_ms();
    let bus = open(dir.path(), 24, 1 << 20);
    bus.create_topic("s", 1).await.unwrap();
    // 6144 records of 1 KiB = 6 segments of about 1 MiB each, all fresh.
    for _ in 0..6 {
        bus.produce("s", stamped(1024, now, 1024)).await.unwrap();
    }
    let deleted = bus.enforce_retention(now).unwrap();
    assert_eq!(deleted, 5 * 1024, "only the newest segment fits in 1 MiB");
    let o = bus.offsets("s").await.unwrap()[0];
    assert_eq!((o.low, o.high), (5 * 1024, 6 * 1024));
    let mut c = bus.consumer("g", &["s".to_string()]).await.unwrap();
    let got = c.poll(10_000, Duration::from_secs(1)).await.unwrap();
    assert_eq!(got.len(), 1024);
    assert_eq!(got[0].offset, 5 * 1024);
    assert_eq!(&got[0].value[..8], &0u64.to_be_bytes());
}
