//! The contiguous watermark of finished work per partition: the only offsets that may be
//! committed at-least-once.
//!
//! Records are [`OffsetTracker::track`]ed when handed to workers and [`OffsetTracker::done`] when
//! their work is durable, in any order. [`OffsetTracker::committable`] gives, per partition, the
//! offset after the longest prefix of finished records: never past an unfinished one.
//! [`OffsetTracker::revoke`] forgets a partition so nothing is committed for it after it is lost.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::TopicPartition;

/// One partition: the offsets from the oldest unfinished record handed out to the newest, each
/// in flight or not. A ring, because records are handed out in offset order and mostly finish in
/// about that order: tracking and finishing one is a push and a flag, where a `BTreeSet` of the
/// offsets in flight cost an insert and a removal (1.6% of `dmp`'s CPU at 100K events/s, for the
/// storage writer's and the segmenter's records). Offsets never handed out (gaps, as Kafka
/// leaves) count as finished.
#[derive(Debug, Default)]
struct PartitionState {
    /// Offset of `ring[0]`.
    base: u64,
    /// Whether each offset from `base` is in flight. The front, when there is one, is.
    ring: VecDeque<bool>,
    /// Offsets in flight.
    in_flight: usize,
    /// The highest offset handed out + 1.
    next: u64,
    /// What was last reported as committable.
    committed: Option<u64>,
}

impl PartitionState {
    fn track(&mut self, offset: u64) {
        self.next = self.next.max(offset + 1);
        if self.ring.is_empty() {
            self.base = offset;
            self.ring.push_back(true);
        } else if offset >= self.base + self.ring.len() as u64 {
            // The usual case: after every offset tracked so far (those between are gaps).
            let gap = offset - self.base - self.ring.len() as u64;
            self.ring.extend(std::iter::repeat_n(false, gap as usize));
            self.ring.push_back(true);
        } else if offset >= self.base {
            // Tracked again before it finished, or a gap filled late.
            let slot = &mut self.ring[(offset - self.base) as usize];
            if *slot {
                return;
            }
            *slot = true;
        } else {
            // Before everything in flight (records handed out out of order).
            let before = (self.base - offset) as usize;
            for _ in 1..before {
                self.ring.push_front(false);
            }
            self.ring.push_front(true);
            self.base = offset;
        }
        self.in_flight += 1;
    }

    fn done(&mut self, offset: u64) {
        let Some(i) = offset.checked_sub(self.base) else {
            return;
        };
        match self.ring.get_mut(i as usize) {
            Some(slot) if *slot => {
                *slot = false;
                self.in_flight -= 1;
            }
            _ => return,
        }
        // Finished records at the front leave the ring: the front stays in flight.
        while self.ring.front() == Some(&false) {
            self.ring.pop_front();
            self.base += 1;
        }
    }

    /// The offset to commit: the oldest in flight, or past everything handed out.
    fn mark(&self) -> u64 {
        if self.ring.is_empty() {
            self.next
        } else {
            self.base
        }
    }
}

/// Per-partition watermark of finished work.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    /// By partition, hashed with foldhash: the segmenter's poll loop tracks and finishes every
    /// change (about 190K lookups a second at 100K events/s), and SipHash over the topic's name
    /// was 3% of that thread's samples. Topic names come from the configuration, not from
    /// clients, so a keyed hash buys nothing here.
    partitions: HashMap<TopicPartition, PartitionState, foldhash::fast::RandomState>,
}

