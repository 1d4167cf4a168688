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

/// The table files under `dir` (fjall keeps each keyspace's in a `tables` folder).
fn table_files(dir: &std::path::Path) -> std::collections::BTreeSet<std::path::PathBuf> {
    let mut out = std::collections::BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if d.file_name().is_some_and(|n| n == "tables") {
                out.insert(p);
            }
        }
    }
    out
}

/// A compaction's replaced tables are deleted, and old versions freed, on lsm-tree's reaper
/// thread instead of under the lock every write takes (vendor/lsm-tree/DMP-PATCH.md): they must
/// still leave the disk, soon after.
#[test]
fn given_tables_replaced_by_a_compaction_when_old_versions_are_freed_then_their_files_leave_the_disk(
) {
    let dir = tempfile::tempdir().unwrap();
    let (db, store) = open_temp(dir.path()).unwrap();
    let t = now_ms();
    // One version more of 500 rows, flushed and compacted into one table.
    let write = |store: &dmp_store::embedded::EmbeddedStore, ts: i64| {
        let puts: Vec<Put> = (0..500)
            .map(|i| Put {
                row: format!("u{i:04}"),
                cells: vec![Cell::new("e", "url", ts, vec![b'x'; 200])],
            })
            .collect();
        store.put(&puts).unwrap();
        major_compact(store).unwrap();
    };
    write(&store, t);
    let first = table_files(dir.path());
    assert!(!first.is_empty(), "the flush wrote no table");
    write(&store, t + 1);
    // The rows' table of the first round was compacted away with the second round's.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let now = table_files(dir.path());
        if first.iter().any(|f| !now.contains(f)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "replaced table files still on disk after 20 s: {first:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The rows read the same after it.
    let row = store.get(&Get::row("u0007")).unwrap().unwrap();
    assert_eq!(row.cells.len(), 2);
    // Closed and reopened in this process (closing waits for the deferred deletions, so none
    // can hit a table the reopened store writes), the rows are all there after more compactions.
    drop(store);
    drop(db);
    let (_db, store) = open_temp(dir.path()).unwrap();
    write(&store, t + 2);
    write(&store, t + 3);
    for i in (0..500).step_by(37) {
        let row = store.get(&Get::row(format!("u{i:04}"))).unwrap().unwrap();
        assert_eq!(row.cells.len(), 4, "row u{i:04}");
    }
}

#[test]
fn given_a_cached_row_when_asked_what_was_written_since_a_read_then_it_answers_until_it_cannot() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, store) = open_temp(dir.path()).unwrap();
    let t = now_ms() - 60_000;
    let put = |ts: i64, q: &str| {
        store
            .put(&[Put {
                row: "u".into(),
                cells: vec![
                    Cell::new("e", "url", ts, format!("https://x/{q}").into_bytes()),
                    Cell::new("e", "ua", ts, b"agent".to_vec()),
                ],
            }])
            .unwrap()
    };
    put(t, "a");
    // Read with the rules' projection: `ua` is left out, its versions kept as markers.
    let get = Get {
        projection: Some(std::sync::Arc::new(dmp_core::Projection::new(
            "e",
            ["url"],
            ["a."],
        ))),
        ..Get::row("u")
    };
    let (row, cursor) = store.get_with_cursor(&get).unwrap();
    assert_eq!(row.unwrap().cells.len(), 2, "url and a marker");
    let cursor = cursor.expect("the embedded store with its row cache gives a cursor");
    put(t + 1, "b");
    let (cells, next) = store
        .get_since(&get, cursor)
        .unwrap()
        .expect("cached: it answers");
    assert_eq!(
        cells,
        vec![
            dmp_core::Projection::new("e", ["url"], ["a."]).marker(t + 1),
            Cell::new("e", "url", t + 1, b"https://x/b".to_vec()),
        ],
        "the new write, projected"
    );
    // Beyond 32 writes since, it asks for a read instead (which folds them in).
    for i in 0..33 {
        put(t + 2 + i, "c");
    }
    assert!(store.get_since(&get, next).unwrap().is_none());
    let (row, cursor) = store.get_with_cursor(&get).unwrap();
    assert_eq!(row.unwrap().cells.len(), 2 * 35);
    let (cells, _) = store.get_since(&get, cursor.unwrap()).unwrap().unwrap();
    assert!(cells.is_empty());
    // Without a row cache there is no cursor.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = dmp_core::Config::defaults();
    cfg.store.row_cache_mb = 0;
    let (_db, store) = open_temp_with(dir.path(), &cfg).unwrap();
    put_into(&store, t);
    assert!(store.get_with_cursor(&get).unwrap().1.is_none());
}

fn put_into(store: &dyn UserStore, t: i64) {
    store
        .put(&[Put {
            row: "u".into(),
            cells: vec![Cell::new("e", "url", t, b"x".to_vec())],
        }])
        .unwrap();
}
