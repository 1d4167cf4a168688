//! Reads of the embedded store equal a model of HBase's semantics, written independently of the
//! store's merge: the latest write of a coordinate (family, qualifier, version) wins, a column
//! keeps its newest `max_versions` versions, cells past their family's TTL are gone, and a family
//! removed from the schema is invisible. Random writes and reads, with repacks after two deltas,
//! with the row cache on and off; some reads projected (`Get::projection`, against
//! `Projection::apply` of the model's row).

use std::collections::BTreeMap;

use dmp_core::clock::{now_ms, DAY_MS};
use dmp_core::config::FamilyConfig;
use dmp_core::Cell;
use dmp_store::embedded::{open_temp_with, EmbeddedStore};
use dmp_store::{Get, Projection, Put, UserStore};
use proptest::prelude::*;

/// Families: `e` (2-day TTL, 3 versions), `s` (1 version), `m` (2 versions), `x` (dropped from
/// the schema of the second reader).
fn config(cache_mb: u64, with_x: bool) -> dmp_core::Config {
    let mut cfg = dmp_core::Config::defaults();
    cfg.store.row_cache_mb = cache_mb;
    cfg.store.repack_after_deltas = 2;
    let fam = |ttl_days, max_versions| FamilyConfig {
        ttl_days,
        max_versions,
    };
    cfg.store.families = BTreeMap::from([
        ("e".to_string(), fam(2, 3)),
        ("s".to_string(), fam(0, 1)),
        ("m".to_string(), fam(0, 2)),
    ]);
    if with_x {
        cfg.store.families.insert("x".to_string(), fam(0, 5));
    }
    cfg
}

const FAMILIES: [&str; 4] = ["e", "s", "m", "x"];

/// A version: an hour ago plus `t` ms, or three days ago (past `e`'s TTL) when `old`. Far from
/// the TTL's edge, so the read's clock does not matter.
fn version(t: i64, old: bool) -> i64 {
    static T0: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    let t0 = *T0.get_or_init(|| now_ms() - 3_600_000);
    if old {
        t0 - 3 * DAY_MS + t
    } else {
        t0 + t
    }
}

/// Cells of a write: (family, qualifier, version offset, old, value byte).
type Write = Vec<(usize, u8, i64, bool, u8)>;

fn writes() -> impl Strategy<Value = Vec<(u8, Write)>> {
    let cell = (
        0usize..4,
        0u8..3,
        0i64..6,
        prop::bool::weighted(0.2),
        any::<u8>(),
    );
    prop::collection::vec((0u8..3, prop::collection::vec(cell, 1..8)), 1..40)
}

type Model = BTreeMap<(String, String, String, std::cmp::Reverse<i64>), Vec<u8>>;

/// The row the model says a reader with `families` should see.
fn expected(model: &Model, row: &str, families: &BTreeMap<String, FamilyConfig>) -> Vec<Cell> {
    let now = now_ms();
    let mut out: Vec<Cell> = Vec::new();
    let mut column: Option<(String, String)> = None;
    let mut versions = 0;
    for ((r, f, q, std::cmp::Reverse(ts)), v) in model {
        if r != row {
            continue;
        }
        let Some(fam) = families.get(f) else { continue };
        let this = (f.clone(), q.clone());
        versions = if column.as_ref() == Some(&this) {
            versions + 1
        } else {
            1
        };
        column = Some(this);
        let expired = fam.ttl_days > 0 && *ts < now - fam.ttl_days as i64 * DAY_MS;
        if versions <= fam.max_versions && !expired {
            out.push(Cell::new(f.as_str(), q.as_str(), *ts, v.clone()));
        }
    }
    out
}

fn read(store: &EmbeddedStore, row: &str) -> Vec<Cell> {
    store
        .get(&Get::row(row))
        .unwrap()
        .map(|r| r.cells)
        .unwrap_or_default()
}

/// The projection reads use: of family `e`, `q0` and qualifiers starting with `q2`; `q1` comes
/// back as markers.
fn projection() -> std::sync::Arc<Projection> {
    std::sync::Arc::new(Projection::new("e", ["q0"], ["q2"]))
}

fn read_projected(store: &EmbeddedStore, row: &str) -> Vec<Cell> {
    let get = Get {
        projection: Some(projection()),
        ..Get::row(row)
    };
    store
        .get(&get)
        .unwrap()
        .map(|r| r.cells)
        .unwrap_or_default()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn given_random_writes_when_read_then_rows_equal_the_model(
        writes in writes(),
        cache_mb in prop::sample::select(vec![0u64, 8, 512]),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(cache_mb, true);
        let (db, store) = open_temp_with(dir.path(), &cfg).unwrap();
        let mut model = Model::new();
        for (r, cells) in &writes {
            let row = format!("user-{r}");
            let cells: Vec<Cell> = cells
                .iter()
                .map(|&(f, q, t, old, v)| Cell::new(FAMILIES[f], format!("q{q}"), version(t, old), vec![v]))
                .collect();
            for c in &cells {
                model.insert(
                    (row.clone(), c.family.to_string(), c.qualifier.to_string(), std::cmp::Reverse(c.ts)),
                    c.value.to_vec(),
                );
            }
            store.put(&[Put { row: row.clone(), cells }]).unwrap();
            // Reads between writes merge, cache and repack (after two deltas), whole or projected.
            let want = expected(&model, &row, &cfg.store.families);
            if r % 2 == 0 {
                prop_assert_eq!(read(&store, &row), want);
            } else {
                prop_assert_eq!(read_projected(&store, &row), projection().apply(want));
            }
        }
        let without_x = config(cache_mb, false);
        let reader = EmbeddedStore::open(&db, &without_x.store).unwrap();
        for r in 0..3 {
            let row = format!("user-{r}");
            prop_assert_eq!(read(&store, &row), expected(&model, &row, &cfg.store.families));
            prop_assert_eq!(read(&reader, &row), expected(&model, &row, &without_x.store.families));
            let want = expected(&model, &row, &without_x.store.families);
            prop_assert_eq!(read_projected(&reader, &row), projection().apply(want));
        }
    }
}
