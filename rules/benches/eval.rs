#![allow(missing_docs)] // criterion_group! generates undocumented functions
//! Rule evaluation (issue: 100 declarative rules over a 300-cell row >= 20K users/s per core).
//!
//! `cargo bench -p dmp-rules --bench eval`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dmp_core::clock::DAY_MS;
use dmp_core::{Cell, Row};
use dmp_rules::file::parse_rules;
use dmp_rules::RuleSet;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc; // as in the dmp binary

const NOW: i64 = 1_795_341_600_000;

/// 100 rules of the kinds analysts write: windowed counts, recency, attributes, lists, regexes.
fn rules() -> RuleSet {
    let mut text = String::from("version = \"bench\"\n");
    for i in 0..100 {
        let when = match i % 5 {
            0 => format!("count(type == \"search\" and q contains \"term{i}\", 30d) >= 2"),
            1 => format!("any(url.host in [\"site{i}.example\", \"other{i}.example\"], 14d)"),
            2 => format!("since(type == \"purchase\" and url.path ~ \"^/item/{i}\") <= 7d"),
            3 => format!("attr(\"segment_hint\") == \"h{i}\" or first_seen <= 3d"),
            // Every rule's condition differs (city and threshold): no two rules share work.
            _ => format!(
                "count(geo.city == \"{}\" and ua.device == \"smartphone\", 60d) >= {}",
                ["Novosibirsk", "Moscow", "Kazan", "Omsk", "Tomsk"][(i / 5) % 5],
                i % 7 + 1
            ),
        };
        text.push_str(&format!(
            "[[segment]]\nid = \"r{i}\"\nwhen = '''{when}'''\n"
        ));
    }
    let (v, r) = parse_rules("bench.toml", &text).unwrap();
    RuleSet::new(v, r, "bench.toml").unwrap()
}

/// 300 cells: 50 events of 6 cells over 60 days.
fn row() -> Row {
    let mut r = Row {
        key: "u".into(),
        cells: Vec::new(),
    };
    for e in 0..50i64 {
        let ts = NOW - e * DAY_MS * 60 / 50;
        let kind = ["pageview", "search", "purchase"][(e % 3) as usize];
        // The user agent as the storage writer writes it: the dictionary id, then browser, OS
        // and device class, each ended by a 0 byte.
        let mut ua = 42u64.to_be_bytes().to_vec();
        ua.extend_from_slice(b"Chrome Mobile 120.0\0Android 14\0smartphone\0");
        for (q, v) in [
            ("type", kind.as_bytes().to_vec()),
            (
                "url",
                format!("https://site{}.example/item/{e}", e % 100).into_bytes(),
            ),
            ("q", format!("term{} something", e % 100).into_bytes()),
            ("geo", b"RU/Novosibirsk Oblast/Novosibirsk".to_vec()),
            ("ua", ua),
            ("a.segment_hint", format!("h{}", e % 100).into_bytes()),
        ] {
            r.cells.push(Cell::new("e", q, ts, v));
        }
    }
    r.sort();
    r
}

/// The loadtest's demo rules (four windowed counts and `any`s over the demo sites and queries).
fn demo_rules() -> RuleSet {
    let text = include_str!("../../loadtest/scenarios/demo-rules.toml");
    let (v, r) = parse_rules("demo-rules.toml", text).unwrap();
    RuleSet::new(v, r, "demo-rules.toml").unwrap()
}

/// A demo user interested in cats and news: `n` page views and searches, two a day, cells as
/// the storage writer writes them (without the user agent and address, which the rules skip).
fn demo_row(n: i64) -> Row {
    let mut r = Row {
        key: "u".into(),
        cells: Vec::new(),
    };
    for e in 0..n {
        let ts = NOW - e * DAY_MS / 2;
        let (host, q) = if e % 2 == 0 {
            ("cats.example", "корм для кошек")
        } else {
            ("news.example", "новости")
        };
        let search = e % 3 == 0;
        r.cells.push(Cell::new(
            "e",
            "type",
            ts,
            if search { "search" } else { "pageview" },
        ));
        r.cells.push(Cell::new(
            "e",
            "url",
            ts,
            format!("https://{host}/page/{e}").into_bytes(),
        ));
        if search {
            r.cells.push(Cell::new("e", "q", ts, q.as_bytes().to_vec()));
        }
    }
    r.sort();
    r
}

fn bench(c: &mut Criterion) {
    let set = rules();
    let row = row();
    let (demo, reader) = (demo_rules(), demo_row(40));
    assert_eq!(demo.evaluate(&reader, NOW).live.len(), 2);
    // A longer history (30 days of the demo's longest window, four events a day) and the same
    // pruned to the events the demo rules depend on (docs/adr/007).
    let long = demo_row(120);
    let needs = demo.history_needs().expect("the demo rules are prunable");
    let pruned = needs.prune(&long);
    let (a, b) = (demo.evaluate(&long, NOW), demo.evaluate(&pruned, NOW));
    assert!(a.live.keys().eq(b.live.keys()));
    assert_eq!(a.recheck_at, b.recheck_at);
    // What a change adds: the pruned row and two newer events (a cat page, a news page).
    let mut step = pruned.clone();
    for (i, host) in [(1, "cats.example"), (2, "news.example")] {
        step.cells.push(Cell::new("e", "type", NOW + i, "pageview"));
        step.cells.push(Cell::new(
            "e",
            "url",
            NOW + i,
            format!("https://{host}/new").into_bytes(),
        ));
    }
    step.sort();
    assert_eq!(row.cells.len(), 300);
    let mut g = c.benchmark_group("rules");
    g.throughput(Throughput::Elements(1));
    g.bench_function("100_rules_over_300_cell_row", |b| {
        b.iter(|| set.evaluate(&row, NOW))
    });
    g.bench_function("demo_rules_over_a_40_event_cat_and_news_reader", |b| {
        b.iter(|| demo.evaluate(&reader, NOW))
    });
    g.bench_function("demo_rules_over_a_120_event_reader", |b| {
        b.iter(|| demo.evaluate(&long, NOW))
    });
    g.bench_function("demo_rules_over_the_same_pruned", |b| {
        b.iter(|| demo.evaluate(&pruned, NOW))
    });
    g.bench_function("pruning_a_120_event_reader", |b| {
        b.iter(|| needs.prune(&long))
    });
    g.bench_function("pruning_it_pruned_with_two_new_events", |b| {
        b.iter(|| needs.prune(&step))
    });
    g.bench_function("user_view_of_300_cell_row", |b| {
        b.iter(|| dmp_rules::UserView::new(&row, NOW).events.len())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
