//! The bot blacklist: a user with more than `max` changes within a window is treated as a bot
//! for `ban` and skipped before any store read.
//!
//! Changes are counted on the user's own clock, the time of the events they carry (never later
//! than their write), not on the worker's: a worker catching up on a backlog (after a restart, or
//! a minute behind at an evening peak) reads a user's changes faster than the user made them, and
//! counted as it read them a busy human looked like a crawler and was banned for `ban`. The ban
//! itself runs on the worker's clock: an hour is an hour of wall time.

/// What to do with a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A human as far as we know.
    Pass,
    /// Just crossed the threshold: blacklist now (flag the row once).
    NewBot,
    /// Already blacklisted.
    Bot,
}

/// The blacklist's settings.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Length of a counting window, ms.
    pub window_ms: i64,
    /// Changes allowed within a window.
    pub max: u32,
    /// How long a bot stays blacklisted, ms.
    pub ban_ms: i64,
}

/// One user's change counter: two fixed windows weighted into a sliding one, as rate limiters
/// do. It lives with the user's other per-worker state in [`crate::users::Users`].
#[derive(Debug, Clone)]
pub struct Rate {
    window_start: i64,
    count: u32,
    previous: u32,
    banned_until: i64,
    /// The latest change time counted: a change that comes out of order counts at it.
    latest: i64,
}

impl Rate {
    /// A user first seen at `now`.
    pub fn new(now: i64, limits: &Limits) -> Rate {
        Rate {
            window_start: now - now % limits.window_ms,
            count: 0,
            previous: 0,
            banned_until: i64::MIN,
            latest: i64::MIN,
        }
    }

    /// Whether the user is blacklisted at `now` (without counting a change).
    pub fn banned(&self, now: i64) -> bool {
        now < self.banned_until
    }

    /// Changes counted within the sliding window that ends at change time `at`, the figure the
    /// ban compares with `max`: this window's count plus the share of the previous one still
    /// inside. A time before the latest change counted is taken as that one's.
    pub fn estimate(&self, at: i64, limits: &Limits) -> f64 {
        let now = at.max(self.latest);
        let start = now - now % limits.window_ms;
        let (count, previous) = if start == self.window_start {
            (self.count, self.previous)
        } else if start - self.window_start == limits.window_ms {
            (0, self.count)
        } else {
            (0, 0)
        };
        let elapsed = (now - start) as f64 / limits.window_ms as f64;
        count as f64 + previous as f64 * (1.0 - elapsed)
    }

    /// Counts a change made at `at` (see [`change_time`]), read at `now` by the worker's clock,
    /// and says whether the user is a bot. Changes are counted in the order of their times: one
    /// earlier than the latest counted (tabs written in two batches, a partner's file of past
    /// events) counts at the latest's time.
    pub fn check(&mut self, at: i64, now: i64, limits: &Limits) -> Verdict {
        if now < self.banned_until {
            return Verdict::Bot;
        }
        let at = at.max(self.latest);
        self.latest = at;
        let start = at - at % limits.window_ms;
        if start != self.window_start {
            self.previous = if start - self.window_start == limits.window_ms {
                self.count
            } else {
                0
            };
            self.window_start = start;
            self.count = 0;
        }
        self.count += 1;
        if self.estimate(at, limits) > limits.max as f64 {
            self.banned_until = now + limits.ban_ms;
            return Verdict::NewBot;
        }
        Verdict::Pass
    }
}

