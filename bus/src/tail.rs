//! The embedded bus's tail: the newest chunks of every partition, kept in memory as produced.
//!
//! Consumers mostly read where the last produce ended (the storage writer, the segmenter and the
//! segment stream run a few milliseconds behind). From the database, every such read takes a
//! snapshot and opens a range over the log keyspace, whose tables (each holding chunks of every
//! topic) all overlap it and are each seeked into: at 20K events/s about 5% of the process's CPU
//! went to that. A read the tail covers takes the chunks' bytes from memory instead; a read from
//! further back (a consumer behind, or just started) goes to the database as before.
//!
//! One budget (`bus.tail_cache_mb`) for all partitions: chunks leave in the order they came, so
//! the tail holds the last seconds of traffic, and busy partitions get the space they need. A
//! partition's tail is contiguous: from its first chunk's base offset to the partition's end
//! (every produced chunk is pushed before its offsets are published; only the oldest leave).
//! Retention and compaction drop the chunks they delete or rewrite, so a read of those offsets
//! goes to the database and sees what they left.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

/// One partition's newest chunks by base offset (see the module doc).
#[derive(Default)]
pub(crate) struct PartitionTail {
    chunks: Mutex<VecDeque<(u64, Bytes)>>,
}

impl PartitionTail {
    /// The chunks from the one holding `from` to the last starting before `high`, or None when
    /// the tail does not reach back to `from` (or holds nothing).
    pub(crate) fn read(&self, from: u64, high: u64) -> Option<Vec<(u64, Bytes)>> {
        let chunks = self.chunks.lock();
        if chunks.front()?.0 > from {
            return None;
        }
        // The first chunk starts at or before `from`: the one holding it is the last such.
        let holding = chunks.partition_point(|(base, _)| *base <= from) - 1;
        Some(
            chunks
                .range(holding..)
                .take_while(|(base, _)| *base < high)
                .cloned()
                .collect(),
        )
    }
}

/// The budget of all tails, with every chunk they hold in the order it came.
pub(crate) struct Tails {
    budget: usize,
    held: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    /// (partition, base offset, bytes), oldest first.
    order: VecDeque<(Arc<PartitionTail>, u64, usize)>,
    bytes: usize,
}

impl Tails {
    /// Tails sharing `budget` bytes (0: nothing is kept).
    pub(crate) fn new(budget: usize) -> Tails {
        Tails {
            budget,
            held: Mutex::new(Held::default()),
        }
    }

    /// Appends produced chunks (each partition's in offset order, each the next one of its
    /// partition), then drops the oldest chunks of any partition until the tails fit the budget.
    /// The caller publishes the chunks' offsets after.
    pub(crate) fn push(&self, chunks: impl IntoIterator<Item = (Arc<PartitionTail>, u64, Bytes)>) {
        if self.budget == 0 {
            return;
        }
        let mut held = self.held.lock();
        for (tail, base, chunk) in chunks {
            let len = chunk.len();
            tail.chunks.lock().push_back((base, chunk));
            held.order.push_back((tail, base, len));
            held.bytes += len;
        }
        while held.bytes > self.budget {
            let Some((tail, base, len)) = held.order.pop_front() else {
                break;
            };
            // The oldest chunk held is the oldest of its partition: the first in its tail.
            let mut chunks = tail.chunks.lock();
            debug_assert_eq!(chunks.front().map(|c| c.0), Some(base));
            chunks.pop_front();
            held.bytes -= len;
        }
        metrics::gauge!(crate::metrics::TAIL_BYTES).set(held.bytes as f64);
    }

    /// Drops a partition's chunks that start below `offset` (deleted by retention, or rewritten
    /// by compaction).
    pub(crate) fn drop_below(&self, tail: &Arc<PartitionTail>, offset: u64) {
        let mut held = self.held.lock();
        let mut chunks = tail.chunks.lock();
        let (mut dropped, mut bytes) = (0usize, 0usize);
        while chunks.front().is_some_and(|(base, _)| *base < offset) {
            bytes += chunks.pop_front().map_or(0, |(_, c)| c.len());
            dropped += 1;
        }
        drop(chunks);
        if dropped > 0 {
            held.order
                .retain(|(t, base, _)| !(Arc::ptr_eq(t, tail) && *base < offset));
            held.bytes -= bytes;
            metrics::gauge!(crate::metrics::TAIL_BYTES).set(held.bytes as f64);
        }
    }

