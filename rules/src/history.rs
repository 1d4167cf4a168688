//! Which of a user's events a rule set's results depend on, and a row pruned to them.
//!
//! A rule set is *prunable* when each of its aggregates depends on a few newest events only:
//! `count(c, w)` compared with a number (`>= n` needs the n newest events matching `c`: whether
//! there are n in the window, and when the n-th leaves it), `any(c, w)` and `since(c)` (the
//! newest match), `attr("x")` (the newest event holding `a.x`); `first_seen`, `segment(..)` and
//! the cells of families other than `e` are kept whole. [`HistoryNeeds::prune`] keeps those
//! events, the user's newest event and every cell of the other families: evaluating the pruned
//! row gives the same segments and the same recheck time as evaluating the row (the property
//! test in `tests/history.rs` holds the two together), at a cost that does not grow with the
//! history. A rule set with an aggregate of another shape (a count compared with `==`, with
//! another count, used as a number), an aggregate whose condition reads user-level values, or a
//! plugin rule that does not say what it reads is not prunable.
//!
//! It is the first part of evaluating a user from what changed (docs/adr/007): a summary of
//! a user is its pruned row, and a change adds the new events to it and prunes again, which gives
//! the same result as pruning the whole row when every new event is newer than every event the
//! summary has seen, or older than all of them (an event at an existing event's time merges into
//! it). Cells older than the store's TTL must be dropped from a summary before it is evaluated,
//! as a read drops them.

use dmp_core::cell::{same, ATTR_PREFIX, FAMILY_EVENTS};
use dmp_core::Row;

use crate::eval::{count_threshold, newest_matches, UserView};
use crate::lang::{Cond, Expr};

/// What of a user's events some rules depend on: the `k` newest events matching each condition,
/// and the newest event holding each custom attribute.
#[derive(Debug, Clone, Default)]
pub struct HistoryNeeds {
    /// Event conditions, each with how many of its newest matches count.
    conds: Vec<(Cond, u32)>,
    /// Custom attributes read with `attr("name")`.
    attrs: Vec<String>,
}

impl HistoryNeeds {
    /// What `expr`, a rule's condition, depends on; `None` when it may depend on every event.
    pub fn of_expr(expr: &Expr) -> Option<HistoryNeeds> {
        let mut needs = HistoryNeeds::default();
        needs.add_expr(expr).then_some(needs)
    }

    /// What either depends on.
    pub fn merge(mut self, other: HistoryNeeds) -> HistoryNeeds {
        self.conds.extend(other.conds);
        self.attrs.extend(other.attrs);
        self.attrs.sort_unstable();
        self.attrs.dedup();
        self
    }

    /// Adds what `e` depends on; false when it may depend on every event.
    fn add_expr(&mut self, e: &Expr) -> bool {
        match e {
            Expr::Bool(_)
            | Expr::Num(_)
            | Expr::Str(_)
            | Expr::Dur(_)
            | Expr::FirstSeen
            | Expr::Segment(_) => true,
            // A field outside an aggregate is refused by the type checker; nothing to keep.
            Expr::Field(_) => true,
            Expr::Attr(name) => {
                self.attrs.push(name.clone());
                true
            }
            Expr::Not(x) | Expr::ToNum(x) | Expr::Matches(x, _) => self.add_expr(x),
            Expr::And(xs) | Expr::Or(xs) => xs.iter().all(|x| self.add_expr(x)),
            Expr::Cmp(a, op, b) => match count_threshold(a, *op, b) {
                Some((cond, _, k, _)) => self.add_cond(cond, k),
                None => self.add_expr(a) && self.add_expr(b),
            },
            Expr::Contains(a, b) => self.add_expr(a) && self.add_expr(b),
            Expr::In(a, items) => self.add_expr(a) && items.iter().all(|x| self.add_expr(x)),
            Expr::Any(cond, _) | Expr::Since(cond) => self.add_cond(cond, 1),
            // A count as a number (`==`, against another count, `num`…) needs every match.
            Expr::Count(..) => false,
        }
    }

    /// Adds the `k` newest matches of `cond`, if its answer for an event depends on that event
    /// alone (no aggregate, attribute, `first_seen` or segment inside).
    fn add_cond(&mut self, cond: &Cond, k: u32) -> bool {
        if cond.event_local && k > 0 {
            self.conds.push((cond.clone(), k));
        }
        cond.event_local
    }

    /// The events of `row` (seen as `user`, a view of every qualifier the conditions read, at any
    /// time: the newest matches are taken whatever their age) these needs keep: each condition's
    /// newest matches, the newest event holding each attribute, and the newest event (no rule may
    /// need it, but the segmenter stamps `s:evaluated` and segment records with its time).
    pub(crate) fn kept(&self, row: &Row, user: &UserView<'_>) -> Kept {
        let mut times = Vec::with_capacity(1 + self.conds.len() + self.attrs.len());
        if let Some(newest) = user.events.first() {
            times.push(newest.ts);
        }
        // Every condition's newest matches (at most `k`), newest first, in one buffer.
        let mut seeds = Seeds {
            conds: Vec::with_capacity(self.conds.len()),
            ..Seeds::default()
        };
        for (cond, k) in &self.conds {
            let k = *k as usize;
            if seeds.conds.iter().any(|c| c.cond == cond.id && c.k >= k) {
                continue;
            }
            seeds.conds.retain(|c| c.cond != cond.id);
            let start = seeds.times.len();
            seeds.times.extend(newest_matches(cond, user, k));
            seeds.conds.push(Seed {
                cond: cond.id,
                k,
                start: start as u32,
                len: (seeds.times.len() - start) as u32,
            });
        }
        times.extend_from_slice(&seeds.times);
        for name in &self.attrs {
            // Cells come in HBase order, newest first per qualifier: the first is the value.
            if let Some(c) = row.cells.iter().find(|c| {
                same(&c.family, FAMILY_EVENTS)
                    && c.qualifier.strip_prefix(ATTR_PREFIX) == Some(name.as_str())
            }) {
                times.push(c.ts);
            }
        }
        times.sort_unstable();
        times.dedup();
        seeds.oldest = times.first().copied().unwrap_or(i64::MAX);
        seeds.newest = times.last().copied().unwrap_or(i64::MIN);
        seeds.events = times.len();
        Kept {
            times,
            events: user.events.len(),
            seeds,
        }
    }

