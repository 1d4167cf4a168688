//! What a worker remembers per user, in one map: the newest write its reads saw ([`Seen`], for
//! the dedupe) and the user's change rate ([`Rate`], for the blacklist).
//!
//! One entry per user means one hash lookup per change for both checks (they were two LRUs,
//! three lookups per change: at 50K events/s the blacklist's alone was 5% of the segmenter's
//! CPU). Eviction forgets both at once, which costs an extra read, or a bot counted from zero
//! again, and never a missed update.
//!
//! **Recency in two generations**, not a linked LRU: users touched since the last turn are in
//! `young`, those touched in the turn before and not since in `old`. A user found in `old` moves
//! to `young`; when `young` holds half the capacity, `old` is forgotten and `young` becomes it.
//! So at most `capacity` users are remembered, and always at least the `capacity / 2` most
//! recently used.
//!
//! **A user is a 128-bit key**, its uid hashed with SipHash-1-3 under two keys of std's
//! `RandomState` (random per thread, drawn when the worker starts): entries are 48 bytes inline,
//! with no uid allocated per user and no uid to follow when comparing. Two uids share an entry
//! with a probability of about n² / 2¹²⁹ (10⁻²⁵ for 10M users), and without the keys no one can
//! choose uids that do. A lookup is one probe of one table; the linked LRU it replaced (`lru`,
//! with `Box<str>` keys) followed the map's pointer to a node and the node's to the uid, and
//! moved the node between two other users' nodes.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

use hashbrown::HashMap;

use crate::blacklist::{Limits, Rate};
use crate::dedupe::Seen;

/// One user's state.
#[derive(Debug, Clone)]
pub struct User {
    /// The newest write a read saw.
    pub seen: Seen,
    /// Changes counted for the blacklist.
    pub rate: Rate,
}

/// The users a worker remembers, at most `capacity` (see the module doc).
pub struct Users {
    /// Users touched since the last turn.
    young: HashMap<u128, User, KeyHash>,
    /// Users touched in the turn before and not since.
    old: HashMap<u128, User, KeyHash>,
    /// At most this many users.
    capacity: usize,
    /// `young`'s size at which the generations turn: half the capacity.
    turn_at: usize,
    /// The two SipHash keys a uid's key is made with.
    sip: (RandomState, RandomState),
    limits: Limits,
}

impl Users {
    /// Room for `capacity` users, with the blacklist's `limits`.
    pub fn new(capacity: usize, limits: Limits) -> Users {
        Users {
            young: HashMap::default(),
            old: HashMap::default(),
            capacity: capacity.max(1),
            turn_at: (capacity / 2).max(1),
            sip: (RandomState::new(), RandomState::new()),
            limits,
        }
    }

    /// A uid's key in the tables.
    fn key(&self, uid: &str) -> u128 {
        (u128::from(self.sip.0.hash_one(uid)) << 64) | u128::from(self.sip.1.hash_one(uid))
    }

    /// The user's state (a fresh one first seen at `now` if not remembered), and the blacklist's
    /// limits to check its rate with. A user touched since the last turn costs one lookup.
    pub fn get(&mut self, uid: &str, now: i64) -> (&mut User, &Limits) {
        let key = self.key(uid);
        // `young` is full only until the user after the turn, so the second lookup is rare.
        if self.young.len() >= self.turn_at && !self.young.contains_key(&key) {
            // The forgotten generation's table becomes the new `young`, emptied: grown once,
            // it is never grown (and rehashed) again.
            std::mem::swap(&mut self.young, &mut self.old);
            self.young.clear();
            if self.turn_at * 2 > self.capacity {
                // A capacity of 1: one generation of one user.
                self.old.clear();
            }
        }
        let limits = &self.limits;
        let user = self.young.entry(key).or_insert_with(|| {
            self.old.remove(&key).unwrap_or_else(|| User {
                seen: Seen::default(),
                rate: Rate::new(now, limits),
            })
        });
        (user, limits)
    }

    /// Whether `uid` is blacklisted at `now` (without counting a change or touching recency).
    pub fn banned(&self, uid: &str, now: i64) -> bool {
        self.peek(uid).is_some_and(|u| u.rate.banned(now))
    }

    /// The user's state if remembered, without touching recency.
    fn peek(&self, uid: &str) -> Option<&User> {
        let key = self.key(uid);
        self.young.get(&key).or_else(|| self.old.get(&key))
    }

