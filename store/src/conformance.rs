//! The conformance suite every [`UserStore`] backend passes. Each check gets a fresh, empty store
//! with dmp's default schema (`e`: TTL 180 days, 1000 versions; `s` and `m`: 1 version, no TTL).
//!
//! ```ignore
//! for (name, check) in dmp_store::conformance::checks() {
//!     let store = make_fresh_store();
//!     check(&store).unwrap_or_else(|e| panic!("{name}: {e}"));
//! }
//! ```

use dmp_core::clock::{now_ms, DAY_MS};
use dmp_core::Cell;

use crate::{Get, Put, UserStore};

/// A failed check.
pub type CheckResult = Result<(), String>;

/// A named check.
pub type Check = fn(&dyn UserStore) -> CheckResult;

/// Every check, by name.
pub fn checks() -> Vec<(&'static str, Check)> {
    vec![
        (
            "put_then_get_returns_cells_in_hbase_order",
            put_then_get_returns_cells_in_hbase_order as Check,
        ),
        ("missing_row_reads_as_none", missing_row_reads_as_none),
        (
            "rewriting_the_same_cells_is_idempotent",
            rewriting_the_same_cells_is_idempotent,
        ),
        (
            "same_coordinates_newer_write_wins",
            same_coordinates_newer_write_wins,
        ),
        ("family_and_column_filters", family_and_column_filters),
        (
            "projection_keeps_read_columns_and_marks_the_rest",
            projection_keeps_read_columns_and_marks_the_rest,
        ),
        ("time_range_and_max_versions", time_range_and_max_versions),
        ("cell_cap_limits_the_read", cell_cap_limits_the_read),
        ("family_max_versions_enforced", family_max_versions_enforced),
        ("family_ttl_enforced", family_ttl_enforced),
        (
            "delete_row_removes_every_cell",
            delete_row_removes_every_cell,
        ),
        (
            "delete_rows_removes_each_row_and_only_them",
            delete_rows_removes_each_row_and_only_them,
        ),
        ("bad_requests_are_rejected", bad_requests_are_rejected),
        (
            "scan_returns_rows_in_key_order",
            scan_returns_rows_in_key_order,
        ),
        ("many_writes_to_one_row_merge", many_writes_to_one_row_merge),
        ("get_many_reads_each_row", get_many_reads_each_row),
        (
            "get_since_returns_exactly_the_writes_after_a_read",
            get_since_returns_exactly_the_writes_after_a_read,
        ),
    ]
}

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)*) => {
        if !$cond {
            return Err(format!($($fmt)*));
        }
    };
}

fn err(e: crate::StoreError) -> String {
    e.to_string()
}

fn t0() -> i64 {
    now_ms() - 60_000
}

fn put(store: &dyn UserStore, row: &str, cells: Vec<Cell>) -> CheckResult {
    store
        .put(&[Put {
            row: row.into(),
            cells,
        }])
        .map_err(err)
}

fn read(store: &dyn UserStore, get: &Get) -> Result<Vec<Cell>, String> {
    Ok(store
        .get(get)
        .map_err(err)?
        .map(|r| r.cells)
        .unwrap_or_default())
}

fn put_then_get_returns_cells_in_hbase_order(s: &dyn UserStore) -> CheckResult {
    let t = t0();
    put(
        s,
        "u1",
        vec![
            Cell::new("e", "url", t, b"https://a/".to_vec()),
            Cell::new("e", "url", t + 5, b"https://b/".to_vec()),
            Cell::new("e", "q", t + 1, "ипотека".as_bytes().to_vec()),
            Cell::new("m", "first_seen", t, t.to_be_bytes().to_vec()),
        ],
    )?;
    let row = s
        .get(&Get::row("u1"))
        .map_err(err)?
        .ok_or("row u1 not found")?;
    ensure!(row.key == "u1", "row key {}", row.key);
    let got: Vec<(&str, &str, i64)> = row.cells.iter().map(|c| c.coordinates()).collect();
    let want = vec![
        ("e", "q", t + 1),
        ("e", "url", t + 5),
        ("e", "url", t),
        ("m", "first_seen", t),
    ];
    ensure!(got == want, "order {got:?}, want {want:?}");
    ensure!(
        row.cells[1].value[..] == *b"https://b/",
        "value of newest url"
    );
    Ok(())
}