    /// Bytes the tails hold.
    pub(crate) fn bytes(&self) -> usize {
        self.held.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: usize) -> Bytes {
        Bytes::from(vec![7u8; n])
    }

    fn bases(tail: &PartitionTail) -> Vec<u64> {
        tail.chunks.lock().iter().map(|c| c.0).collect()
    }

    #[test]
    fn reads_from_the_chunk_holding_the_offset_up_to_high() {
        let tails = Tails::new(1 << 20);
        let t = Arc::new(PartitionTail::default());
        tails.push([(t.clone(), 10, chunk(5)), (t.clone(), 15, chunk(5))]);
        tails.push([(t.clone(), 20, chunk(5))]);
        assert!(t.read(9, 25).is_none(), "before the tail");
        let got = |from, high| -> Vec<u64> {
            t.read(from, high)
                .unwrap()
                .into_iter()
                .map(|c| c.0)
                .collect()
        };
        assert_eq!(got(10, 25), [10, 15, 20]);
        assert_eq!(got(12, 25), [10, 15, 20]);
        assert_eq!(got(15, 25), [15, 20]);
        assert_eq!(
            got(19, 20),
            [15],
            "chunks from high on are not published yet"
        );
        assert_eq!(got(24, 25), [20]);
        assert!(PartitionTail::default().read(0, 10).is_none(), "empty");
    }

    #[test]
    fn the_oldest_chunks_of_any_partition_leave_first() {
        let tails = Tails::new(100);
        let (a, b) = (
            Arc::new(PartitionTail::default()),
            Arc::new(PartitionTail::default()),
        );
        tails.push([(a.clone(), 0, chunk(40)), (b.clone(), 0, chunk(40))]);
        tails.push([(a.clone(), 1, chunk(40))]);
        assert_eq!((bases(&a), bases(&b)), (vec![1], vec![0]));
        assert_eq!(tails.bytes(), 80);
        tails.push([(b.clone(), 1, chunk(10))]);
        assert_eq!((bases(&a), bases(&b)), (vec![1], vec![0, 1]));
        // A chunk over the budget leaves at once, with everything older.
        tails.push([(b.clone(), 2, chunk(101))]);
        assert_eq!((bases(&a), bases(&b), tails.bytes()), (vec![], vec![], 0));
        tails.push([(b.clone(), 3, chunk(1))]);
        assert_eq!(b.read(3, 4).map(|c| c.len()), Some(1));
        assert!(b.read(2, 4).is_none(), "offset 2 is only in the database");
    }

    #[test]
    fn dropped_chunks_leave_the_budget() {
        let tails = Tails::new(100);
        let (a, b) = (
            Arc::new(PartitionTail::default()),
            Arc::new(PartitionTail::default()),
        );
        tails.push([
            (a.clone(), 0, chunk(30)),
            (b.clone(), 0, chunk(30)),
            (a.clone(), 10, chunk(30)),
        ]);
        tails.drop_below(&a, 10);
        assert_eq!(
            (bases(&a), bases(&b), tails.bytes()),
            (vec![10], vec![0], 60)
        );
        tails.drop_below(&b, 0);
        assert_eq!(tails.bytes(), 60, "nothing below 0");
        // 40 more fit now; the next push evicts b's chunk, then a's.
        tails.push([(b.clone(), 5, chunk(40))]);
        assert_eq!(tails.bytes(), 100);
        tails.push([(a.clone(), 20, chunk(30))]);
        assert_eq!(
            (bases(&a), bases(&b), tails.bytes()),
            (vec![10, 20], vec![5], 100)
        );
    }

    #[test]
    fn a_zero_budget_keeps_nothing() {
        let tails = Tails::new(0);
        let t = Arc::new(PartitionTail::default());
        tails.push([(t.clone(), 0, chunk(1))]);
        assert!(t.read(0, 1).is_none());
        assert_eq!(tails.bytes(), 0);
    }
}
