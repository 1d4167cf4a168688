//! The per-worker dedupe: skip a change whose data an earlier read already saw.
//!
//! The storage writer stamps each row it writes with `m:written` = its write time, and gives the
//! change record the same value as `ts`. After reading a row, a worker remembers the row's
//! `m:written` (the newest write the read saw). A later change with `ts` at or before that was
//! part of that read, so it is skipped. Both values come from the writer's clock, so the
//! segmenter's own clock (and any skew between machines) plays no part. Eviction only forgets,
//! which costs an extra read and never a missed one.

/// The newest write a worker's reads of one user saw (its `m:written`), if any. It lives with the
/// user's other per-worker state in [`crate::users::Users`].
#[derive(Debug, Clone, Copy)]
pub struct Seen(i64);

impl Default for Seen {
    /// No read yet (`i64::MIN`: 8 bytes where an `Option` takes 16, times 10M users).
    fn default() -> Seen {
        Seen(i64::MIN)
    }
}

impl Seen {
    /// Whether a change written at `change_ts` needs a read.
    pub fn needs_read(&self, change_ts: i64) -> bool {
        self.0 == i64::MIN || change_ts > self.0
    }

    /// The newest write a read saw, if any.
    pub fn last(&self) -> Option<i64> {
        (self.0 != i64::MIN).then_some(self.0)
    }

    /// A read saw writes up to `written` (the row's `m:written`).
    pub fn read(&mut self, written: i64) {
        self.0 = self.0.max(written);
    }
}

#[cfg(test)]
mod tests {
    use crate::blacklist::Limits;
    use crate::users::Users;
    use proptest::prelude::*;

    /// A worker's users with room for `capacity` (the blacklist plays no part here).
    fn users(capacity: usize) -> Users {
        Users::new(
            capacity,
            Limits {
                window_ms: 60_000,
                max: u32::MAX,
                ban_ms: 0,
            },
        )
    }

    /// Whether a change of `uid` written at `ts` needs a read, as the worker asks.
    fn needs_read(d: &mut Users, uid: &str, ts: i64) -> bool {
        d.get(uid, 0).0.seen.needs_read(ts)
    }

    #[derive(Debug, Clone)]
    enum Step {
        /// The writer writes user u (its clock advances by `dt`, possibly 0).
        Write { u: usize, dt: i64 },
        /// A change record of the k-th write of user u arrives (again, late, out of order).
        Deliver { u: usize, k: usize },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0usize..4, 0i64..3).prop_map(|(u, dt)| Step::Write { u, dt }),
            (0usize..4, 0usize..8).prop_map(|(u, k)| Step::Deliver { u, k }),
        ]
    }

    proptest! {
        /// Whatever the order of delivery, duplicates, evictions (capacity 1 or 2) and the clock
        /// of the writer standing still, after every write's change record has been delivered
        /// the worker has read each user's newest write: the dedupe never loses an update.
        #[test]
        fn given_any_delivery_order_and_eviction_then_newest_write_is_always_read(
            steps in proptest::collection::vec(step(), 1..80),
            capacity in 1usize..3,
        ) {
            let mut d = users(capacity);
            let mut clock = 1000i64;
            let mut writes: Vec<Vec<i64>> = vec![Vec::new(); 4]; // write times per user
            let mut newest_read: Vec<i64> = vec![i64::MIN; 4];   // m:written seen by reads
            fn deliver(u: usize, ts: i64, d: &mut Users, writes: &[Vec<i64>], newest_read: &mut [i64]) {
                if needs_read(d, &format!("u{u}"), ts) {
                    // A read sees every write so far: m:written = the newest.
                    let written = *writes[u].last().expect("a change follows a write");
                    d.read(&format!("u{u}"), 0, written);
                    newest_read[u] = newest_read[u].max(written);
                }
            }
            for s in &steps {
                match s {
                    Step::Write { u, dt } => {
                        clock += dt;
                        writes[*u].push(clock);
                    }
                    Step::Deliver { u, k } => {
                        if let Some(ts) = writes[*u].get(*k).copied() {
                            deliver(*u, ts, &mut d, &writes, &mut newest_read);
                        }
                    }
                }
            }
            // Finally every write's record arrives (at-least-once), in write order.
            for u in 0..4 {
                for ts in writes[u].clone() {
                    deliver(u, ts, &mut d, &writes, &mut newest_read);
                }
                if let Some(last) = writes[u].last() {
                    prop_assert_eq!(newest_read[u], *last, "user {} missed its newest write", u);
                }
            }
        }
    }

    #[test]
    fn given_burst_already_written_when_first_change_read_then_the_rest_are_skipped() {
        let mut d = users(10);
        // Five writes within 2 s; the segmenter is behind and reads after all of them.
        assert!(needs_read(&mut d, "u", 1000));
        d.read("u", 0, 3000);
        for ts in [1500, 2000, 2500, 3000] {
            assert!(
                !needs_read(&mut d, "u", ts),
                "change at {ts} was in the read"
            );
        }
        assert!(needs_read(&mut d, "u", 3001), "a newer write is read");
    }
}