fn missing_row_reads_as_none(s: &dyn UserStore) -> CheckResult {
    ensure!(
        s.get(&Get::row("nobody")).map_err(err)?.is_none(),
        "missing row returned something"
    );
    Ok(())
}

fn rewriting_the_same_cells_is_idempotent(s: &dyn UserStore) -> CheckResult {
    let t = t0();
    let cells = vec![
        Cell::new("e", "url", t, b"x".to_vec()),
        Cell::new("e", "type", t, b"pageview".to_vec()),
    ];
    put(s, "u", cells.clone())?;
    let once = read(s, &Get::row("u"))?;
    for _ in 0..20 {
        put(s, "u", cells.clone())?;
    }
    let many = read(s, &Get::row("u"))?;
    ensure!(
        once == many,
        "replays changed the row: {once:?} vs {many:?}"
    );
    ensure!(many.len() == 2, "{} cells", many.len());
    Ok(())
}

fn same_coordinates_newer_write_wins(s: &dyn UserStore) -> CheckResult {
    let t = t0();
    put(s, "u", vec![Cell::new("e", "geo", t, b"old".to_vec())])?;
    put(s, "u", vec![Cell::new("e", "geo", t, b"new".to_vec())])?;
    let cells = read(s, &Get::row("u"))?;
    ensure!(cells.len() == 1, "{} cells", cells.len());
    ensure!(cells[0].value[..] == *b"new", "value {:?}", cells[0].value);
    Ok(())
}

fn family_and_column_filters(s: &dyn UserStore) -> CheckResult {
    let t = t0();
    put(
        s,
        "u",
        vec![
            Cell::new("e", "url", t, b"u".to_vec()),
            Cell::new("e", "q", t, b"q".to_vec()),
            Cell::new("s", "cats", t, b"".to_vec()),
            Cell::new("m", "bot", t, b"1".to_vec()),
        ],
    )?;
    let fams = read(
        s,
        &Get {
            families: vec!["s".into(), "m".into()],
            ..Get::row("u")
        },
    )?;
    ensure!(
        fams.iter().all(|c| c.family != "e") && fams.len() == 2,
        "family filter: {fams:?}"
    );
    let cols = read(
        s,
        &Get {
            columns: vec![("e".into(), "q".into())],
            ..Get::row("u")
        },
    )?;
    ensure!(
        cols.len() == 1 && cols[0].qualifier == "q",
        "column filter: {cols:?}"
    );
    Ok(())
}

fn projection_keeps_read_columns_and_marks_the_rest(s: &dyn UserStore) -> CheckResult {
    let t = t0();
    // Three events in two writes: one with a read cell, one with an attribute, one with only
    // cells left out; and a later write replacing a left-out cell.
    put(
        s,
        "p",
        vec![
            Cell::new("e", "url", t, b"https://a.example/".to_vec()),
            Cell::new("e", "ua", t, b"1".to_vec()),
            Cell::new("e", "a.plan", t - 1, b"gold".to_vec()),
            Cell::new("m", "bot", t, b"1".to_vec()),
        ],
    )?;
    put(
        s,
        "p",
        vec![
            Cell::new("e", "ip", t - 2, b"\x7f\0\0\x01".to_vec()),
            Cell::new("e", "ua", t - 2, b"2".to_vec()),
            Cell::new("e", "ua", t, b"3".to_vec()),
        ],
    )?;
    let projection = std::sync::Arc::new(crate::Projection::new("e", ["url"], ["a."]));
    let whole = read(s, &Get::row("p"))?;
    let projected = read(
        s,
        &Get {
            projection: Some(projection.clone()),
            ..Get::row("p")
        },
    )?;
    ensure!(
        projected == projection.apply(whole.clone()),
        "projected read {projected:?} of {whole:?}"
    );
    let marks: Vec<i64> = projected
        .iter()
        .filter(|c| c.family == "e" && c.qualifier.is_empty())
        .map(|c| c.ts)
        .collect();
    ensure!(
        marks == [t, t - 2],
        "one marker per version left out: {marks:?}"
    );
    ensure!(
        projected.iter().any(|c| c.qualifier == "a.plan") && projected.len() == 5,
        "url, the attribute, two markers and m:bot: {projected:?}"
    );
    Ok(())
}

