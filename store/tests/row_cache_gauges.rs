//! The row cache's gauges, which `store.row_cache_mb` is sized by. Its own test binary: it reads
//! the process's metrics, which another store in the same process would set too.

use std::time::{Duration, Instant};

use dmp_core::Cell;
use dmp_store::embedded::open_temp;
use dmp_store::{Get, Put, UserStore};

#[test]
fn given_rows_read_when_a_second_passes_then_the_row_cache_gauges_say_how_full_it_is() {
    let metrics = dmp_core::telemetry::init_metrics();
    let dir = tempfile::tempdir().unwrap();
    let (_db, store) = open_temp(dir.path()).unwrap();
    let now = dmp_core::clock::now_ms();
    for u in ["a", "b", "c"] {
        store
            .put(&[Put {
                row: u.into(),
                cells: vec![Cell::new("e", "url", now, b"https://x/".to_vec())],
            }])
            .unwrap();
        store.get(&Get::row(u)).unwrap().unwrap(); // read: cached
    }
    let (bytes, rows) = store.row_cache_usage();
    assert_eq!(rows, 3);
    let want = [
        format!("dmp_store_row_cache_rows {rows}"),
        format!("dmp_store_row_cache_bytes {bytes}"),
    ];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = metrics.render();
        if want.iter().all(|w| text.lines().any(|l| l == w)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "gauges not set: {want:?}\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
