#![allow(missing_docs)] // criterion_group! generates undocumented functions
//! Embedded store benchmarks (issue: >= 300K cells/s written in batches of 8-cell rows; a
//! 500-cell row read in <= 100 us p99 on a store of >= 1M rows; memory bounded by config).
//!
//! `cargo bench -p dmp-store --bench store` prints, before criterion's figures, a report with the
//! write rate while loading 1M rows, the read latency percentiles (HDR histogram) of 500-cell
//! rows, bytes per cell on disk and the memory in use. Set `DMP_BENCH_ROWS` to change 1M.

use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion, Throughput};
use dmp_core::Cell;
use dmp_store::embedded::{open_temp, EmbeddedStore};
use dmp_store::{Get, Projection, Put, UserStore};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const HEAVY_ROWS: usize = 2000;

fn pageview(uid: &str, ts: i64, i: u64) -> Put {
    Put {
        row: uid.to_string(),
        cells: vec![
            Cell::new(
                "e",
                "url",
                ts,
                format!("https://news.example.ru/article/{}", i % 50_000).into_bytes(),
            ),
            Cell::new("e", "ref", ts, b"https://www.google.com/".to_vec()),
            Cell::new("e", "type", ts, b"pageview".to_vec()),
            Cell::new(
                "e",
                "ip",
                ts,
                ((i as u32).wrapping_mul(2_654_435_761))
                    .to_be_bytes()
                    .to_vec(),
            ),
            Cell::new("e", "ua", ts, ((i % 5000) as u32).to_be_bytes().to_vec()),
            Cell::new("e", "geo", ts, b"RU-NVS".to_vec()),
            Cell::new("e", "src", ts, b"pixel".to_vec()),
            Cell::new("e", "q", ts, "ипотека калькулятор".as_bytes().to_vec()),
        ],
    }
}

fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn load(store: &EmbeddedStore, rows: usize) -> f64 {
    let t0 = dmp_core::clock::now_ms() - 86_400_000;
    let start = Instant::now();
    let mut cells = 0u64;
    for chunk in 0..rows.div_ceil(1000) {
        let puts: Vec<Put> = (0..1000)
            .map(|j| {
                let i = (chunk * 1000 + j) as u64;
                pageview(
                    &format!("u{:09}", i.wrapping_mul(0x9E37_79B9) % 1_000_000_000),
                    t0 + i as i64,
                    i,
                )
            })
            .collect();
        cells += puts.iter().map(|p| p.cells.len() as u64).sum::<u64>();
        store.put(&puts).unwrap();
    }
    cells as f64 / start.elapsed().as_secs_f64()
}

fn heavy_rows(store: &EmbeddedStore) {
    // 2000 users with 500 cells each, written as 50 events of 10 cells and read as the segmenter
    // would after each change (so rows are repacked as in production).
    let t0 = dmp_core::clock::now_ms() - 86_400_000;
    for e in 0..50i64 {
        let puts: Vec<Put> = (0..HEAVY_ROWS)
            .map(|r| Put {
                row: format!("heavy{r:05}"),
                cells: (0..10)
                    .map(|q| {
                        Cell::new(
                            "e",
                            [
                                "url", "ref", "q", "type", "ip", "ua", "geo", "src", "a.x", "a.y",
                            ][q],
                            t0 + e * 1000,
                            format!("value-{e}-{q}-with-some-length").into_bytes(),
                        )
                    })
                    .collect(),
            })
            .collect();
        store.put(&puts).unwrap();
        for r in 0..HEAVY_ROWS {
            store.get(&Get::row(format!("heavy{r:05}"))).unwrap();
        }
    }
}