fn time_range_and_max_versions(s: &dyn UserStore) -> CheckResult {
    let t = t0();
    let cells: Vec<Cell> = (0..10)
        .map(|i| Cell::new("e", "url", t + i, format!("v{i}").into_bytes()))
        .collect();
    put(s, "u", cells)?;
    let range = read(
        s,
        &Get {
            time_range: Some((t + 3, t + 6)),
            ..Get::row("u")
        },
    )?;
    let ts: Vec<i64> = range.iter().map(|c| c.ts - t).collect();
    ensure!(ts == vec![5, 4, 3], "time range [3,6): {ts:?}");
    let newest = read(
        s,
        &Get {
            max_versions: Some(2),
            ..Get::row("u")
        },
    )?;
    let ts: Vec<i64> = newest.iter().map(|c| c.ts - t).collect();
    ensure!(ts == vec![9, 8], "max 2 versions: {ts:?}");
    Ok(())
}

fn cell_cap_limits_the_read(s: &dyn UserStore) -> CheckResult {
    let t = t0();
    let cells: Vec<Cell> = (0..50)
        .map(|i| Cell::new("e", format!("a.k{i:02}"), t, b"v".to_vec()))
        .collect();
    put(s, "u", cells)?;
    let capped = read(
        s,
        &Get {
            max_cells: Some(7),
            ..Get::row("u")
        },
    )?;
    ensure!(capped.len() == 7, "cap 7 returned {}", capped.len());
    ensure!(
        capped[0].qualifier == "a.k00",
        "cap keeps the first cells in order"
    );
    Ok(())
}

fn family_max_versions_enforced(s: &dyn UserStore) -> CheckResult {
    let t = t0();
    for i in 0..3 {
        put(s, "u", vec![Cell::new("s", "cats", t + i, b"".to_vec())])?;
    }
    let cells = read(s, &Get::row("u"))?;
    ensure!(
        cells.len() == 1,
        "family s keeps 1 version, read {}",
        cells.len()
    );
    ensure!(cells[0].ts == t + 2, "the newest version is kept");
    Ok(())
}

fn family_ttl_enforced(s: &dyn UserStore) -> CheckResult {
    let now = now_ms();
    put(
        s,
        "u",
        vec![
            Cell::new("e", "url", now - 181 * DAY_MS, b"expired".to_vec()),
            Cell::new("e", "url", now - 179 * DAY_MS, b"alive".to_vec()),
            Cell::new("m", "first_seen", now - 3000 * DAY_MS, b"forever".to_vec()),
        ],
    )?;
    let cells = read(s, &Get::row("u"))?;
    let values: Vec<&[u8]> = cells.iter().map(|c| &c.value[..]).collect();
    ensure!(
        values == vec![b"alive".as_slice(), b"forever".as_slice()],
        "TTL: {values:?}"
    );
    Ok(())
}

