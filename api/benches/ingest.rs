#![allow(missing_docs)] // criterion_group! generates undocumented functions
//! The ingest endpoint's work on a request of 2000 pageviews and searches (the loadtest's
//! `batch_max`, fields as its generator fills them), side by side with how it did it before:
//! - parsing the NDJSON body into a vector sized once (`ndjson_events`) against one grown from
//!   empty;
//! - making the records it produces to `dmp.events` with `Event::to_json` (its buffer sized once)
//!   against `serde_json::to_vec` (grown from empty);
//! - the whole of it: the lines checked in place and sent on as they are (`ndjson_events`, then
//!   `CheckedLine::to_json`, which appends the default source these lines lack) against each
//!   line parsed into an `Event` and written again.
//!
//! `cargo bench -p dmp-api --bench ingest`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dmp_core::event::{CheckedLine, Event, EventLimits};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc; // as in the dmp binary

const NOW: i64 = 1_795_341_600_000;

/// The request's lines: 2000 pageviews and searches.
fn lines() -> Vec<String> {
    let uas = [
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.6 Mobile/15E148 Safari/604.1",
        "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
    ];
    (0..2000u64)
        .map(|i| {
            let search = i % 5 == 0;
            format!(
                r#"{{"uid":"{:016x}","ts":{},"type":"{}","url":"https://{}.example.ru/catalog/{}/item-{}?utm_source=partner","ref":"https://www.example.com/search?q=item+{}","ip":"{}.{}.{}.{}","ua":"{}"{}}}"#,
                i.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                NOW - 500 + (i % 400) as i64,
                if search { "search" } else { "pageview" },
                ["shop", "news", "auto", "realty"][(i % 4) as usize],
                i % 97,
                i,
                i % 13,
                81 + i % 100,
                i % 250,
                (i * 7) % 250,
                1 + i % 200,
                uas[(i % 3) as usize],
                if search {
                    r#","q":"ипотека на вторичное жильё""#
                } else {
                    ""
                },
            )
        })
        .collect()
}

/// The request's events, as the endpoint accepts them.
fn events() -> Vec<Event> {
    lines()
        .iter()
        .map(|line| {
            let mut e =
                Event::parse(line.as_bytes(), NOW, &EventLimits::default()).expect("a valid event");
            e.src = Some("http".into());
            e
        })
        .collect()
}

fn parse(c: &mut Criterion) {
    let body = lines().join("\n").into_bytes();
    let limits = EventLimits::default();
    let mut g = c.benchmark_group("ingest");
    g.throughput(Throughput::Elements(2000));
    g.bench_function("parse_2000_ndjson_sized", |b| {
        b.iter(|| dmp_api::ingest::ndjson_events(&body, NOW, &limits, 10_000))
    });
    g.bench_function("parse_2000_ndjson_grown", |b| {
        b.iter(|| {
            body.split(|b| *b == b'\n')
                .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
                .map(|line| Event::check_line(line, NOW, "http", &limits))
                .collect::<Vec<_>>()
        })
    });
    g.finish();
}

fn lines_to_records(c: &mut Criterion) {
    let body = lines().join("\n").into_bytes();
    let limits = EventLimits::default();
    let mut g = c.benchmark_group("ingest");
    g.throughput(Throughput::Elements(2000));
    g.bench_function("records_2000_lines_sent_as_they_are", |b| {
        b.iter(|| {
            dmp_api::ingest::ndjson_events(&body, NOW, &limits, 10_000)
                .into_iter()
                .map(|c| {
                    let c = c.expect("a valid event");
                    assert!(matches!(c, CheckedLine::Line(_)));
                    (c.uid().as_bytes().to_vec(), c.to_json())
                })
                .collect::<Vec<_>>()
        })
    });
    g.bench_function("records_2000_lines_parsed_and_written_again", |b| {
        b.iter(|| {
            body.split(|b| *b == b'\n')
                .map(|line| {
                    let mut e = Event::parse(line, NOW, &limits).expect("a valid event");
                    e.src.get_or_insert_with(|| "http".into());
                    (e.uid.clone().into_bytes(), e.to_json())
                })
                .collect::<Vec<_>>()
        })
    });
    g.finish();
}

fn records(c: &mut Criterion) {
    let events = events();
    let mut g = c.benchmark_group("ingest");
    g.throughput(Throughput::Elements(events.len() as u64));
    g.bench_function("records_2000_to_json_sized", |b| {
        b.iter(|| events.iter().map(|e| e.to_json()).collect::<Vec<_>>())
    });
    g.bench_function("records_2000_serde_json_to_vec", |b| {
        b.iter(|| {
            events
                .iter()
                .map(|e| serde_json::to_vec(e).expect("serialises"))
                .collect::<Vec<_>>()
        })
    });
    g.finish();
}

criterion_group!(benches, parse, records, lines_to_records);
criterion_main!(benches);
