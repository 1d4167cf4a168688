//! The ground truth, kept independently of dmp's rule engine: the conditions of
//! `scenarios/demo-rules.toml`, written out by hand over the events the driver actually sent.
//!
//! Every event of a run falls inside the rules' windows (7 to 30 days; partner dumps are at most
//! 48 hours old), so membership is a matter of counting:
//! - `cat_lovers`: at least 2 events on cats.example or with a query containing "кошек" or "cat";
//! - `mortgage_seekers`: a search whose query contains "ипотек" or "mortgage", or at least 3
//!   events on bank.example;
//! - `car_service_seekers`: a query containing "автосервис" or "car service", or an event on
//!   autoservice.example;
//! - `news_readers`: at least 2 events on news.example.
//!
//! A search's URL is on search.example, so only its query counts for it.
//!
//! dmp's built-in `known_crawler` (the user agent is on the shipped crawler list) is known from
//! the population: a user with a crawler user agent is in it once evaluated. Bots are
//! blacklisted, possibly before their first evaluation, so for a bot both "no segment" and its
//! evaluated segments are right.

use std::collections::BTreeMap;

use crate::generator::{Event, Kind};

#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    cats: u32,
    mortgage_search: bool,
    bank: u32,
    car: bool,
    news: u32,
    /// Newest event time seen.
    last_ts: i64,
    events: u32,
}

/// What the sent events make of each user.
#[derive(Debug, Default)]
pub struct Oracle {
    users: Vec<Tally>,
    /// Users with a crawler user agent.
    crawlers: Vec<bool>,
}

/// The demo rules' segments, in id order (dmp's built-in `known_crawler` comes first in
/// [`Oracle::expected`]).
pub const SEGMENTS: [&str; 4] = [
    "car_service_seekers",
    "cat_lovers",
    "mortgage_seekers",
    "news_readers",
];

impl Oracle {
    /// For a population of `users`, none with a crawler user agent.
    pub fn new(users: usize) -> Oracle {
        Oracle {
            users: vec![Tally::default(); users],
            crawlers: vec![false; users],
        }
    }

    /// For the generator's population.
    pub fn for_population(users: &[crate::generator::User]) -> Oracle {
        Oracle {
            users: vec![Tally::default(); users.len()],
            crawlers: users
                .iter()
                .map(|u| crate::generator::BOT_AGENTS.contains(&u.ua))
                .collect(),
        }
    }

    /// An event was acknowledged by dmp.
    pub fn observe(&mut self, e: &Event) {
        let t = &mut self.users[e.user as usize];
        t.events += 1;
        t.last_ts = t.last_ts.max(e.ts);
        let q = e.q.unwrap_or("");
        let host = match e.kind {
            Kind::Pageview => e.host,
            Kind::Search => "search.example",
        };
        if host == "cats.example" || q.contains("кошек") || q.contains("cat") {
            t.cats += 1;
        }
        if e.kind == Kind::Search && (q.contains("ипотек") || q.contains("mortgage")) {
            t.mortgage_search = true;
        }
        if host == "bank.example" {
            t.bank += 1;
        }
        if q.contains("автосервис") || q.contains("car service") || host == "autoservice.example"
        {
            t.car = true;
        }
        if host == "news.example" {
            t.news += 1;
        }
    }

    /// The segments user `user` must be in, sorted.
    pub fn expected(&self, user: usize) -> Vec<&'static str> {
        let t = &self.users[user];
        let mut out = Vec::new();
        if t.events > 0 && self.crawlers[user] {
            out.push("known_crawler");
        }
        if t.car {
            out.push("car_service_seekers");
        }
        if t.cats >= 2 {
            out.push("cat_lovers");
        }
        if t.mortgage_search || t.bank >= 3 {
            out.push("mortgage_seekers");
        }
        if t.news >= 2 {
            out.push("news_readers");
        }
        out.sort_unstable();
        out
    }

    /// The newest event time of `user` (None: no event was sent).
    pub fn last_ts(&self, user: usize) -> Option<i64> {
        let t = &self.users[user];
        (t.events > 0).then_some(t.last_ts)
    }

    /// Users with at least one event.
    pub fn active(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.users.len()).filter(|u| self.users[*u].events > 0)
    }

    /// How many users are in each segment (the demo rules' always listed).
    pub fn segment_sizes(&self) -> BTreeMap<&'static str, u64> {
        let mut out: BTreeMap<&'static str, u64> = SEGMENTS.iter().map(|s| (*s, 0)).collect();
        for u in 0..self.users.len() {
            for s in self.expected(u) {
                *out.entry(s).or_default() += 1;
            }
        }
        out
    }

    /// How many users are in both segments.
    pub fn both(&self, a: &str, b: &str) -> u64 {
        (0..self.users.len())
            .filter(|u| {
                let e = self.expected(*u);
                e.contains(&a) && e.contains(&b)
            })
            .count() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generator::Generator;

    fn ev(kind: Kind, host: &'static str, q: Option<&'static str>) -> Event {
        Event {
            user: 0,
            ts: 1,
            kind,
            host,
            page: 1,
            q,
            src: "web",
        }
    }

    #[test]
    fn given_events_then_memberships_follow_the_rules_text() {
        let mut o = Oracle::new(1);
        o.observe(&ev(Kind::Pageview, "cats.example", None));
        assert!(o.expected(0).is_empty(), "one cat event is not enough");
        o.observe(&ev(Kind::Search, "cats.example", Some("котята купить")));
        assert!(o.expected(0).is_empty(), "that query matches neither word");
        o.observe(&ev(Kind::Search, "cats.example", Some("cat toys")));
        assert_eq!(o.expected(0), vec!["cat_lovers"]);
        o.observe(&ev(
            Kind::Search,
            "autoservice.example",
            Some("замена масла"),
        ));
        assert_eq!(
            o.expected(0),
            vec!["cat_lovers"],
            "a search counts by its query"
        );
        o.observe(&ev(Kind::Search, "bank.example", Some("ипотека")));
        assert_eq!(o.expected(0), vec!["cat_lovers", "mortgage_seekers"]);
    }

    /// The oracle agrees with dmp's own rule engine on generated users (two independent
    /// readings of the same rule file).
    #[test]
    fn given_generated_traffic_then_oracle_agrees_with_the_rule_engine() {
        let mut g = Generator::new(11, 300);
        let mut o = Oracle::new(300);
        let mut events = Vec::new();
        let now = 1_795_341_600_000;
        for s in 0..600 {
            g.session(now - 3_600_000 + s * 1000, &mut events);
        }
        for e in &events {
            o.observe(e);
        }
        let (version, rules) =
            dmp_rules::file::parse_rules("demo", crate::generator::DEMO_RULES).unwrap();
        let set = dmp_rules::RuleSet::new(version, rules, "demo").unwrap();
        let mut checked = 0;
        for u in o.active() {
            let mut row = dmp_core::Row {
                key: g.users()[u].uid.clone(),
                cells: Vec::new(),
            };
            for e in events.iter().filter(|e| e.user as usize == u) {
                let event = dmp_core::Event::from_json(
                    g.to_json(e),
                    now,
                    &dmp_core::event::EventLimits::default(),
                )
                .unwrap();
                row.cells.extend(dmp_storage_writer::cells::event_cells(
                    event,
                    &dmp_storage_writer::Enrichment::default(),
                ));
            }
            row.sort();
            let eval = set.evaluate(&row, now);
            let got: Vec<&str> = eval.live.keys().map(String::as_str).collect();
            assert_eq!(got, o.expected(u), "user {u}");
            checked += 1;
        }
        assert!(checked > 100);
    }
}
