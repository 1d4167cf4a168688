//! The contiguous watermark of finished work per partition: the only offsets that may be
//! committed at-least-once.
//!
//! Records are [`OffsetTracker::track`]ed when handed to workers and [`OffsetTracker::done`] when
//! their work is durable, in any order. [`OffsetTracker::committable`] gives, per partition, the
//! offset after the longest prefix of finished records: never past an unfinished one.
//! [`OffsetTracker::revoke`] forgets a partition so nothing is committed for it after it is lost.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::TopicPartition;

#[derive(Debug, Default)]
struct PartitionState {
    /// Offsets handed out and not yet done.
    in_flight: BTreeSet<u64>,
    /// The highest offset handed out + 1.
    next: u64,
    /// What was last reported as committable.
    committed: Option<u64>,
}

/// Per-partition watermark of finished work.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<TopicPartition, PartitionState>,
}

impl OffsetTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// A record at `offset` was handed out. Offsets of a partition are tracked in increasing order.
    pub fn track(&mut self, tp: &TopicPartition, offset: u64) {
        let st = self.partitions.entry(tp.clone()).or_default();
        st.in_flight.insert(offset);
        st.next = st.next.max(offset + 1);
    }

    /// The work of the record at `offset` is durable. Unknown (revoked) partitions are ignored.
    pub fn done(&mut self, tp: &TopicPartition, offset: u64) {
        if let Some(st) = self.partitions.get_mut(tp) {
            st.in_flight.remove(&offset);
        }
    }

    /// The partition was revoked: forget it, so nothing is committed for it any more.
    pub fn revoke(&mut self, tp: &TopicPartition) {
        self.partitions.remove(tp);
    }

    /// Records handed out and not yet done, over every partition.
    pub fn in_flight(&self) -> usize {
        self.partitions.values().map(|s| s.in_flight.len()).sum()
    }

    /// Per partition, the offset to commit (next to read) if it moved since the last call.
    pub fn committable(&mut self) -> Vec<(TopicPartition, u64)> {
        let mut out = BTreeMap::new();
        for (tp, st) in &mut self.partitions {
            let mark = st.in_flight.first().copied().unwrap_or(st.next);
            if st.committed != Some(mark) && mark > 0 {
                st.committed = Some(mark);
                out.insert(tp.clone(), mark);
            }
        }
        out.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tp(p: u32) -> TopicPartition {
        TopicPartition::new("t", p)
    }

    #[test]
    fn given_out_of_order_completion_when_asked_then_watermark_stops_at_first_unfinished() {
        let mut t = OffsetTracker::new();
        for o in 10..15 {
            t.track(&tp(0), o);
        }
        t.done(&tp(0), 12);
        t.done(&tp(0), 13);
        assert_eq!(t.committable(), vec![(tp(0), 10)]);
        t.done(&tp(0), 10);
        assert_eq!(t.committable(), vec![(tp(0), 11)]);
        t.done(&tp(0), 11);
        t.done(&tp(0), 14);
        assert_eq!(t.committable(), vec![(tp(0), 15)]);
        assert!(
            t.committable().is_empty(),
            "unchanged marks are not repeated"
        );
    }

    #[test]
    fn given_revoked_partition_when_done_later_then_nothing_is_committed_for_it() {
        let mut t = OffsetTracker::new();
        t.track(&tp(1), 0);
        t.revoke(&tp(1));
        t.done(&tp(1), 0);
        assert!(t.committable().is_empty());
    }

    proptest! {
        /// Whatever the completion order, the committed mark never passes an unfinished record
        /// and reaches the end once everything is done.
        #[test]
        fn given_any_completion_order_then_mark_never_passes_unfinished_work(
            n in 1usize..60,
            order in proptest::collection::vec(any::<prop::sample::Index>(), 1..60),
            start in 0u64..1000,
        ) {
            let mut t = OffsetTracker::new();
            let mut pending: Vec<u64> = (start..start + n as u64).collect();
            for o in &pending {
                t.track(&tp(0), *o);
            }
            let mut finished = BTreeSet::new();
            for idx in order {
                if pending.is_empty() { break; }
                let o = pending.remove(idx.index(pending.len()));
                t.done(&tp(0), o);
                finished.insert(o);
                for (_, mark) in t.committable() {
                    for off in start..mark {
                        prop_assert!(finished.contains(&off), "mark {} passes unfinished {}", mark, off);
                    }
                }
            }
            for o in pending { t.done(&tp(0), o); }
            let marks = t.committable();
            if let Some((_, m)) = marks.last() {
                prop_assert_eq!(*m, start + n as u64);
            }
        }
    }
}
