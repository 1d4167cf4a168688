//! Slots: a put whose cells all belong to families kept at one version overwrites one slot per
//! column instead of appending a delta (the segmenter's write-back at every evaluation). Checked
//! here: such writes leave one stored cell per column however many there were; a write older
//! than the column's newest version is dropped and never replaces it (each slot of a put checked
//! against its own version); slots merge in write order with deltas, through repacks; TTL is
//! enforced on them by compaction; they survive a reopen; an unreadable slot is replaced by the
//! next write instead of failing it. Each with the row cache on and off where the cache takes
//! part. (The random-operation tests in `merge_model.rs` and `row_cache.rs` write slots too:
//! their families `s` and `m` have one version.)

use std::collections::BTreeMap;

use dmp_core::clock::{now_ms, DAY_MS};
use dmp_core::config::FamilyConfig;
use dmp_core::Cell;
use dmp_store::embedded::{major_compact, open_temp_with, EmbeddedStore};
use dmp_store::{Get, Put, UserStore};

fn config(cache_mb: u64) -> dmp_core::Config {
    let mut cfg = dmp_core::Config::defaults();
    cfg.store.row_cache_mb = cache_mb;
    cfg.store.repack_after_deltas = 2;
    // `t`: one version, a 1-day TTL.
    cfg.store.families.insert(
        "t".into(),
        FamilyConfig {
            ttl_days: 1,
            max_versions: 1,
        },
    );
    cfg
}

fn put(store: &EmbeddedStore, cells: Vec<Cell>) {
    store
        .put(&[Put {
            row: "u".into(),
            cells,
        }])
        .unwrap();
}

fn read(store: &EmbeddedStore) -> Vec<Cell> {
    store
        .get(&Get::row("u"))
        .unwrap()
        .map(|r| r.cells)
        .unwrap_or_default()
}

fn value(cells: &[Cell], family: &str, qualifier: &str) -> Option<(i64, String)> {
    cells
        .iter()
        .find(|c| c.family == family && c.qualifier == qualifier)
        .map(|c| (c.ts, String::from_utf8_lossy(&c.value).into_owned()))
}

#[test]
fn given_many_single_version_writes_then_one_cell_per_column_is_stored() {
    for cache_mb in [0, 64] {
        let dir = tempfile::tempdir().unwrap();
        let (_db, store) = open_temp_with(dir.path(), &config(cache_mb)).unwrap();
        let t0 = now_ms() - 1000;
        put(&store, vec![Cell::new("e", "url", t0, b"/a".to_vec())]);
        for i in 0..100 {
            put(
                &store,
                vec![
                    Cell::new("s", "evaluated", t0 + i, format!("{i}").into_bytes()),
                    Cell::new("m", "bot", t0 + i, b"0".to_vec()),
                ],
            );
            if i % 10 == 0 {
                read(&store);
            }
        }
        // As deltas: 1 + 200 cells on disk (no read repacks before the 16 x 2 deltas a cached
        // row waits for, or with no cache 2 deltas, but each repack then folds them into the
        // base). As slots: one per column, whatever was read when.
        assert_eq!(
            store.stored_cells("u").unwrap(),
            3,
            "row_cache_mb = {cache_mb}"
        );
        let cells = read(&store);
        assert_eq!(
            value(&cells, "s", "evaluated"),
            Some((t0 + 99, "99".into()))
        );
        assert_eq!(value(&cells, "e", "url"), Some((t0, "/a".into())));
    }
}

#[test]
fn given_an_older_version_written_after_a_newer_then_the_newer_stays() {
    for cache_mb in [0, 64] {
        let dir = tempfile::tempdir().unwrap();
        let (db, store) = open_temp_with(dir.path(), &config(cache_mb)).unwrap();
        let t0 = now_ms() - 1000;
        put(
            &store,
            vec![Cell::new("s", "current", t0 + 200, b"new".to_vec())],
        );
        read(&store); // cached, when there is a cache
        put(
            &store,
            vec![Cell::new("s", "current", t0 + 100, b"old".to_vec())],
        );
        assert_eq!(
            value(&read(&store), "s", "current"),
            Some((t0 + 200, "new".into())),
            "row_cache_mb = {cache_mb}"
        );
        // The same version again is a later write of the same cell: it wins.
        put(
            &store,
            vec![Cell::new("s", "current", t0 + 200, b"again".to_vec())],
        );
        assert_eq!(
            value(&read(&store), "s", "current"),
            Some((t0 + 200, "again".into()))
        );
        assert_eq!(store.stored_cells("u").unwrap(), 1);
        // A reader without the cache (the LSM) agrees.
        let lsm = EmbeddedStore::open(&db, &config(0).store).unwrap();
        assert_eq!(read(&lsm), read(&store));
    }
}