/// The time a change counts at in the blacklist: its newest event's, but never later than its
/// write (an event stamped ahead by a client's clock must not move the user's windows into the
/// future); its write time when it has no event time.
pub fn change_time(write_ts: i64, last_event_ts: i64) -> i64 {
    if last_event_ts > 0 {
        last_event_ts.min(write_ts)
    } else {
        write_ts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::users::Users;

    /// Blacklist settings of the tests: over 10 changes a minute bans for an hour.
    const LIMITS: Limits = Limits {
        window_ms: 60_000,
        max: 10,
        ban_ms: 3_600_000,
    };

    fn users() -> Users {
        Users::new(100, LIMITS)
    }

    /// Counts a change as the worker does.
    fn check(users: &mut Users, uid: &str, now: i64) -> Verdict {
        let (user, limits) = users.get(uid, now);
        user.rate.check(now, now, limits)
    }

    #[test]
    fn given_user_over_rate_when_checked_then_blacklisted_for_the_ban_then_released() {
        let mut b = users();
        let t0 = 1_000_000_000;
        for i in 0..10 {
            assert_eq!(check(&mut b, "u", t0 + i), Verdict::Pass);
        }
        assert!(!b.banned("u", t0 + 10));
        assert_eq!(check(&mut b, "u", t0 + 10), Verdict::NewBot);
        assert!(b.banned("u", t0 + 11));
        assert_eq!(check(&mut b, "u", t0 + 20), Verdict::Bot);
        assert_eq!(check(&mut b, "u", t0 + 3_000_000), Verdict::Bot);
        assert_eq!(
            check(&mut b, "u", t0 + 10 + 3_600_000 + 60_000 * 2),
            Verdict::Pass,
            "the ban ends"
        );
        // Another user is unaffected.
        assert_eq!(check(&mut b, "v", t0 + 20), Verdict::Pass);
    }

    #[test]
    fn given_steady_human_rate_when_checked_then_never_blacklisted() {
        let mut b = users();
        // 8 changes a minute for an hour.
        for i in 0..480 {
            assert_eq!(
                check(&mut b, "u", 1_000_000_000 + i * 7_500),
                Verdict::Pass,
                "change {i}"
            );
        }
    }

    #[test]
    fn given_changes_when_estimated_then_the_sliding_count_without_counting_one() {
        let limits = Limits {
            window_ms: 60_000,
            max: 1000,
            ban_ms: 1,
        };
        let t0 = 1_000_020_000i64; // a window's start (a multiple of 60 s)
        let mut r = Rate::new(t0, &limits);
        for i in 0..10 {
            r.check(t0 + i, t0 + i, &limits);
        }
        assert_eq!(r.estimate(t0 + 10, &limits), 10.0);
        assert_eq!(r.estimate(t0 + 10, &limits), 10.0, "asking does not count");
        // Half of the next window: half of the previous window's changes are still inside.
        assert_eq!(r.estimate(t0 + 90_000, &limits), 5.0);
        // Two windows on: none.
        assert_eq!(r.estimate(t0 + 120_000, &limits), 0.0);
    }

    #[test]
    fn given_burst_across_window_edge_when_checked_then_sliding_estimate_catches_it() {
        let mut b = users();
        let t = 1_000_020_000i64;
        let edge = t - t % 60_000 + 60_000;
        for i in 0..8 {
            assert_eq!(check(&mut b, "u", edge - 1000 + i), Verdict::Pass);
        }
        let mut verdicts = Vec::new();
        for i in 0..8 {
            verdicts.push(check(&mut b, "u", edge + 1000 + i));
        }
        assert!(
            verdicts.contains(&Verdict::NewBot),
            "16 changes in 2 s straddling the edge: {verdicts:?}"
        );
    }

    #[test]
    fn given_a_backlog_read_at_once_then_changes_count_at_their_own_times() {
        let limits = LIMITS;
        let t0 = 1_000_020_000i64;
        // A human's 80 changes over ten minutes (8 a minute), read in one go ten minutes later,
        // as a worker catching up reads them.
        let now = t0 + 600_000;
        let mut r = Rate::new(now, &limits);
        for i in 0..80 {
            assert_eq!(
                r.check(t0 + i * 7_500, now, &limits),
                Verdict::Pass,
                "change {i}"
            );
        }
        // Counted as they were read (the worker's clock), the same changes were a crawler's.
        let mut r = Rate::new(now, &limits);
        let verdicts: Vec<Verdict> = (0..80).map(|_| r.check(now, now, &limits)).collect();
        assert_eq!(verdicts[10], Verdict::NewBot);
        // The ban runs on the worker's clock: an hour from when it was decided.
        assert!(r.banned(now + 3_599_999));
        assert!(!r.banned(now + 3_600_000));
    }

    #[test]
    fn given_changes_out_of_order_then_each_counts_at_the_latest_time_counted() {
        let limits = LIMITS;
        let t0 = 1_000_020_000i64;
        let mut r = Rate::new(t0, &limits);
        assert_eq!(r.check(t0 + 50_000, t0 + 50_000, &limits), Verdict::Pass);
        // A partner's file of the user's past (hours old) counts now, not in a window of its
        // own in the past, where it would be forgotten at once or start a window that the next
        // live change resets.
        for i in 0..9 {
            assert_eq!(
                r.check(t0 - 7_200_000 + i, t0 + 50_001, &limits),
                Verdict::Pass
            );
        }
        assert_eq!(r.estimate(t0 - 7_200_000, &limits), 10.0);
        assert_eq!(r.estimate(t0 + 50_000, &limits), 10.0);
        assert_eq!(r.check(t0, t0 + 50_002, &limits), Verdict::NewBot);
    }

    #[test]
    fn given_event_and_write_times_then_a_change_counts_at_the_earlier() {
        // An event stamped ahead by its client's clock counts when it was written.
        assert_eq!(change_time(1_000, 5_000), 1_000);
        // Events of the past (a backlog, a partner's file) count at their own time.
        assert_eq!(change_time(9_000, 2_000), 2_000);
        // No event time (a change from an older writer): the write time.
        assert_eq!(change_time(9_000, 0), 9_000);
    }
}