impl OffsetTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// A record at `offset` was handed out. Offsets of a partition are tracked in increasing
    /// order (others are handled, at a cost).
    pub fn track(&mut self, tp: &TopicPartition, offset: u64) {
        match self.partitions.get_mut(tp) {
            Some(st) => st.track(offset),
            None => self.partitions.entry(tp.clone()).or_default().track(offset),
        }
    }

    /// The work of the record at `offset` is durable. Unknown (revoked) partitions and offsets
    /// not in flight are ignored.
    pub fn done(&mut self, tp: &TopicPartition, offset: u64) {
        if let Some(st) = self.partitions.get_mut(tp) {
            st.done(offset);
        }
    }

    /// The partition was revoked: forget it, so nothing is committed for it any more.
    pub fn revoke(&mut self, tp: &TopicPartition) {
        self.partitions.remove(tp);
    }

    /// Records handed out and not yet done, over every partition.
    pub fn in_flight(&self) -> usize {
        self.partitions.values().map(|s| s.in_flight).sum()
    }

    /// Per partition, the offset to commit (next to read) if it moved since the last call.
    pub fn committable(&mut self) -> Vec<(TopicPartition, u64)> {
        let mut out = BTreeMap::new();
        for (tp, st) in &mut self.partitions {
            let mark = st.mark();
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
    use std::collections::BTreeSet;

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

    /// The tracker as it was: the offsets in flight in a set. The ring must agree with it.
    #[derive(Default)]
    struct Model {
        in_flight: BTreeMap<u32, (BTreeSet<u64>, u64)>,
    }

    impl Model {
        fn track(&mut self, p: u32, o: u64) {
            let st = self.in_flight.entry(p).or_default();
            st.0.insert(o);
            st.1 = st.1.max(o + 1);
        }
        fn done(&mut self, p: u32, o: u64) {
            if let Some(st) = self.in_flight.get_mut(&p) {
                st.0.remove(&o);
            }
        }
        fn mark(&self, p: u32) -> Option<u64> {
            let st = self.in_flight.get(&p)?;
            Some(st.0.first().copied().unwrap_or(st.1))
        }
        fn count(&self) -> usize {
            self.in_flight.values().map(|s| s.0.len()).sum()
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Track the next offset of a partition, after a gap of this many.
        Track(u32, u8),
        /// Finish the offset at this index among those tracked so far.
        Done(prop::sample::Index),
        /// Track an offset already tracked (at this index), out of order.
        Retrack(prop::sample::Index),
        Revoke(u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u32..3, prop_oneof![4 => Just(0u8), 1 => 1u8..5]).prop_map(|(p, g)| Op::Track(p, g)),
            6 => any::<prop::sample::Index>().prop_map(Op::Done),
            1 => any::<prop::sample::Index>().prop_map(Op::Retrack),
            1 => (0u32..3).prop_map(Op::Revoke),
        ]
    }

    proptest! {
        /// Any sequence of tracks (with gaps), completions (in any order, twice, or of offsets
        /// never tracked), out-of-order tracks and revocations: the same marks and counts as the
        /// set of offsets in flight.
        #[test]
        fn given_any_operations_then_marks_match_the_set_of_offsets_in_flight(
            ops in proptest::collection::vec(op(), 1..200),
            start in 0u64..1000,
        ) {
            let mut t = OffsetTracker::new();
            let mut m = Model::default();
            let mut next = [start; 3];
            let mut tracked: Vec<(u32, u64)> = Vec::new();
            for op in ops {
                match op {
                    Op::Track(p, gap) => {
                        let o = next[p as usize] + gap as u64;
                        next[p as usize] = o + 1;
                        t.track(&tp(p), o);
                        m.track(p, o);
                        tracked.push((p, o));
                    }
                    Op::Done(i) if !tracked.is_empty() => {
                        let (p, o) = tracked[i.index(tracked.len())];
                        t.done(&tp(p), o);
                        m.done(p, o);
                    }
                    Op::Retrack(i) if !tracked.is_empty() => {
                        let (p, o) = tracked[i.index(tracked.len())];
                        t.track(&tp(p), o);
                        m.track(p, o);
                    }
                    Op::Revoke(p) => {
                        t.revoke(&tp(p));
                        m.in_flight.remove(&p);
                    }
                    _ => {}
                }
                prop_assert_eq!(t.in_flight(), m.count());
                for p in 0..3u32 {
                    let ring = t.partitions.get(&tp(p)).map(|s| s.mark());
                    prop_assert_eq!(ring, m.mark(p), "partition {}", p);
                }
            }
        }

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
