#![allow(missing_docs)] // criterion_group! generates undocumented functions
//! The offset tracker: a record tracked and finished, as the storage writer and the segmenter do
//! for each one (records handed out in offset order over 4 partitions, finished by two workers
//! each in its own order, the watermark asked for every 20,000). Beside it, in the same run, the
//! tracker as it was before 2026-11-24 (the offsets in flight in a `BTreeSet`).
//!
//! `cargo bench -p dmp-bus --bench tracker`

use std::collections::{BTreeSet, HashMap};

use criterion::{criterion_group, Criterion, Throughput};
use dmp_bus::{OffsetTracker, TopicPartition};

/// Records per iteration.
const N: u64 = 100_000;

/// Records as (partition, offset).
type Records = Vec<(u32, u64)>;

/// The order records are handed out and finished in: batches of 1000 handed out round robin
/// over 4 partitions, then finished by two workers (even and odd offsets) interleaved by batch.
fn workload() -> (Records, Records) {
    let mut handed = Vec::new();
    let mut finished = Vec::new();
    let mut next = [0u64; 4];
    for b in 0..N / 1000 {
        let p = (b % 4) as u32;
        let batch: Vec<(u32, u64)> = (0..1000).map(|i| (p, next[p as usize] + i)).collect();
        next[p as usize] += 1000;
        handed.extend(&batch);
        finished.extend(batch.iter().filter(|(_, o)| o % 2 == 1));
        finished.extend(batch.iter().filter(|(_, o)| o % 2 == 0));
    }
    (handed, finished)
}

#[derive(Default)]
struct SetTracker {
    partitions: HashMap<TopicPartition, (BTreeSet<u64>, u64)>,
}

/// What the bench asks of a tracker.
trait Tracker: Default {
    fn track(&mut self, tp: &TopicPartition, o: u64);
    fn done(&mut self, tp: &TopicPartition, o: u64);
    /// Asks for the watermarks (something of them, so the work is not optimised away).
    fn marks(&mut self) -> u64;
}

impl Tracker for OffsetTracker {
    fn track(&mut self, tp: &TopicPartition, o: u64) {
        OffsetTracker::track(self, tp, o);
    }
    fn done(&mut self, tp: &TopicPartition, o: u64) {
        OffsetTracker::done(self, tp, o);
    }
    fn marks(&mut self) -> u64 {
        self.committable().iter().map(|(_, m)| m).sum()
    }
}

impl Tracker for SetTracker {
    fn track(&mut self, tp: &TopicPartition, o: u64) {
        let st = self.partitions.entry(tp.clone()).or_default();
        st.0.insert(o);
        st.1 = st.1.max(o + 1);
    }
    fn done(&mut self, tp: &TopicPartition, o: u64) {
        if let Some(st) = self.partitions.get_mut(tp) {
            st.0.remove(&o);
        }
    }
    fn marks(&mut self) -> u64 {
        self.partitions
            .values()
            .map(|s| s.0.first().copied().unwrap_or(s.1))
            .sum()
    }
}

/// One pass of the workload through a new tracker of type `T`.
fn drive<T: Tracker>(handed: &Records, finished: &Records, tps: &[TopicPartition]) -> u64 {
    let mut t = T::default();
    let mut marks = 0;
    for (i, ((hp, ho), (fp, fo))) in handed.iter().zip(finished).enumerate() {
        t.track(&tps[*hp as usize], *ho);
        t.done(&tps[*fp as usize], *fo);
        if i % 20_000 == 0 {
            marks += t.marks();
        }
    }
    marks
}

fn bench(c: &mut Criterion) {
    let (handed, finished) = workload();
    let tps: Vec<TopicPartition> = (0..4)
        .map(|p| TopicPartition::new("dmp.user-changes", p))
        .collect();
    let mut g = c.benchmark_group("tracker");
    g.throughput(Throughput::Elements(N));
    g.bench_function("ring", |b| {
        b.iter(|| drive::<OffsetTracker>(&handed, &finished, &tps))
    });
    g.bench_function("btreeset_before", |b| {
        b.iter(|| drive::<SetTracker>(&handed, &finished, &tps))
    });
    g.finish();
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
