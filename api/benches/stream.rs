#![allow(missing_docs)] // criterion_group! generates undocumented functions
//! The partner stream's lines (`GET /v1/stream/segments`): a batch of 1000 segment records made
//! into NDJSON as the endpoint does, against the JSON tree it built before (side by side).
//!
//! `cargo bench -p dmp-api --bench stream`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dmp_core::segment::SegmentUpdate;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc; // as in the dmp binary

fn records() -> Vec<dmp_bus::Record> {
    (0..1000u64)
        .map(|i| {
            let uid = format!("lt-3-{}", 100_000 + i * 37);
            let update = SegmentUpdate {
                uid: uid.clone(),
                segments: vec!["cat_lovers".into(), "mortgage_intent".into()],
                added: vec!["mortgage_intent".into()],
                removed: vec![],
                evaluated_at: 1_795_341_600_100 + i as i64,
                last_event_ts: 1_795_341_600_000 + i as i64,
                rules_version: "demo-1".into(),
            };
            dmp_bus::Record {
                topic: "dmp.segments".into(),
                partition: (i % 8) as u32,
                offset: 1_000_000 + i,
                timestamp: 1_795_341_600_200 + i as i64,
                key: uid.into_bytes(),
                value: update.to_json(),
            }
        })
        .collect()
}

fn lines(c: &mut Criterion) {
    let records = records();
    let mut g = c.benchmark_group("stream");
    g.throughput(Throughput::Elements(records.len() as u64));
    g.bench_function("write_line_1000_records", |b| {
        b.iter(|| {
            let mut out = Vec::with_capacity(records.len() * 256);
            for r in &records {
                dmp_api::stream::write_line(r, &mut out);
            }
            out
        })
    });
    // The way before: each record parsed into a tree, the line built as a tree and printed.
    g.bench_function("json_tree_1000_records", |b| {
        b.iter(|| {
            let mut out = Vec::with_capacity(records.len() * 256);
            for r in &records {
                let line = dmp_api::stream::line_tree(r);
                out.extend_from_slice(line.to_string().as_bytes());
                out.push(b'\n');
            }
            out
        })
    });
    g.finish();
}

criterion_group!(benches, lines);
criterion_main!(benches);
