#![allow(missing_docs)] // criterion_group! generates undocumented functions
//! The storage writer's work on a batch of 2000 records, from their bytes to the events' cells
//! (the enrichment left out): each record parsed with a borrowing `EventRef` and its cells made
//! slices of the record (`event_ref_cells`), against each parsed into an owned `Event` whose
//! strings move into the cells (`event_cells`, how the writer did it before). The records are
//! the loadtest's pageviews and searches as the ingest endpoint sends them on.
//!
//! `cargo bench -p dmp-storage-writer --bench cells`

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use dmp_core::event::{Event, EventLimits, EventRef};
use dmp_storage_writer::cells::{event_cells, event_ref_cells};
use dmp_storage_writer::Enrichment;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc; // as in the dmp binary

const NOW: i64 = 1_795_341_600_000;

fn records() -> Vec<Vec<u8>> {
    let ua = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36";
    (0..2000u64)
        .map(|i| {
            let search = i % 5 == 0;
            format!(
                r#"{{"uid":"{:016x}","ts":{},"ua":"{ua}","ip":"{}.{}.{}.{}","src":"web","type":"{}","url":"https://{}.example.ru/catalog/{}/item-{}","ref":"https://www.example.com/"{}}}"#,
                i.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                NOW - 500 + (i % 400) as i64,
                81 + i % 100,
                i % 250,
                (i * 7) % 250,
                1 + i % 200,
                if search { "search" } else { "pageview" },
                ["shop", "news", "auto", "realty"][(i % 4) as usize],
                i % 97,
                i,
                if search { r#","q":"ипотека на вторичное жильё""# } else { "" },
            )
            .into_bytes()
        })
        .collect()
}

fn cells(c: &mut Criterion) {
    let records = records();
    let limits = EventLimits::default();
    let en = Enrichment::default();
    let mut g = c.benchmark_group("writer");
    g.throughput(Throughput::Elements(records.len() as u64));
    g.bench_function("cells_2000_slices_of_the_record", |b| {
        b.iter_batched(
            || records.clone(),
            |records| {
                records
                    .into_iter()
                    .map(|v| {
                        let buf = Bytes::from(v);
                        let ev = EventRef::parse(&buf, NOW, &limits).expect("a valid event");
                        event_ref_cells(ev, &buf, &en)
                    })
                    .collect::<Vec<_>>()
            },
            BatchSize::LargeInput,
        )
    });
    g.bench_function("cells_2000_strings_copied_out", |b| {
        b.iter_batched(
            || records.clone(),
            |records| {
                let cells = records
                    .iter()
                    .map(|v| {
                        event_cells(Event::parse(v, NOW, &limits).expect("a valid event"), &en)
                    })
                    .collect::<Vec<_>>();
                // The records are dropped outside the timing, as the other's are with its cells.
                (records, cells)
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, cells);
criterion_main!(benches);
