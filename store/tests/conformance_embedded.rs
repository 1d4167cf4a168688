//! The store conformance suite on the embedded backend, plus what only the embedded backend has:
//! TTL enforced on disk by compaction, and bytes per cell.

use dmp_core::clock::{now_ms, DAY_MS};
use dmp_core::Cell;
use dmp_store::embedded::{major_compact, open_temp, open_temp_with};
use dmp_store::{conformance, Get, Instrumented, Put, UserStore};

#[test]
fn given_embedded_store_when_running_conformance_then_every_check_passes() {
    let mut failures = Vec::new();
    // With the default row cache, without one, and with the smallest (rows evicted).
    for cache_mb in [512, 0, 8] {
        let mut cfg = dmp_core::Config::defaults();
        cfg.store.row_cache_mb = cache_mb;
        for (name, check) in conformance::checks() {
            let dir = tempfile::tempdir().unwrap();
            let (_db, store) = open_temp_with(dir.path(), &cfg).unwrap();
            let store = Instrumented::new(store);
            if let Err(e) = check(&store) {
                failures.push(format!("{name} (row_cache_mb = {cache_mb}): {e}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "conformance failures:\n{}",
        failures.join("\n")
    );
}

#[test]
fn given_expired_cells_when_compacted_then_they_are_gone_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, store) = open_temp(dir.path()).unwrap();
    let now = now_ms();
    store
        .put(&[Put {
            row: "u".into(),
            cells: vec![
                Cell::new("e", "url", now - 200 * DAY_MS, b"old".to_vec()),
                Cell::new("e", "url", now, b"new".to_vec()),
            ],
        }])
        .unwrap();
    store
        .put(&[Put {
            row: "v".into(),
            cells: vec![Cell::new("e", "url", now - 400 * DAY_MS, b"old".to_vec())],
        }])
        .unwrap();
    assert_eq!(store.stored_cells("u").unwrap(), 2);
    assert_eq!(store.stored_cells("v").unwrap(), 1);
    major_compact(&store).unwrap();
    assert_eq!(
        store.stored_cells("u").unwrap(),
        1,
        "expired cell still on disk"
    );
    assert_eq!(
        store.stored_cells("v").unwrap(),
        0,
        "expired row still on disk"
    );
    let row = store.get(&Get::row("u")).unwrap().unwrap();
    assert_eq!(&row.cells[0].value[..], b"new");
}

#[test]
fn given_data_when_reopened_then_rows_are_still_there() {
    let dir = tempfile::tempdir().unwrap();
    let t = now_ms();
    {
        let (_db, store) = open_temp(dir.path()).unwrap();
        for i in 0..100 {
            store
                .put(&[Put {
                    row: format!("u{i}"),
                    cells: vec![Cell::new("e", "url", t, format!("{i}").into_bytes())],
                }])
                .unwrap();
        }
    }
    let (_db, store) = open_temp(dir.path()).unwrap();
    for i in 0..100 {
        let row = store.get(&Get::row(format!("u{i}"))).unwrap().unwrap();
        assert_eq!(row.cells[0].value, format!("{i}").into_bytes());
    }
    // Later writes after a reopen never collide with earlier ones.
    store
        .put(&[Put {
            row: "u1".into(),
            cells: vec![Cell::new("e", "q", t, b"x".to_vec())],
        }])
        .unwrap();
    assert_eq!(store.get(&Get::row("u1")).unwrap().unwrap().cells.len(), 2);
}

#[test]
fn given_new_database_when_opened_then_rows_compact_into_l1_at_sixteen_l0_tables() {
    let dir = tempfile::tempdir().unwrap();
    let (db, _store) = open_temp(dir.path()).unwrap();
    let rows = db.keyspace(dmp_store::embedded::ROWS_KEYSPACE).unwrap();
    let strategy = rows.config.compaction_strategy.clone();
    assert_eq!(strategy.get_name(), "LeveledCompaction");
    let l0 = strategy
        .get_config()
        .into_iter()
        .find(|(k, _)| &**k == b"leveled_l0_threshold")
        .map(|(_, v)| v.to_vec());
    assert_eq!(l0, Some(vec![16]), "L0 tables that start a compaction");
}
