//! The embedded store's row cache answers exactly what the LSM holds: random operations against a
//! store with the cache and one without give the same rows, and so do concurrent writers and
//! readers, compared at the end with a reader of the same database that has no cache.

use std::sync::Arc;

use dmp_core::Cell;
use dmp_store::embedded::{open_temp_with, EmbeddedStore};
use dmp_store::{Get, Put, UserStore};
use proptest::prelude::*;

fn config(cache_mb: u64) -> dmp_core::Config {
    let mut cfg = dmp_core::Config::defaults();
    cfg.store.row_cache_mb = cache_mb;
    cfg
}

/// A second view of `db` with no cache: every read goes to the LSM.
fn lsm_reader(db: &dmp_store::embedded::EmbeddedDatabase) -> EmbeddedStore {
    EmbeddedStore::open(db, &config(0).store).unwrap()
}

/// Cells to write, as (family, qualifier, version offset, value length).
type Cells = Vec<(u8, u8, i64, usize)>;

#[derive(Debug, Clone)]
enum Op {
    Put(Vec<(u8, Cells)>),
    Get(u8, Option<&'static str>, Option<u32>),
    Delete(u8),
    DeleteMany(Vec<u8>),
}

/// A version time a day ago plus `t` ms: inside family `e`'s 180-day TTL.
fn ts(t: i64) -> i64 {
    static T0: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *T0.get_or_init(|| dmp_core::clock::now_ms() - dmp_core::clock::DAY_MS) + t
}

fn row(r: u8) -> String {
    format!("user-{r}")
}

fn cell(fam: u8, q: u8, t: i64, len: usize, salt: usize) -> Cell {
    let family = ["e", "s", "m"][fam as usize % 3];
    // Values differ between writes of one coordinate, so the wrong winner shows.
    let value: Vec<u8> = (0..len.max(1)).map(|i| (i + salt) as u8).collect();
    Cell::new(family, format!("q{q}"), ts(t), value)
}

fn op() -> impl Strategy<Value = Op> {
    let cells = prop::collection::vec((0u8..3, 0u8..4, 1i64..6, 0usize..3000), 1..6);
    prop_oneof![
        5 => prop::collection::vec((0u8..5, cells), 1..4).prop_map(Op::Put),
        4 => (0u8..5, prop::option::of(prop::sample::select(vec!["e", "s"])), prop::option::of(1u32..3))
            .prop_map(|(r, f, v)| Op::Get(r, f, v)),
        1 => (0u8..5).prop_map(Op::Delete),
        1 => prop::collection::vec(0u8..5, 0..4).prop_map(Op::DeleteMany),
    ]
}

fn get(r: u8, family: Option<&str>, versions: Option<u32>) -> Get {
    Get {
        families: family.map(|f| vec![f.to_string()]).unwrap_or_default(),
        max_versions: versions,
        ..Get::row(row(r))
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Writes (some overwriting a coordinate, some over the repack threshold), reads with and
    /// without filters, and deletes give the same rows with the smallest cache (rows of up to
    /// 18 KB; a shard holds 32 KiB, so rows are evicted and too-large rows are not cached) as
    /// without a cache, and as the LSM read afterwards.
    #[test]
    fn given_random_operations_when_cached_then_reads_equal_the_uncached_store(ops in prop::collection::vec(op(), 1..60)) {
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (db, cached) = open_temp_with(d1.path(), &config(8)).unwrap();
        let (_db2, plain) = open_temp_with(d2.path(), &config(0)).unwrap();
        for (n, op) in ops.iter().enumerate() {
            match op {
                Op::Put(puts) => {
                    let puts: Vec<Put> = puts
                        .iter()
                        .map(|(r, cells)| Put {
                            row: row(*r),
                            cells: cells.iter().map(|&(f, q, t, len)| cell(f, q, t, len, n)).collect(),
                        })
                        .collect();
                    cached.put(&puts).unwrap();
                    plain.put(&puts).unwrap();
                }
                Op::Get(r, f, v) => {
                    let g = get(*r, *f, *v);
                    prop_assert_eq!(cached.get(&g).unwrap(), plain.get(&g).unwrap(), "{:?}", g);
                }
                Op::Delete(r) => {
                    cached.delete_row(&row(*r)).unwrap();
                    plain.delete_row(&row(*r)).unwrap();
                }
                Op::DeleteMany(rs) => {
                    // One commit on the cached side, one row at a time on the other.
                    let rows: Vec<String> = rs.iter().map(|r| row(*r)).collect();
                    let keys: Vec<&str> = rows.iter().map(String::as_str).collect();
                    cached.delete_rows(&keys).unwrap();
                    for k in &keys {
                        plain.delete_row(k).unwrap();
                    }
                }
            }
        }
        let lsm = lsm_reader(&db);
        for r in 0..5 {
            let g = Get::row(row(r));
            let want = plain.get(&g).unwrap();
            prop_assert_eq!(&cached.get(&g).unwrap(), &want);
            prop_assert_eq!(&lsm.get(&g).unwrap(), &want);
        }
    }
}

/// Two writers (one per family, as the storage writer and the segmenter are; 3000 batches each)
/// and two readers on 16 rows, reading until the writers are done while a third thread keeps
/// emptying the cache: afterwards every row read through the cache equals the LSM's, and repacks
/// from the cache kept the rows' deltas bounded.
#[test]
fn given_concurrent_writers_and_readers_then_the_cache_equals_the_lsm() {
    let dir = tempfile::tempdir().unwrap();
    let (db, store) = open_temp_with(dir.path(), &config(64)).unwrap();
    let store = Arc::new(store);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for (w, family) in ["e", "s"].into_iter().enumerate() {
        let store = store.clone();
        writers.push(std::thread::spawn(move || {
            for n in 1..=3000i64 {
                let puts: Vec<Put> = (0..4)
                    .map(|i| Put {
                        row: format!("u{}", (n * 7 + i + w as i64) % 16),
                        cells: vec![Cell::new(
                            family,
                            format!("q{}", n % 5),
                            ts(n % 50),
                            n.to_be_bytes().to_vec(),
                        )],
                    })
                    .collect();
                store.put(&puts).unwrap();
            }
        }));
    }
    let mut readers = Vec::new();
    // Rows keep leaving the cache, so reads keep missing and racing the writes (a miss that
    // inserts what it read after a write it did not see would leave the row stale).
    {
        let (store, stop) = (store.clone(), stop.clone());
        readers.push(std::thread::spawn(move || {
            let mut n = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                store.clear_row_cache();
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            n
        }));
    }
    for _ in 0..2 {
        let (store, stop) = (store.clone(), stop.clone());
        readers.push(std::thread::spawn(move || {
            let mut n = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                store.get(&Get::row(format!("u{}", n % 16))).unwrap();
            }
            n
        }));
    }
    for w in writers {
        w.join().unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads: Vec<i64> = readers.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(reads.iter().all(|n| *n > 0), "reads: {reads:?}");
    let lsm = lsm_reader(&db);
    for r in 0..16 {
        let g = Get::row(format!("u{r}"));
        let want = lsm.get(&g).unwrap();
        assert!(want.is_some());
        assert_eq!(store.get(&g).unwrap(), want, "row u{r}");
    }
    let (bytes, rows) = store.row_cache_usage();
    assert_eq!(rows, 16, "every row cached again ({bytes} bytes)");
    // Repacks from the cache keep the rows' delta records bounded.
    for r in 0..16 {
        let stored = store.stored_cells(&format!("u{r}")).unwrap();
        assert!(stored < 400, "row u{r} keeps {stored} cells on disk");
    }
}

/// A repack from the cache writes the merged row as the base and removes the deltas it lists:
/// the LSM then holds one value per coordinate, and a reader without cache sees the same row.
#[test]
fn given_a_cached_row_over_the_repack_threshold_then_it_is_repacked_without_an_lsm_read() {
    let dir = tempfile::tempdir().unwrap();
    let (db, store) = open_temp_with(dir.path(), &config(64)).unwrap();
    let put = |t: i64| {
        store
            .put(&[Put {
                row: "u".into(),
                cells: vec![
                    Cell::new("e", "page", ts(t), format!("p{t}").into_bytes()),
                    Cell::new("s", "current", ts(t), format!("s{t}").into_bytes()),
                ],
            }])
            .unwrap()
    };
    put(1);
    // Cached now.
    assert!(store.get(&Get::row("u")).unwrap().is_some());
    // A cached row is repacked after 16 x repack_after_deltas (128) writes: 140 puts repack once.
    for ts in 2..=140 {
        put(ts);
        store.get(&Get::row("u")).unwrap();
        if ts == 128 {
            // Not before: every write is still its own delta.
            assert_eq!(store.stored_cells("u").unwrap(), 2 * 128, "repacked early");
        }
    }
    let row = store.get(&Get::row("u")).unwrap().unwrap();
    // 140 versions of e:page, the newest s:current only (max_versions = 1).
    assert_eq!(row.cells.len(), 141);
    assert_eq!(
        row.cells.iter().find(|c| c.family == "s").unwrap().value,
        "s140"
    );
    let stored = store.stored_cells("u").unwrap();
    // Unrepacked: 280 cells (2 per put). Repacked at the 129th delta: a base of 130, then 11
    // deltas.
    assert!(stored <= 130 + 2 * 11, "{stored} cells stored: repacked");
    assert_eq!(lsm_reader(&db).get(&Get::row("u")).unwrap(), Some(row));
}
