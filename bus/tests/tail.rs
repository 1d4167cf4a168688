//! The embedded bus's in-memory tail (`bus.tail_cache_mb`): a consumer at the end of a partition
//! reads from memory, one further back from the database, and both get every record, in order,
//! as produced; the tail stays within its budget; with a budget of 0 every read goes to the
//! database. Reads are counted by source through the bus's own metric, with a recorder of this
//! test's (its own process).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dmp_bus::embedded::EmbeddedBus;
use dmp_bus::{Bus, Consumer, ProduceRecord};
use dmp_store::embedded::EmbeddedDatabase;
use dmp_store::Schema;
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};

/// Counts `dmp_bus_tail_reads_total` by `source`.
#[derive(Default)]
struct Reads {
    memory: Arc<AtomicU64>,
    database: Arc<AtomicU64>,
}

impl Recorder for Reads {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        if key.name() != dmp_bus::metrics::TAIL_READS {
            return Counter::noop();
        }
        match key
            .labels()
            .find(|l| l.key() == "source")
            .map(|l| l.value())
        {
            Some("memory") => Counter::from_arc(self.memory.clone()),
            Some("database") => Counter::from_arc(self.database.clone()),
            other => panic!("unexpected source {other:?}"),
        }
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

fn open(dir: &std::path::Path, tail_mb: u64) -> EmbeddedBus {
    let mut cfg = dmp_core::Config::defaults();
    cfg.bus.tail_cache_mb = tail_mb;
    let db = EmbeddedDatabase::open(dir, &cfg.embedded, &Schema::dmp_default()).unwrap();
    EmbeddedBus::open(&db, &cfg.bus).unwrap()
}

/// partition -> (offset, key, value) in offset order.
type Log = BTreeMap<u32, Vec<(u64, Vec<u8>, Vec<u8>)>>;

/// Reads until `consumer` has `want` records (or fails after 20 s without one).
async fn read(consumer: &mut Box<dyn Consumer>, log: &mut Log, want: usize) {
    let mut have: usize = log.values().map(Vec::len).sum();
    let mut idle = 0;
    while have < want {
        let got = consumer
            .poll(700, Duration::from_millis(100))
            .await
            .unwrap();
        idle = if got.is_empty() { idle + 1 } else { 0 };
        assert!(idle < 200, "stuck at {have} of {want} records");
        have += got.len();
        for r in got {
            log.entry(r.partition)
                .or_default()
                .push((r.offset, r.key, r.value));
        }
    }
    assert_eq!(have, want, "more records than produced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_small_tail_when_consumers_read_at_the_end_and_from_the_start_then_both_get_every_record_as_produced(
) {
    let reads = Reads::default();
    let (memory, database) = (reads.memory.clone(), reads.database.clone());
    metrics::set_global_recorder(reads).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bus = open(dir.path(), 1);
    bus.create_topic("t", 4).await.unwrap();
    let mut live = bus.consumer("live", &["t".to_string()]).await.unwrap();
    // 40 batches of 100 records of about 1 KiB: 4 MiB through a 1 MiB tail.
    let mut produced = Log::new();
    let mut live_log = Log::new();
    for batch in 0..40u64 {
        let records: Vec<ProduceRecord> = (0..100u64)
            .map(|i| {
                let n = batch * 100 + i;
                let value: Vec<u8> = format!("{n:08}").bytes().cycle().take(1000).collect();
                ProduceRecord::new(format!("key-{}", n % 37), value)
            })
            .collect();
        let delivered = bus.produce("t", records.clone()).await.unwrap();
        for (d, r) in delivered.iter().zip(records) {
            produced
                .entry(d.partition)
                .or_default()
                .push((d.offset, r.key, r.value));
        }
        read(&mut live, &mut live_log, (batch as usize + 1) * 100).await;
        assert!(
            bus.tail_bytes() <= 1 << 20,
            "{} over the budget",
            bus.tail_bytes()
        );
    }
    for part in produced.values_mut() {
        part.sort();
    }
    assert_eq!(live_log, produced, "the consumer at the end");
    assert!(
        bus.tail_bytes() > 512 << 10,
        "the tail holds {}",
        bus.tail_bytes()
    );
    let (at_end_memory, at_end_database) = (
        memory.load(Ordering::Relaxed),
        database.load(Ordering::Relaxed),
    );
    assert!(
        at_end_memory > 40 && at_end_database == 0,
        "the consumer at the end read {at_end_memory} times from memory, {at_end_database} from the database"
    );

    // From the start: the database first (the tail holds the last MiB), then the tail.
    let mut late = bus.consumer("late", &["t".to_string()]).await.unwrap();
    let mut late_log = Log::new();
    read(&mut late, &mut late_log, 4000).await;
    assert_eq!(late_log, produced, "the consumer from the start");
    assert!(
        database.load(Ordering::Relaxed) > 0,
        "no read went to the database"
    );
    assert!(
        memory.load(Ordering::Relaxed) > at_end_memory,
        "the consumer from the start never reached the tail"
    );
    drop((live, late));

    // Without a tail: every read from the database, the same records.
    let dir = tempfile::tempdir().unwrap();
    let bus = open(dir.path(), 0);
    bus.create_topic("t", 4).await.unwrap();
    let before = memory.load(Ordering::Relaxed);
    for part in produced.values() {
        let records: Vec<ProduceRecord> = part
            .iter()
            .map(|(_, k, v)| ProduceRecord::new(k.clone(), v.clone()))
            .collect();
        bus.produce("t", records).await.unwrap();
    }
    let mut none = bus.consumer("none", &["t".to_string()]).await.unwrap();
    let mut none_log = Log::new();
    read(&mut none, &mut none_log, 4000).await;
    assert_eq!(none_log, produced, "without a tail");
    assert_eq!(memory.load(Ordering::Relaxed), before, "a read from memory");
    assert_eq!(bus.tail_bytes(), 0);
}