fn report() {
    let rows: usize = std::env::var("DMP_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().unwrap();
    let (db, store) = open_temp(dir.path()).unwrap();
    let rate = load(&store, rows);
    heavy_rows(&store);
    let mut hist = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    let mut x: u64 = 12345;
    let reads = 50_000;
    let mut cells_read = 0;
    for _ in 0..reads {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let row = format!("heavy{:05}", x % HEAVY_ROWS as u64);
        let t = Instant::now();
        let r = store.get(&Get::row(row)).unwrap().unwrap();
        hist.record(t.elapsed().as_nanos() as u64).unwrap();
        cells_read = r.cells.len();
    }
    store.flush().unwrap();
    let (rss, hwm) = rss_kib();
    let (cache_used, cache_cap) = db.cache_usage();
    let memtables = db.write_buffer_size();
    store.settle().unwrap();
    let total_cells = rows as u64 * 8 + HEAVY_ROWS as u64 * 500;
    let bytes = store.rows_disk_space();
    println!("== embedded store report ({rows} rows of 8 cells + {HEAVY_ROWS} rows of 500 cells)");
    println!(
        "write: {:.0} cells/s ({:.0} rows/s) in batches of 1000 rows x 8 cells",
        rate,
        rate / 8.0
    );
    println!(
        "read of a {cells_read}-cell row: p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us, max {:.1} us over {reads} reads",
        hist.value_at_quantile(0.5) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0,
        hist.value_at_quantile(0.999) as f64 / 1000.0,
        hist.max() as f64 / 1000.0
    );
    println!(
        "disk: {:.1} MiB for {total_cells} cells = {:.1} bytes/cell (after compaction, lz4 blocks)",
        bytes as f64 / 1048576.0,
        bytes as f64 / total_cells as f64
    );
    println!(
        "memory: block cache {:.0}/{:.0} MiB, memtables {:.1} MiB, process RSS {:.0} MiB (peak {:.0} MiB)",
        cache_used as f64 / 1048576.0,
        cache_cap as f64 / 1048576.0,
        memtables as f64 / 1048576.0,
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
}

fn benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let (_db, store) = open_temp(dir.path()).unwrap();
    let mut g = c.benchmark_group("store_embedded");
    g.throughput(Throughput::Elements(8000));
    g.measurement_time(Duration::from_secs(8));
    let mut n = 0u64;
    let t0 = dmp_core::clock::now_ms();
    g.bench_function("put_1000_rows_x_8_cells", |b| {
        b.iter(|| {
            let puts: Vec<Put> = (0..1000)
                .map(|_| {
                    n += 1;
                    pageview(
                        &format!("w{:08}", n.wrapping_mul(0x9E37_79B9) % 10_000_000),
                        t0 + n as i64,
                        n,
                    )
                })
                .collect();
            store.put(&puts).unwrap();
        })
    });
    heavy_rows(&store);
    g.throughput(Throughput::Elements(1));
    let mut r = 0usize;
    g.bench_function("get_500_cell_row", |b| {
        b.iter(|| {
            r = (r + 7919) % HEAVY_ROWS;
            store
                .get(&Get::row(format!("heavy{r:05}")))
                .unwrap()
                .unwrap()
        })
    });
    // The segmenter's cycle on a cached row: the storage writer appends an event (8 cells), then
    // the row is read whole, with the write merged in.
    let mut k = 0u64;
    let t1 = dmp_core::clock::now_ms();
    // Appends one event to the next heavy row; returns the row.
    let write_event = |k: &mut u64, r: &mut usize| {
        *k += 1;
        *r = (*r + 7919) % HEAVY_ROWS;
        let row = format!("heavy{r:05}");
        let mut put = pageview(&row, t1 + *k as i64, *k);
        put.row = row.clone();
        store.put(&[put]).unwrap();
        row
    };
    g.bench_function("write_event_then_read_500_cell_row", |b| {
        b.iter(|| {
            let row = write_event(&mut k, &mut r);
            store.get(&Get::row(row)).unwrap().unwrap()
        })
    });
    // The segmenter's read: the demo rules read `url`, `q` and `type` of the events (and custom
    // attributes); the other columns come back as one marker per event. Made once and shared, as
    // the segmenter shares its rule set's.
    let projection = std::sync::Arc::new(Projection::new("e", ["q", "type", "url"], ["a."]));
    let projected = |row: String| Get {
        projection: Some(projection.clone()),
        ..Get::row(row)
    };
    g.bench_function("get_500_cell_row_projected", |b| {
        b.iter(|| {
            r = (r + 7919) % HEAVY_ROWS;
            store
                .get(&projected(format!("heavy{r:05}")))
                .unwrap()
                .unwrap()
        })
    });
    // A segmenter batch's fired timers: 16 timer rows (one cell each, as `timer_put` writes
    // them) deleted a commit each, as before `delete_rows`, and in one commit. The puts that
    // make them are outside the measured time.
    let mut timer = 0u64;
    let mut timer_rows = || -> Vec<String> {
        let rows: Vec<String> = (0..16)
            .map(|_| {
                timer += 1;
                format!("\u{1}timer/00003/{:020}/u{timer:08}", t0 + timer as i64)
            })
            .collect();
        let puts: Vec<Put> = rows
            .iter()
            .map(|r| Put {
                row: r.clone(),
                cells: vec![Cell::new("m", "t", t0, Vec::new())],
            })
            .collect();
        store.put(&puts).unwrap();
        rows
    };
    g.throughput(Throughput::Elements(16));
    g.bench_function("delete_16_timer_rows_a_commit_each", |b| {
        b.iter_batched(
            &mut timer_rows,
            |rows| {
                for r in &rows {
                    store.delete_row(r).unwrap();
                }
            },
            criterion::BatchSize::SmallInput,
        )
    });
    g.bench_function("delete_16_timer_rows_in_one_commit", |b| {
        b.iter_batched(
            &mut timer_rows,
            |rows| {
                let keys: Vec<&str> = rows.iter().map(String::as_str).collect();
                store.delete_rows(&keys).unwrap();
            },
            criterion::BatchSize::SmallInput,
        )
    });
    g.throughput(Throughput::Elements(1));
    // The segmenter's whole cycle: a write of one event, then the projected read. Last: each
    // write grows the store, so a bench of writes or reads after it would meet a larger one.
    g.bench_function("write_event_then_read_500_cell_row_projected", |b| {
        b.iter(|| {
            let row = write_event(&mut k, &mut r);
            store.get(&projected(row)).unwrap().unwrap()
        })
    });
    g.finish();
}

criterion_group!(store_benches, benches);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo test --benches` runs benches with `--test`: keep that fast.
    if !args.iter().any(|a| a == "--test") {
        report();
    }
    store_benches();
    Criterion::default().configure_from_args().final_summary();
}
