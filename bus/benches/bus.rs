#![allow(missing_docs)] // criterion_group! generates undocumented functions
//! Bus benchmarks (issue: embedded produce >= 500K records/s with 100-byte values in batches of
//! 1000, consume >= 1M records/s on one core; the Kafka backend against the local broker reported
//! side by side in the same run).
//!
//! `cargo bench -p dmp-bus --bench bus`; set `DMP_BENCH_KAFKA=host:port` to add the Kafka rows.
//! Each async call runs on a current-thread runtime: the figures are for one core of the
//! application (fjall's own flush/compaction threads and librdkafka's threads come on top).

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion, Throughput};
use dmp_bus::embedded::EmbeddedBus;
use dmp_bus::{Bus, ProduceRecord};
use dmp_store::embedded::EmbeddedDatabase;
use dmp_store::Schema;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH: usize = 1000;
const CONSUME_PER_ITER: usize = 100_000;

fn batch(n: &mut u64) -> Vec<ProduceRecord> {
    (0..BATCH)
        .map(|_| {
            *n += 1;
            ProduceRecord::new(format!("user-{:08}", *n % 1_000_003), vec![b'x'; 100])
        })
        .collect()
}

fn bench_backend(c: &mut Criterion, name: &str, bus: Arc<dyn Bus>, preload: usize) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let run = dmp_core::clock::now_ms();
    let topic = format!("bench.produce-{run}");
    rt.block_on(bus.create_topic(&topic, 8)).unwrap();
    let mut g = c.benchmark_group(format!("bus_{name}"));
    g.measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Elements(BATCH as u64));
    let mut n = 0u64;
    g.bench_function("produce_batch_1000x100B", |b| {
        b.iter(|| rt.block_on(bus.produce(&topic, batch(&mut n))).unwrap())
    });

    let topic = format!("bench.consume-{run}");
    rt.block_on(bus.create_topic(&topic, 8)).unwrap();
    for _ in 0..preload / BATCH {
        rt.block_on(bus.produce(&topic, batch(&mut n))).unwrap();
    }
    let per_iter = CONSUME_PER_ITER.min(preload);
    g.throughput(Throughput::Elements(per_iter as u64));
    g.sample_size(10);
    let mut group_n = 0;
    g.bench_function(format!("consume_{per_iter}"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                group_n += 1;
                let group = format!("bench-{run}-{group_n}");
                total += rt.block_on(async {
                    let mut consumer = bus
                        .consumer(&group, std::slice::from_ref(&topic))
                        .await
                        .unwrap();
                    // The first poll includes joining the group; time from the first record.
                    let mut read = consumer
                        .poll(10_000, Duration::from_secs(30))
                        .await
                        .unwrap()
                        .len();
                    let start = Instant::now();
                    while read < per_iter {
                        read += consumer
                            .poll(10_000, Duration::from_secs(10))
                            .await
                            .unwrap()
                            .len();
                    }
                    let took = start.elapsed();
                    consumer.close().await.unwrap();
                    took
                });
            }
            total
        })
    });
    g.finish();
}

/// A consumer following its producer, as the pipeline's do (the storage writer, the segmenter):
/// each iteration produces a batch and polls it back, on a database whose log already holds
/// 2M records of another topic (about 250 MB: tables that overlap every partition's range).
fn bench_follow(c: &mut Criterion, name: &str, bus: Arc<dyn Bus>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let run = dmp_core::clock::now_ms();
    let mut n = 0u64;
    let other = format!("bench.other-{run}");
    rt.block_on(bus.create_topic(&other, 8)).unwrap();
    for _ in 0..2_000_000 / BATCH {
        rt.block_on(bus.produce(&other, batch(&mut n))).unwrap();
    }
    let topic = format!("bench.follow-{run}");
    rt.block_on(bus.create_topic(&topic, 8)).unwrap();
    let mut consumer = rt
        .block_on(bus.consumer(&format!("follow-{run}"), std::slice::from_ref(&topic)))
        .unwrap();
    let mut g = c.benchmark_group(format!("bus_{name}"));
    g.measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("produce_and_consume_at_the_end_1000x100B", |b| {
        b.iter(|| {
            rt.block_on(async {
                bus.produce(&topic, batch(&mut n)).await.unwrap();
                let mut read = 0;
                while read < BATCH {
                    read += consumer
                        .poll(10_000, Duration::from_secs(10))
                        .await
                        .unwrap()
                        .len();
                }
            })
        })
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dmp_core::Config::defaults();
    let db = EmbeddedDatabase::open(dir.path(), &cfg.embedded, &Schema::dmp_default()).unwrap();
    let bus: Arc<dyn Bus> = Arc::new(EmbeddedBus::open(&db, &cfg.bus).unwrap());
    bench_follow(c, "embedded", bus.clone());
    bench_backend(c, "embedded", bus, 1_000_000);
    // The same, every read from the database (`bus.tail_cache_mb = 0`), side by side.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = dmp_core::Config::defaults();
    cfg.bus.tail_cache_mb = 0;
    let db = EmbeddedDatabase::open(dir.path(), &cfg.embedded, &Schema::dmp_default()).unwrap();
    let bus: Arc<dyn Bus> = Arc::new(EmbeddedBus::open(&db, &cfg.bus).unwrap());
    bench_follow(c, "embedded_no_tail", bus);
    if let Ok(broker) = std::env::var("DMP_BENCH_KAFKA") {
        let bus: Arc<dyn Bus> = Arc::new(
            dmp_bus::kafka::KafkaBus::from_url(&format!("kafka://{broker}"), &cfg.kafka).unwrap(),
        );
        bench_backend(c, "kafka", bus, 200_000);
    }
}

criterion_group!(bus_benches, benches);

fn main() {
    bus_benches();
    Criterion::default().configure_from_args().final_summary();
}