    /// `row` with only the events these needs keep (every cell of family `e` of those times) and
    /// every cell of the other families, in the row's order.
    pub fn prune(&self, row: &Row) -> Row {
        let mut pruned = row.clone();
        self.kept(row, &UserView::new(row, i64::MAX))
            .apply(&mut pruned);
        pruned
    }
}

/// The events of a row that [`HistoryNeeds`] keep, and how many events the row held. Applied to
/// the row it was taken from, it prunes the row in place (no cell is copied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    /// The kept events' times, ascending.
    times: Vec<i64>,
    /// How many events the row held.
    pub events: usize,
    /// Each condition's matches among the kept events, for the next evaluation of the pruned
    /// row with new events added ([`crate::RuleSet::evaluate_and_prune_seeded`]).
    pub seeds: Seeds,
}

/// What an evaluation found of each event-local condition of a rule set's [`HistoryNeeds`]
/// among the events its pruning kept: the times of the condition's `k` newest matches (fewer:
/// every match, the row had no more). The next evaluation of the pruned row with new events
/// added (newer than every kept event, or older than all of them: the segmenter's summaries)
/// takes a condition's matches among the kept events from here instead of testing those events
/// again; the kept events' views are still built, and only tested when a scan asks for more
/// matches than were kept. Valid only with the rule set that made them (conditions are known by
/// their id, unique per parse), and only while the row holds exactly the kept events in their
/// span: [`UserView`] checks that and ignores them otherwise.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seeds {
    /// The oldest and newest kept event, and how many were kept.
    pub(crate) oldest: i64,
    pub(crate) newest: i64,
    pub(crate) events: usize,
    pub(crate) conds: Vec<Seed>,
    /// Every condition's matches, one run each ([`Seed::start`]), newest first.
    pub(crate) times: Vec<i64>,
}

/// One condition's kept matches in [`Seeds::times`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Seed {
    pub(crate) cond: u64,
    /// How many newest matches the pruning kept: fewer in the run means every match.
    pub(crate) k: usize,
    pub(crate) start: u32,
    pub(crate) len: u32,
}

impl Seeds {
    /// The kept matches of condition `cond`, and whether they are all its matches among the
    /// kept events (else they are its `k` newest).
    pub(crate) fn of(&self, cond: u64) -> Option<(&[i64], usize)> {
        let s = self.conds.iter().find(|s| s.cond == cond)?;
        let start = s.start as usize;
        Some((&self.times[start..start + s.len as usize], s.k))
    }
}

impl Kept {
    /// Removes from `row` every event not kept (every cell of family `e` of another time); the
    /// cells of the other families stay, in the row's order.
    pub fn apply(&self, row: &mut Row) {
        row.cells
            .retain(|c| !same(&c.family, FAMILY_EVENTS) || self.times.binary_search(&c.ts).is_ok());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmp_core::Cell;

    const NOW: i64 = 1_795_341_600_000;

    /// A search at each of `hours` before `NOW`, and a view an hour before.
    fn row(hours: &[i64]) -> Row {
        let mut r = Row {
            key: "u".into(),
            cells: vec![Cell::new("e", "type", NOW - 3_600_000, "view")],
        };
        for h in hours {
            r.cells
                .push(Cell::new("e", "type", NOW - h * 3_600_000, "search"));
        }
        r.sort();
        r
    }

    #[test]
    fn given_seeds_of_fewer_matches_than_a_scan_asks_when_scanned_then_every_event_is_tested() {
        // `any` keeps the newest search only: the seeds hold one of the three.
        let (version, rules) = crate::file::parse_rules(
            "t.toml",
            "version = \"t\"\n[[segment]]\nid = \"s\"\nwhen = 'any(type == \"search\", 30d)'\n",
        )
        .unwrap();
        let set = crate::RuleSet::new(version, rules, "t.toml").unwrap();
        let needs = set.history_needs().unwrap();
        let cond = &needs.conds[0].0;
        let whole = row(&[10, 20, 30]);
        let (_, kept) = set.evaluate_and_prune(&whole, NOW);
        let seeds = kept.unwrap().seeds;
        assert_eq!(seeds.of(cond.id), Some((&[NOW - 10 * 3_600_000][..], 1)));
        // The whole row again, as if the searches had been added to a summary of the row: a
        // scan for three matches cannot take one from the seeds.
        let all = newest_matches(cond, &UserView::new(&whole, NOW), 3);
        assert_eq!(all.len(), 3);
        let whole_span = Seeds {
            oldest: NOW - 30 * 3_600_000,
            newest: NOW - 3_600_000,
            events: 4,
            ..seeds.clone()
        };
        let seeded = UserView::seeded(&whole, NOW, None, &whole_span);
        assert_eq!(
            newest_matches(cond, &seeded, 3),
            all,
            "asked for more at once"
        );
        let seeded = UserView::seeded(&whole, NOW, None, &whole_span);
        assert_eq!(newest_matches(cond, &seeded, 1), all[..1]);
        assert_eq!(
            newest_matches(cond, &seeded, 3),
            all,
            "asked for more after"
        );
    }
}
