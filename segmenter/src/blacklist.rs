//! The per-worker bot blacklist: a user with more than `max_changes` changes within a window is
//! treated as a bot for `ban` and skipped before any store read.

use std::num::NonZeroUsize;

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

struct Counter {
    window_start: i64,
    count: u32,
    banned_until: i64,
}

/// Sliding-window change counters per user (two fixed windows weighted, as rate limiters do).
pub struct Blacklist {
    counters: lru::LruCache<Box<str>, (Counter, u32)>,
    window_ms: i64,
    max: u32,
    ban_ms: i64,
}

impl Blacklist {
    /// A blacklist remembering at most `capacity` users.
    pub fn new(capacity: usize, window_ms: i64, max: u32, ban_ms: i64) -> Blacklist {
        Blacklist {
            counters: lru::LruCache::new(NonZeroUsize::new(capacity.max(1)).expect("non-zero")),
            window_ms,
            max,
            ban_ms,
        }
    }

    /// Whether `uid` is blacklisted at `now` (without counting a change).
    pub fn banned(&self, uid: &str, now: i64) -> bool {
        self.counters
            .peek(uid)
            .is_some_and(|(c, _)| now < c.banned_until)
    }

    /// Counts a change of `uid` at `now` and says whether it is a bot.
    pub fn check(&mut self, uid: &str, now: i64) -> Verdict {
        if !self.counters.contains(uid) {
            self.counters.put(
                uid.into(),
                (
                    Counter {
                        window_start: now - now % self.window_ms,
                        count: 0,
                        banned_until: i64::MIN,
                    },
                    0,
                ),
            );
        }
        let (c, previous) = self.counters.get_mut(uid).expect("just inserted");
        if now < c.banned_until {
            return Verdict::Bot;
        }
        let start = now - now % self.window_ms;
        if start != c.window_start {
            *previous = if start - c.window_start == self.window_ms {
                c.count
            } else {
                0
            };
            c.window_start = start;
            c.count = 0;
        }
        c.count += 1;
        // Sliding estimate: this window's count plus the share of the previous one still inside.
        let elapsed = (now - start) as f64 / self.window_ms as f64;
        let estimate = c.count as f64 + *previous as f64 * (1.0 - elapsed);
        if estimate > self.max as f64 {
            c.banned_until = now + self.ban_ms;
            return Verdict::NewBot;
        }
        Verdict::Pass
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_user_over_rate_when_checked_then_blacklisted_for_the_ban_then_released() {
        let mut b = Blacklist::new(100, 60_000, 10, 3_600_000);
        let t0 = 1_000_000_000;
        for i in 0..10 {
            assert_eq!(b.check("u", t0 + i), Verdict::Pass);
        }
        assert!(!b.banned("u", t0 + 10));
        assert_eq!(b.check("u", t0 + 10), Verdict::NewBot);
        assert!(b.banned("u", t0 + 11));
        assert_eq!(b.check("u", t0 + 20), Verdict::Bot);
        assert_eq!(b.check("u", t0 + 3_000_000), Verdict::Bot);
        assert_eq!(
            b.check("u", t0 + 10 + 3_600_000 + 60_000 * 2),
            Verdict::Pass,
            "the ban ends"
        );
        // Another user is unaffected.
        assert_eq!(b.check("v", t0 + 20), Verdict::Pass);
    }

    #[test]
    fn given_steady_human_rate_when_checked_then_never_blacklisted() {
        let mut b = Blacklist::new(100, 60_000, 10, 3_600_000);
        // 8 changes a minute for an hour.
        for i in 0..480 {
            assert_eq!(
                b.check("u", 1_000_000_000 + i * 7_500),
                Verdict::Pass,
                "change {i}"
            );
        }
    }

    #[test]
    fn given_burst_across_window_edge_when_checked_then_sliding_estimate_catches_it() {
        let mut b = Blacklist::new(100, 60_000, 10, 3_600_000);
        let t = 1_000_020_000i64;
        let edge = t - t % 60_000 + 60_000;
        for i in 0..8 {
            assert_eq!(b.check("u", edge - 1000 + i), Verdict::Pass);
        }
        let mut verdicts = Vec::new();
        for i in 0..8 {
            verdicts.push(b.check("u", edge + 1000 + i));
        }
        assert!(
            verdicts.contains(&Verdict::NewBot),
            "16 changes in 2 s straddling the edge: {verdicts:?}"
        );
    }
}
