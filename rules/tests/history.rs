//! A row pruned to the events a rule set depends on evaluates as the whole row does: the same
//! segments and the same recheck time, at any time, and pruning a pruned row with newer events
//! added, or events older than all of its own, is the same as pruning the whole row. The matches
//! of a condition that one evaluation remembers for its rules and its pruning agree with testing
//! every event (as an explanation does), and so do the matches a pruning hands on to the next
//! evaluation of its summary (the seeds).

use dmp_core::clock::DAY_MS;
use dmp_core::{Cell, Row};
use dmp_rules::file::parse_rules;
use dmp_rules::RuleSet;
use proptest::prelude::*;

const NOW: i64 = 1_795_341_600_000;
const HOUR_MS: i64 = 3_600_000;

fn set(rules: &[String]) -> RuleSet {
    let mut text = String::from("version = \"t1\"\n");
    for (i, when) in rules.iter().enumerate() {
        text.push_str(&format!(
            "[[segment]]\nid = \"s{i}\"\nwhen = '''{when}'''\n"
        ));
    }
    let (version, mut rules) = parse_rules("test.toml", &text).unwrap_or_else(|e| panic!("{e:?}"));
    rules.extend(dmp_rules::builtin::builtin_rules());
    RuleSet::new(version, rules, "test.toml").unwrap()
}

/// One event: hours before `NOW`, page view or search, site, query, custom attribute.
type Ev = (i64, bool, u8, u8, u8);

fn row(events: &[Ev], first_seen: Option<i64>, crawler: bool) -> Row {
    let mut r = Row {
        key: "u".into(),
        cells: Vec::new(),
    };
    for &(hours, search, site, q, tier) in events {
        let ts = NOW - hours * HOUR_MS;
        let kind = if search { "search" } else { "view" };
        r.cells.push(Cell::new("e", "type", ts, kind));
        let host = ["cats.example", "dogs.example", "news.example"][site as usize % 3];
        r.cells.push(Cell::new(
            "e",
            "url",
            ts,
            format!("https://{host}/p").into_bytes(),
        ));
        let q = ["cat food", "dog toys", ""][q as usize % 3];
        if !q.is_empty() {
            r.cells.push(Cell::new("e", "q", ts, q));
        }
        if let Some(t) = ["gold", "silver"].get(tier as usize) {
            r.cells.push(Cell::new("e", "a.tier", ts, *t));
        }
        r.cells
            .push(Cell::new("e", "ip", ts, &b"\x01\x02\x03\x04"[..]));
    }
    if let Some(first) = first_seen {
        r.cells.push(Cell::new(
            "m",
            "first_seen",
            i64::MAX - first,
            first.to_be_bytes().to_vec(),
        ));
    }
    if crawler {
        r.cells.push(Cell::new("m", "crawler", NOW, &b"1"[..]));
    }
    r.sort();
    r
}

fn cond() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        r#"type == "search""#,
        r#"url.host == "cats.example""#,
        r#"q contains "cat""#,
        r#"type == "view" or q contains "dog""#,
        r#"not (url.host == "news.example")"#,
        "true",
    ])
    .prop_map(str::to_string)
}

fn window() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["", ", 1d", ", 3d", ", 7d"]).prop_map(str::to_string)
}

/// An aggregate or user-level test of the shapes a prunable rule set may hold.
fn atom() -> impl Strategy<Value = String> {
    prop_oneof![
        (
            cond(),
            window(),
            prop::sample::select(vec![">=", ">", "<", "<="]),
            prop::sample::select(vec!["0", "1", "2", "3", "2.5"]),
            any::<bool>()
        )
            .prop_map(|(c, w, op, n, flip)| if flip {
                let op = match op {
                    ">=" => "<=",
                    ">" => "<",
                    "<" => ">",
                    _ => ">=",
                };
                format!("{n} {op} count({c}{w})")
            } else {
                format!("count({c}{w}) {op} {n}")
            }),
        (cond(), window()).prop_map(|(c, w)| format!("any({c}{w})")),
        (
            cond(),
            prop::sample::select(vec!["<=", ">"]),
            prop::sample::select(vec!["1d", "2d", "6d"])
        )
            .prop_map(|(c, op, d)| format!("since({c}) {op} {d}")),
        prop::sample::select(vec![
            r#"attr("tier") == "gold""#,
            r#"attr("tier") != "silver""#,
            "first_seen <= 5d",
            r#"segment("known_crawler")"#,
        ])
        .prop_map(str::to_string),
    ]
}