    /// A read of `uid` at `now` saw writes up to `written` (the row's `m:written`).
    pub fn read(&mut self, uid: &str, now: i64, written: i64) {
        self.get(uid, now).0.seen.read(written);
    }

    /// Users remembered.
    pub fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The tables' hasher: a key is already a keyed hash, so its low 64 bits are the table's hash.
#[derive(Debug, Clone, Copy, Default)]
struct KeyHash;

impl BuildHasher for KeyHash {
    type Hasher = LowBits;
    fn build_hasher(&self) -> LowBits {
        LowBits(0)
    }
}

/// See [`KeyHash`].
struct LowBits(u64);

impl Hasher for LowBits {
    fn write(&mut self, bytes: &[u8]) {
        // Only `u128` keys are hashed (`write_u128`); anything else is folded in all the same.
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u128(&mut self, key: u128) {
        self.0 = key as u64;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blacklist::Verdict;

    fn limits() -> Limits {
        Limits {
            window_ms: 60_000,
            max: 2,
            ban_ms: 3_600_000,
        }
    }

    #[test]
    fn given_user_when_read_and_counted_then_one_entry_holds_both() {
        let mut users = Users::new(10, limits());
        let now = 1_000_000_000;
        users.read("u", now, 500);
        let (u, l) = users.get("u", now);
        assert!(!u.seen.needs_read(500));
        assert_eq!(u.rate.check(now, now, l), Verdict::Pass);
        assert_eq!(users.len(), 1);
        for _ in 0..2 {
            let (u, l) = users.get("u", now);
            u.rate.check(now, now, l);
        }
        assert!(users.banned("u", now + 1));
        assert!(
            !users.get("u", now).0.seen.needs_read(400),
            "still remembered"
        );
    }

    #[test]
    fn given_full_when_new_user_then_least_recently_used_is_forgotten() {
        let mut users = Users::new(4, limits());
        users.read("a", 0, 10);
        users.read("b", 0, 20);
        users.get("a", 0); // a is now more recent than b
        users.read("c", 0, 30); // the generations turn: a and b are old
        users.get("a", 0); // a is young again
        users.read("d", 0, 40); // they turn again: b, touched in neither, is forgotten
        assert!(users.len() <= 4);
        assert!(users.peek("b").is_none(), "b was evicted");
        for (u, w) in [("a", 10), ("c", 30), ("d", 40)] {
            let seen = users.peek(u).map(|u| u.seen);
            assert!(seen.is_some_and(|s| !s.needs_read(w)), "{u} is remembered");
        }
        assert!(
            users.get("b", 0).0.seen.needs_read(20),
            "b comes back fresh"
        );
    }

    #[test]
    fn given_many_users_then_at_most_capacity_and_at_least_the_most_recent_half_are_remembered() {
        for capacity in [1, 2, 3, 5] {
            let mut users = Users::new(capacity, limits());
            for i in 0..50 {
                users.read(&format!("u{i}"), 0, i + 1);
                assert!(
                    users.len() <= capacity,
                    "capacity {capacity}: {}",
                    users.len()
                );
                assert!(
                    users.peek(&format!("u{i}")).is_some(),
                    "the latest is remembered"
                );
            }
        }
        let capacity = 100;
        let mut users = Users::new(capacity, limits());
        for i in 0..1000i64 {
            users.read(&format!("u{i}"), 0, i + 1);
            assert!(users.len() <= capacity, "{} after {i}", users.len());
            // The most recent half, however the generations fell.
            for j in (i - capacity as i64 / 2 + 1).max(0)..=i {
                let u = format!("u{j}");
                assert!(users.peek(&u).is_some(), "{u} forgotten after u{i}");
            }
        }
        // A banned user is seen as banned from either generation, without moving it.
        let (u, l) = users.get("bot", 0);
        for _ in 0..3 {
            u.rate.check(0, 0, l);
        }
        assert!(users.banned("bot", 1));
        // Half the capacity of new users: exactly one turn, whatever `young` held.
        for i in 0..capacity / 2 {
            users.get(&format!("x{i}"), 0);
        }
        let bot = users.key("bot");
        assert!(users.old.contains_key(&bot), "the turn moved it to old");
        assert!(users.banned("bot", 1));
        assert!(
            !users.young.contains_key(&bot),
            "banned() does not touch recency"
        );
    }
}
