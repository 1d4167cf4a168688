//! Progress of the consuming roles, for readiness: a role is stuck when it has work in flight
//! and has not moved its committed position for a while, or when its consumer was thrown out of
//! its group (Kafka's max poll interval).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

#[derive(Debug, Clone, Copy)]
struct RoleState {
    last_progress: Instant,
    max_poll_exceeded: bool,
}

/// Shared by the roles of one process and the readiness endpoint.
#[derive(Debug, Default)]
pub struct Progress {
    roles: Mutex<BTreeMap<&'static str, RoleState>>,
}

impl Progress {
    /// `role` moved forward: it committed, or had nothing to do.
    pub fn beat(&self, role: &'static str) {
        let mut r = self.roles.lock();
        let s = r.entry(role).or_insert(RoleState {
            last_progress: Instant::now(),
            max_poll_exceeded: false,
        });
        s.last_progress = Instant::now();
    }

    /// The consumer's own health.
    pub fn report(&self, role: &'static str, max_poll_exceeded: bool) {
        let mut r = self.roles.lock();
        let s = r.entry(role).or_insert(RoleState {
            last_progress: Instant::now(),
            max_poll_exceeded,
        });
        s.max_poll_exceeded = max_poll_exceeded;
    }

    /// Why roles are stuck (empty: none is), with progress older than `after` counting as stuck.
    pub fn stuck(&self, after: Duration) -> Vec<String> {
        let now = Instant::now();
        self.roles
            .lock()
            .iter()
            .filter_map(|(role, s)| {
                if s.max_poll_exceeded {
                    Some(format!(
                        "{role}: the consumer exceeded max.poll.interval.ms"
                    ))
                } else if now.duration_since(s.last_progress) > after {
                    Some(format!(
                        "{role}: no progress for {} s with work in flight",
                        now.duration_since(s.last_progress).as_secs()
                    ))
                } else {
                    None
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_roles_when_beating_or_not_then_stuck_ones_are_named() {
        let p = Progress::default();
        p.beat("storage-writer");
        p.beat("segmenter");
        assert!(p.stuck(Duration::from_millis(50)).is_empty());
        std::thread::sleep(Duration::from_millis(80));
        p.beat("segmenter");
        let s = p.stuck(Duration::from_millis(50));
        assert_eq!(s.len(), 1, "{s:?}");
        assert!(s[0].starts_with("storage-writer: no progress"));
        p.report("segmenter", true);
        assert!(p.stuck(Duration::from_secs(60))[0].contains("max.poll.interval.ms"));
    }
}