#[test]
fn given_one_put_of_several_slots_of_a_row_then_each_is_checked_against_its_own_version() {
    let t0 = now_ms() - 1000;
    let cell = |q: &str, t: i64, v: &str| Cell::new("s", q, t0 + t, v.as_bytes().to_vec());
    let row = |row: &str, cells: Vec<Cell>| Put {
        row: row.into(),
        cells,
    };
    for cache_mb in [0, 64] {
        let dir = tempfile::tempdir().unwrap();
        let (db, store) = open_temp_with(dir.path(), &config(cache_mb)).unwrap();
        put(
            &store,
            vec![cell("current", 200, "a2"), cell("evaluated", 100, "b1")],
        );
        // Cached, when there is a cache.
        read(&store);
        // One call, other users' rows between this row's puts: of its three slots, the older
        // `current` is dropped, the newer `evaluated` and the new `shadow` are written.
        store
            .put(&[
                row(
                    "u",
                    vec![cell("current", 150, "a1"), cell("evaluated", 300, "b3")],
                ),
                row("t", vec![cell("current", 0, "x")]),
                row("v", vec![cell("current", 0, "y")]),
                row("u", vec![cell("shadow", 300, "c3")]),
            ])
            .unwrap();
        let cells = read(&store);
        let ctx = format!("row_cache_mb = {cache_mb}");
        for (q, t, v) in [
            ("current", 200, "a2"),
            ("evaluated", 300, "b3"),
            ("shadow", 300, "c3"),
        ] {
            assert_eq!(
                value(&cells, "s", q),
                Some((t0 + t, v.into())),
                "{q}, {ctx}"
            );
        }
        assert_eq!(store.stored_cells("u").unwrap(), 3, "{ctx}");
        // A reader without the cache (the LSM) agrees.
        let lsm = EmbeddedStore::open(&db, &config(0).store).unwrap();
        assert_eq!(read(&lsm), cells, "{ctx}");
    }
}

#[test]
fn given_slots_and_deltas_of_one_column_then_the_last_write_wins_through_repacks() {
    for cache_mb in [0, 64] {
        let dir = tempfile::tempdir().unwrap();
        let (db, store) = open_temp_with(dir.path(), &config(cache_mb)).unwrap();
        let t = now_ms() - 1000;
        // A slot, then a delta (a put with a cell of `e` too) writing the same cell: the delta
        // is the later write.
        put(&store, vec![Cell::new("s", "current", t, b"slot".to_vec())]);
        put(
            &store,
            vec![
                Cell::new("e", "url", t, b"/a".to_vec()),
                Cell::new("s", "current", t, b"delta".to_vec()),
            ],
        );
        assert_eq!(
            value(&read(&store), "s", "current"),
            Some((t, "delta".into()))
        );
        // Deltas past the repack threshold (2 uncached, 32 cached) fold the slot and the deltas
        // into the base; the slot is gone from disk, and the delta's write still wins.
        for i in 1..40 {
            put(&store, vec![Cell::new("e", "url", t + i, b"/b".to_vec())]);
            read(&store);
        }
        assert_eq!(
            value(&read(&store), "s", "current"),
            Some((t, "delta".into())),
            "row_cache_mb = {cache_mb}"
        );
        // A slot written after the repack is the latest write again.
        put(
            &store,
            vec![Cell::new("s", "current", t, b"slot2".to_vec())],
        );
        assert_eq!(
            value(&read(&store), "s", "current"),
            Some((t, "slot2".into()))
        );
        let lsm = EmbeddedStore::open(&db, &config(0).store).unwrap();
        assert_eq!(read(&lsm), read(&store));
    }
}

#[test]
fn given_an_expired_slot_when_compacted_then_it_is_gone_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, store) = open_temp_with(dir.path(), &config(0)).unwrap();
    let now = now_ms();
    put(
        &store,
        vec![
            Cell::new("t", "old", now - 3 * DAY_MS, b"gone".to_vec()),
            Cell::new("t", "new", now, b"kept".to_vec()),
        ],
    );
    assert_eq!(store.stored_cells("u").unwrap(), 2);
    major_compact(&store).unwrap();
    assert_eq!(store.stored_cells("u").unwrap(), 1, "expired slot on disk");
    // The kept slot was read back through its sequence number after compaction.
    let cells = read(&store);
    assert_eq!(value(&cells, "t", "new"), Some((now, "kept".into())));
    assert_eq!(value(&cells, "t", "old"), None);
}

#[test]
fn given_slots_when_reopened_then_they_are_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let t = now_ms() - 1000;
    {
        let (_db, store) = open_temp_with(dir.path(), &config(64)).unwrap();
        put(&store, vec![Cell::new("e", "url", t, b"/a".to_vec())]);
        put(
            &store,
            vec![Cell::new("s", "current", t + 1, b"x".to_vec())],
        );
        store.flush().unwrap();
    }
    let (_db, store) = open_temp_with(dir.path(), &config(64)).unwrap();
    let cells = read(&store);
    let got: BTreeMap<_, _> = cells
        .iter()
        .map(|c| (format!("{}:{}", c.family, c.qualifier), c.ts))
        .collect();
    assert_eq!(
        got,
        BTreeMap::from([("e:url".to_string(), t), ("s:current".to_string(), t + 1)])
    );
}

#[test]
fn given_an_unreadable_slot_when_written_then_the_write_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    let (db, store) = open_temp_with(dir.path(), &config(0)).unwrap();
    // The slot of s:current of row "u" (`uid 0x00 0x02 family 0x00 qualifier`), too short to
    // hold its sequence number.
    let rows = db
        .db()
        .keyspace(dmp_store::embedded::ROWS_KEYSPACE, Default::default)
        .unwrap();
    rows.insert(b"u\x00\x02s\x00current", b"bad".to_vec())
        .unwrap();
    assert!(
        store.get(&Get::row("u")).is_err(),
        "the read names it corrupt"
    );
    let t = now_ms();
    put(&store, vec![Cell::new("s", "current", t, b"new".to_vec())]);
    assert_eq!(
        value(&read(&store), "s", "current"),
        Some((t, "new".into()))
    );
}