fn delete_rows_removes_each_row_and_only_them(s: &dyn UserStore) -> CheckResult {
    let t = t0();
    for row in ["many-a", "many-b", "many-c", "many-ab"] {
        for i in 0..3 {
            put(s, row, vec![Cell::new("e", "url", t + i, b"x".to_vec())])?;
        }
        // A one-version family too (the embedded store keeps those apart).
        put(s, row, vec![Cell::new("s", "current", t, b"{}".to_vec())])?;
    }
    // Twice the same row, a row that does not exist, and none at all.
    s.delete_rows(&["many-b", "many-a", "many-b", "never-written"])
        .map_err(err)?;
    s.delete_rows(&[]).map_err(err)?;
    for gone in ["many-a", "many-b", "never-written"] {
        ensure!(
            s.get(&Get::row(gone)).map_err(err)?.is_none(),
            "row {gone} still there"
        );
    }
    // Neighbours in key order, one of them sharing a deleted row's name as a prefix.
    for kept in ["many-c", "many-ab"] {
        let cells = read(s, &Get::row(kept))?;
        ensure!(cells.len() == 4, "row {kept}: {} cells", cells.len());
    }
    written_again_as_a_new_row(s, "many-a", t)?;
    ensure!(
        s.delete_rows(&["many-c", ""]).is_err(),
        "an empty row key is refused"
    );
    Ok(())
}

/// A write to a deleted `row` (at `t` + 100 ms) starts a new row: that one cell, nothing of
/// before.
fn written_again_as_a_new_row(s: &dyn UserStore, row: &str, t: i64) -> CheckResult {
    put(s, row, vec![Cell::new("e", "url", t + 100, b"y".to_vec())])?;
    let cells = read(s, &Get::row(row))?;
    ensure!(
        cells.len() == 1,
        "a write after delete starts a new row: {}",
        cells.len()
    );
    Ok(())
}

fn delete_row_removes_every_cell(s: &dyn UserStore) -> CheckResult {
    let t = t0();
    for i in 0..12 {
        put(s, "gone", vec![Cell::new("e", "url", t + i, b"x".to_vec())])?;
    }
    put(s, "gone2", vec![Cell::new("e", "url", t, b"x".to_vec())])?;
    s.delete_row("gone").map_err(err)?;
    ensure!(
        s.get(&Get::row("gone")).map_err(err)?.is_none(),
        "row still there"
    );
    ensure!(
        s.get(&Get::row("gone2")).map_err(err)?.is_some(),
        "neighbour row deleted"
    );
    written_again_as_a_new_row(s, "gone", t)?;
    Ok(())
}

fn bad_requests_are_rejected(s: &dyn UserStore) -> CheckResult {
    let t = t0();
    let e = s
        .put(&[Put {
            row: "u".into(),
            cells: vec![Cell::new("nope", "x", t, b"".to_vec())],
        }])
        .err()
        .ok_or("unknown family accepted")?;
    ensure!(
        e.to_string().contains("nope"),
        "error does not name the family: {e}"
    );
    ensure!(
        e.kind() == dmp_core::ErrorKind::Rejected,
        "kind {}",
        e.kind()
    );
    ensure!(
        s.put(&[Put {
            row: String::new(),
            cells: vec![Cell::new("e", "x", t, b"".to_vec())]
        }])
        .is_err(),
        "empty row key accepted"
    );
    ensure!(
        s.get(&Get::row("u")).map_err(err)?.is_none(),
        "a rejected batch wrote something"
    );
    Ok(())
}

fn scan_returns_rows_in_key_order(s: &dyn UserStore) -> CheckResult {
    let t = t0();
    for row in ["b", "a", "ab", "c", "aa"] {
        put(
            s,
            row,
            vec![Cell::new("e", "url", t, row.as_bytes().to_vec())],
        )?;
    }
    let all = s.scan(None, 100, &Get::default()).map_err(err)?;
    let keys: Vec<&str> = all.iter().map(|r| r.key.as_str()).collect();
    ensure!(
        keys == vec!["a", "aa", "ab", "b", "c"],
        "scan order {keys:?}"
    );
    let page = s.scan(Some("aa"), 2, &Get::default()).map_err(err)?;
    let keys: Vec<&str> = page.iter().map(|r| r.key.as_str()).collect();
    ensure!(keys == vec!["ab", "b"], "scan after aa, limit 2: {keys:?}");
    Ok(())
}