fn expr() -> impl Strategy<Value = String> {
    atom().prop_recursive(2, 6, 2, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a}) and ({b})")),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a}) or ({b})")),
            inner.prop_map(|a| format!("not ({a})")),
        ]
    })
}

fn events() -> impl Strategy<Value = Vec<Ev>> {
    prop::collection::vec(
        (0i64..15 * 24, any::<bool>(), 0u8..3, 0u8..3, 0u8..3),
        0..14,
    )
    .prop_map(|mut evs| {
        // One event per time (two at one time are one event, whose cells a later write
        // replaces: not what these tests are about).
        evs.sort_by_key(|e| e.0);
        evs.dedup_by_key(|e| e.0);
        evs
    })
}

/// What an evaluation gives at `at`: live segments and the recheck time.
fn outcome(s: &RuleSet, r: &Row, at: i64) -> (Vec<String>, Option<i64>) {
    let e = s.evaluate(r, at);
    (e.live.keys().cloned().collect(), e.recheck_at)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn given_a_prunable_rule_set_when_a_row_is_pruned_then_it_evaluates_as_the_row_does(
        rules in prop::collection::vec(expr(), 1..4),
        evs in events(),
        first_seen_days in prop::option::of(0i64..20),
        crawler in any::<bool>(),
        split in 0i64..15 * 24,
    ) {
        // A later rule may read an earlier one.
        let mut rules = rules;
        if rules.len() > 1 {
            rules.push(r#"segment("s0") and any(type == "search", 2d)"#.to_string());
        }
        let s = set(&rules);
        let needs = s.history_needs().expect("every atom is of a prunable shape");
        let first = first_seen_days.map(|d| NOW - d * DAY_MS - 15 * DAY_MS);
        let whole = row(&evs, first, crawler);
        let pruned = needs.prune(&whole);
        prop_assert!(pruned.cells.len() <= whole.cells.len());
        for at in [NOW, NOW + DAY_MS, NOW + 2 * DAY_MS + 7, NOW + 8 * DAY_MS] {
            prop_assert_eq!(outcome(&s, &pruned, at), outcome(&s, &whole, at), "{:?} at {}", rules, at);
            // The view remembers each condition's matches for the other rules and the pruning;
            // an explanation tests every event itself: the two agree.
            let explained = s.explain(&whole, at);
            let explained = (explained.live.keys().cloned().collect::<Vec<_>>(), explained.recheck_at);
            prop_assert_eq!(outcome(&s, &whole, at), explained, "{:?} at {}", rules, at);
            // One view for the evaluation and the pruning gives what each gives alone.
            let (e, kept) = s.evaluate_and_prune(&whole, at);
            prop_assert_eq!((e.live.keys().cloned().collect::<Vec<_>>(), e.recheck_at), outcome(&s, &whole, at));
            let mut in_place = whole.clone();
            kept.expect("prunable").apply(&mut in_place);
            prop_assert_eq!(&in_place.cells, &pruned.cells, "{:?} at {}", rules, at);
        }
        // A summary kept up to date: the older events pruned, the newer ones added, pruned again.
        let (newer, older): (Vec<Ev>, Vec<Ev>) = evs.iter().partition(|e| e.0 < split);
        let mut step = needs.prune(&row(&older, first, crawler));
        step.cells.extend(row(&newer, None, false).cells);
        step.sort();
        let step = needs.prune(&step);
        prop_assert_eq!(&step.cells, &pruned.cells, "{:?}", rules);
        // And with events older than every event it saw added (a partner's file of the past).
        let mut step = needs.prune(&row(&newer, first, crawler));
        step.cells.extend(row(&older, None, false).cells);
        step.sort();
        let step = needs.prune(&step);
        prop_assert_eq!(&step.cells, &pruned.cells, "older added: {:?}", rules);
        // The same two summaries evaluated with the matches their pruning found (the seeds)
        // instead of testing their events again: the same results, the same pruning, the same
        // seeds for the next evaluation.
        for (kept_part, added) in [(&older, &newer), (&newer, &older)] {
            let part = row(kept_part, first, crawler);
            let (_, kept) = s.evaluate_and_prune(&part, NOW);
            let kept = kept.expect("prunable");
            let mut summary = part.clone();
            kept.apply(&mut summary);
            summary.cells.extend(row(added, None, false).cells);
            summary.sort();
            for at in [NOW, NOW + DAY_MS, NOW + 8 * DAY_MS] {
                let (e, again) = s.evaluate_and_prune_seeded(&summary, at, Some(&kept.seeds));
                prop_assert_eq!(
                    (e.live.keys().cloned().collect::<Vec<_>>(), e.recheck_at),
                    outcome(&s, &whole, at),
                    "{:?} at {}", rules, at
                );
                let (_, tested) = s.evaluate_and_prune(&summary, at);
                prop_assert_eq!(&again, &tested, "{:?} at {}", rules, at);
                let mut in_place = summary.clone();
                again.expect("prunable").apply(&mut in_place);
                prop_assert_eq!(&in_place.cells, &pruned.cells, "{:?} at {}", rules, at);
            }
        }
    }
}

#[test]
fn given_seeds_that_do_not_fit_the_row_when_evaluated_then_its_events_are_tested() {
    // Searches at hours 10, 20, 30 and views; `count(search) >= 2` keeps the two newest.
    let evs: Vec<Ev> = vec![
        (5, false, 2, 2, 2),
        (10, true, 0, 0, 2),
        (20, true, 0, 0, 2),
        (30, true, 0, 0, 2),
        (40, false, 1, 2, 2),
    ];
    let s = set(&[r#"count(type == "search", 30d) >= 2"#.into()]);
    let whole = row(&evs, None, false);
    let (_, kept) = s.evaluate_and_prune(&whole, NOW);
    let kept = kept.unwrap();
    // The seeds with a row that lost one of the kept events (expired, say): its span no longer
    // holds the kept events, so the row's own events decide. Seeds taken as given would count
    // the lost search.
    let lost: Vec<Ev> = evs.iter().copied().filter(|e| e.0 != 10).collect();
    let lost = row(&lost, None, false);
    let (e, again) = s.evaluate_and_prune_seeded(&lost, NOW, Some(&kept.seeds));
    assert_eq!(
        (e.live.keys().cloned().collect::<Vec<_>>(), e.recheck_at),
        outcome(&s, &lost, NOW)
    );
    assert_eq!(again, s.evaluate_and_prune(&lost, NOW).1);
    // The row's own seeds with its pruned row, as the segmenter keeps a summary: the same
    // answer as the whole row's.
    let (_, own) = s.evaluate_and_prune(&lost, NOW);
    let own = own.unwrap();
    let mut pruned = lost.clone();
    own.apply(&mut pruned);
    let (e, _) = s.evaluate_and_prune_seeded(&pruned, NOW, Some(&own.seeds));
    assert_eq!(
        (e.live.keys().cloned().collect::<Vec<_>>(), e.recheck_at),
        outcome(&s, &lost, NOW)
    );
}

#[test]
fn given_a_count_that_needs_every_match_when_asked_then_the_rule_set_is_not_prunable() {
    for when in [
        r#"count(type == "search", 7d) == 2"#,
        r#"count(type == "search", 7d) != 2"#,
        r#"count(type == "search") > count(type == "view")"#,
        r#"count(type == "search", 7d) in [1, 2]"#,
    ] {
        let s = set(&[when.to_string()]);
        assert!(s.history_needs().is_none(), "{when}");
    }
    // The shapes a pruned row answers alike.
    let s = set(&[
        r#"count(type == "search", 30d) >= 3 and not any(url.host == "news.example", 1d)"#.into(),
        r#"since(q contains "cat") <= 7d or attr("tier") == "gold""#.into(),
    ]);
    assert!(s.history_needs().is_some());
}

#[test]
fn given_a_heavy_history_when_pruned_then_only_the_deciding_events_stay() {
    // 200 views of news and 3 older searches: `count(search) >= 2` keeps the two newest
    // searches, and the newest event stays too.
    let mut evs: Vec<Ev> = (1..=200).map(|h| (h, false, 2, 2, 2)).collect();
    evs.extend([
        (250, true, 0, 0, 2),
        (300, true, 0, 0, 2),
        (301, true, 0, 0, 2),
    ]);
    evs.sort_by_key(|e| e.0);
    let whole = row(&evs, None, false);
    let s = set(&[r#"count(type == "search", 30d) >= 2"#.into()]);
    let pruned = s.history_needs().unwrap().prune(&whole);
    let times: std::collections::BTreeSet<i64> = pruned.cells.iter().map(|c| c.ts).collect();
    assert_eq!(
        times,
        [NOW - 300 * HOUR_MS, NOW - 250 * HOUR_MS, NOW - HOUR_MS].into(),
        "the two newest searches and the newest event"
    );
    assert_eq!(outcome(&s, &pruned, NOW), outcome(&s, &whole, NOW));
    assert_eq!(outcome(&s, &pruned, NOW).0, vec!["s0".to_string()]);
}
