//! Built-in rules compiled into dmp, registered by [`builtin_rules`].

use std::sync::Arc;

use dmp_core::cell::FAMILY_META;

use crate::eval::{Evidence, Outcome, UserView};
use crate::{Context, Mode, Rule};

/// The built-in rules.
pub fn builtin_rules() -> Vec<Arc<dyn Rule>> {
    vec![Arc::new(KnownCrawler)]
}

/// `known_crawler`: the user's agent matched the shipped crawler list at least once (the storage
/// writer's `m:crawler` cell). Useful as `not segment("known_crawler")` in other rules.
pub struct KnownCrawler;

impl Rule for KnownCrawler {
    fn id(&self) -> &str {
        "known_crawler"
    }
    fn version(&self) -> u32 {
        1
    }
    fn mode(&self) -> Mode {
        Mode::Live
    }
    fn depends_on(&self) -> Vec<String> {
        Vec::new()
    }
    fn event_qualifiers(&self) -> Option<Vec<String>> {
        Some(Vec::new()) // reads `m:crawler` from the row
    }
    fn history_needs(&self) -> Option<crate::history::HistoryNeeds> {
        Some(Default::default()) // no event: `m:crawler` is kept with every other `m` cell
    }
    fn evaluate(&self, user: &UserView<'_>, _ctx: &Context<'_>) -> Outcome {
        let cell = user
            .row
            .cells
            .iter()
            .find(|c| c.family == FAMILY_META && c.qualifier == "crawler");
        Outcome {
            matched: cell.is_some(),
            evidence: cell
                .map(|c| Evidence {
                    ts: c.ts,
                    cells: vec![("m:crawler".into(), "1".into())],
                })
                .into_iter()
                .collect(),
            recheck_at: None,
        }
    }
}