fn many_writes_to_one_row_merge(s: &dyn UserStore) -> CheckResult {
    let t = t0();
    for i in 0..50 {
        let cells: Vec<Cell> = (0..10)
            .map(|j| Cell::new("e", format!("q{j}"), t + i, format!("{i}-{j}").into_bytes()))
            .collect();
        put(s, "heavy", cells)?;
        if i % 7 == 0 {
            read(s, &Get::row("heavy"))?; // reads in between may repack
        }
    }
    let cells = read(s, &Get::row("heavy"))?;
    ensure!(
        cells.len() == 500,
        "500 cells expected, read {}",
        cells.len()
    );
    let again = read(s, &Get::row("heavy"))?;
    ensure!(again == cells, "a second read differs");
    Ok(())
}

fn get_many_reads_each_row(s: &dyn UserStore) -> CheckResult {
    let t = t0();
    put(s, "x", vec![Cell::new("e", "url", t, b"1".to_vec())])?;
    let rows = s
        .get_many(&[Get::row("x"), Get::row("missing")])
        .map_err(err)?;
    ensure!(
        rows.len() == 2 && rows[0].is_some() && rows[1].is_none(),
        "{rows:?}"
    );
    Ok(())
}

/// A backend may always answer `None` (it cannot tell); when it answers, the cells are exactly
/// those of the writes after the read, as a read of them alone returns them.
fn get_since_returns_exactly_the_writes_after_a_read(s: &dyn UserStore) -> CheckResult {
    let t = t0();
    let row = "since";
    let cell = |f: &str, q: &str, ts: i64, v: &[u8]| Cell::new(f, q, ts, v.to_vec());
    put(
        s,
        row,
        vec![cell("e", "url", t, b"a"), cell("e", "q", t, b"x")],
    )?;
    put(s, "since-other", vec![cell("e", "url", t, b"o")])?;
    let get = Get::row(row);
    let (first, cursor) = s.get_with_cursor(&get).map_err(err)?;
    ensure!(
        first.map(|r| r.cells.len()) == Some(2),
        "the read with a cursor reads the row"
    );
    let Some(cursor) = cursor else {
        return Ok(()); // this store cannot say what was written since
    };
    // An event, a one-version cell (a slot in the embedded store), one coordinate twice (the
    // later write wins), and a write to another row.
    put(s, row, vec![cell("e", "url", t + 1, b"b")])?;
    put(s, row, vec![cell("s", "current", t + 1, b"{}")])?;
    put(s, row, vec![cell("e", "q", t + 1, b"y1")])?;
    put(s, row, vec![cell("e", "q", t + 1, b"y2")])?;
    put(s, "since-other", vec![cell("e", "url", t + 1, b"o2")])?;
    let expected = vec![
        cell("e", "q", t + 1, b"y2"),
        cell("e", "url", t + 1, b"b"),
        cell("s", "current", t + 1, b"{}"),
    ];
    let Some((cells, next)) = s.get_since(&get, cursor).map_err(err)? else {
        return Ok(());
    };
    ensure!(cells == expected, "writes since the read: {cells:?}");
    if let Some((cells, _)) = s.get_since(&get, next).map_err(err)? {
        ensure!(cells.is_empty(), "nothing written since: {cells:?}");
    }
    // Only a projection may go with it.
    let filtered = Get {
        time_range: Some((t, t + 10)),
        ..Get::row(row)
    };
    ensure!(
        s.get_since(&filtered, cursor).map_err(err)?.is_none(),
        "a read with a time range has no writes since"
    );
    // A full read after: the old cursor answers the same or not at all.
    let whole = read(s, &get)?;
    ensure!(whole.len() == 5, "the whole row: {whole:?}");
    if let Some((cells, _)) = s.get_since(&get, cursor).map_err(err)? {
        ensure!(cells == expected, "after a full read: {cells:?}");
    }
    // A deleted row has nothing to add to what was read before.
    s.delete_row(row).map_err(err)?;
    put(s, row, vec![cell("e", "url", t + 2, b"c")])?;
    ensure!(
        s.get_since(&get, next).map_err(err)?.is_none(),
        "a row deleted after the read answers none"
    );
    Ok(())
}
