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
        for (cond, k) in &self.conds {
            times.extend(newest_matches(cond, user, *k as usize));
        }
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
        Kept {
            times,
            events: user.events.len(),
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
}

impl Kept {
    /// Removes from `row` every event not kept (every cell of family `e` of another time); the
    /// cells of the other families stay, in the row's order.
    pub fn apply(&self, row: &mut Row) {
        row.cells
            .retain(|c| !same(&c.family, FAMILY_EVENTS) || self.times.binary_search(&c.ts).is_ok());
    }
}
