//! The segmenter's evaluation builds only the event cells the rules read
//! (`RuleSet::event_qualifiers`) of a row read with `RuleSet::projection`; `explain` builds every
//! cell of the whole row. Both must give the same segments and recheck times, for the shipped rule
//! files and rules of every shape, on any row (including negations and `count` of events that
//! have none of the read cells).

use dmp_core::clock::DAY_MS;
use dmp_core::{Cell, Row};
use dmp_rules::file::parse_rules;
use dmp_rules::{builtin, RuleSet};
use proptest::prelude::*;

const NOW: i64 = 1_795_341_600_000;

fn set(path: &str, text: &str) -> RuleSet {
    let (version, mut rules) = parse_rules(path, text).unwrap();
    rules.extend(builtin::builtin_rules());
    RuleSet::new(version, rules, path).unwrap()
}

fn rule_sets() -> Vec<RuleSet> {
    let shapes = r#"
version = "shapes"
[[segment]]
id = "not_search"
when = '''count(not (type == "search"), 30d) >= 3'''
[[segment]]
id = "any_event"
when = '''count(true, 7d) >= 2'''
[[segment]]
id = "no_geo"
when = '''any(geo.city != "Omsk", 30d) and since(url.path ~ "^/item") <= 3d'''
[[segment]]
id = "custom"
when = '''count(a.plan == "gold" or ua.device == "smartphone", 60d) >= 1 or attr("plan") == "gold"'''
[[segment]]
id = "ref_host"
when = '''any(ref.host == "google.com" and num(a.price) > 10, 14d)'''
"#;
    vec![
        set("dmp-rules.toml", include_str!("../examples/dmp-rules.toml")),
        set(
            "demo-rules.toml",
            include_str!("../../loadtest/scenarios/demo-rules.toml"),
        ),
        set("shapes.toml", shapes),
    ]
}

/// `ua` is the cell the storage writer writes (id and parts); `ua.br`, `ua.os`, `ua.dev` are the
/// cells of rows written before the parts moved into it.
const QUALIFIERS: [&str; 13] = [
    "type", "url", "ref", "q", "src", "ip", "geo", "ua", "ua.br", "ua.os", "ua.dev", "a.plan",
    "a.price",
];

fn value(q: &str, v: u8) -> Vec<u8> {
    let pick = |xs: &[&str]| xs[v as usize % xs.len()].as_bytes().to_vec();
    match q {
        "type" => pick(&["pageview", "search", "purchase"]),
        "url" => pick(&[
            "https://cats.example/item/1",
            "https://bank.example/",
            "https://news.example/a",
            "https://autoservice.example/x",
        ]),
        "ref" => pick(&["https://google.com/", "https://ya.ru/"]),
        "q" => pick(&["ипотека", "cat food", "car service", "кошек"]),
        "geo" => pick(&["RU/Omsk/Omsk", "RU/Novosibirsk Oblast/Novosibirsk"]),
        "ua.dev" => pick(&["smartphone", "desktop"]),
        "ua" => {
            let mut id = u64::from(v).to_be_bytes().to_vec();
            // An 8-byte id alone is how older rows hold it.
            id.extend_from_slice(&pick(&[
                "Chrome 120\0Android 14\0smartphone\0",
                "Firefox\0Linux\0pc\0",
                "",
            ]));
            id
        }
        "a.plan" => pick(&["gold", "free"]),
        "a.price" => pick(&["5", "50"]),
        "ip" => vec![0xC0, 0xA8, v, 1],
        _ => pick(&["x", "y"]),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn given_any_row_when_evaluated_with_only_the_read_cells_then_results_equal_the_whole_view(
        events in prop::collection::vec(
            (0i64..40 * 24, prop::collection::vec((0usize..QUALIFIERS.len(), any::<u8>()), 0..6)),
            0..25),
    ) {
        let mut row = Row { key: "u".into(), cells: Vec::new() };
        for (hours, cells) in &events {
            let ts = NOW - hours * DAY_MS / 24;
            for (q, v) in cells {
                row.cells.push(Cell::new("e", QUALIFIERS[*q], ts, value(QUALIFIERS[*q], *v)));
            }
        }
        row.cells.push(Cell::new("m", "first_seen", i64::MAX - NOW, (NOW - 5 * DAY_MS).to_be_bytes().to_vec()));
        row.sort();
        row.cells.dedup_by(|a, b| a.coordinates() == b.coordinates());
        for set in rule_sets() {
            prop_assert!(set.event_qualifiers().is_some(), "{} names its qualifiers", set.version());
            let only = set.evaluate(&row, NOW);
            let whole = set.explain(&row, NOW);
            let summary = |e: &dmp_rules::Evaluation| {
                (
                    e.live.iter().map(|(k, o)| (k.clone(), o.recheck_at)).collect::<Vec<_>>(),
                    e.shadow.keys().cloned().collect::<Vec<_>>(),
                    e.recheck_at,
                )
            };
            prop_assert_eq!(summary(&only), summary(&whole), "rules {}", set.version());
            // The segmenter reads the row projected: the read cells, attributes and a marker per
            // event. Same results, and the same last event.
            let projection = set.projection().expect("every rule names its cells");
            let projected = Row { key: row.key.clone(), cells: projection.apply(row.cells.clone()) };
            prop_assert_eq!(summary(&set.evaluate(&projected, NOW)), summary(&whole), "projected, rules {}", set.version());
            let last = |r: &Row| r.cells.iter().filter(|c| c.family == "e").map(|c| c.ts).max();
            prop_assert_eq!(last(&projected), last(&row));
        }
    }
}

#[test]
fn given_a_plugin_that_does_not_name_its_qualifiers_then_every_cell_is_built() {
    struct Plugin;
    impl dmp_rules::Rule for Plugin {
        fn id(&self) -> &str {
            "plugin"
        }
        fn version(&self) -> u32 {
            1
        }
        fn mode(&self) -> dmp_rules::Mode {
            dmp_rules::Mode::Live
        }
        fn depends_on(&self) -> Vec<String> {
            Vec::new()
        }
        fn evaluate(
            &self,
            user: &dmp_rules::UserView<'_>,
            _ctx: &dmp_rules::Context<'_>,
        ) -> dmp_rules::Outcome {
            dmp_rules::Outcome {
                matched: user
                    .events
                    .iter()
                    .any(|e| e.cells().any(|(q, _)| q == "ua.os")),
                ..Default::default()
            }
        }
    }
    let (version, mut rules) = parse_rules(
        "t.toml",
        "version = \"t\"\n[[segment]]\nid = \"a\"\nwhen = '''any(type == \"search\", 1d)'''\n",
    )
    .unwrap();
    rules.push(std::sync::Arc::new(Plugin));
    let set = RuleSet::new(version, rules, "t.toml").unwrap();
    assert_eq!(set.event_qualifiers(), None);
    let row = Row {
        key: "u".into(),
        cells: vec![Cell::new("e", "ua.os", NOW - 1000, b"Android".to_vec())],
    };
    assert!(set.evaluate(&row, NOW).live.contains_key("plugin"));
}
