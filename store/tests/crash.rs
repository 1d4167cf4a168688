//! kill -9 of a process writing to the embedded store loses no acknowledged cell.
//!
//! As the bus crash test: the test binary re-runs itself as a child (`crash_child`) that writes
//! rows (many small writes to a few hot rows, so reads repack them while the child is killed, and
//! one write per cold row) and prints each acknowledged write; the parent SIGKILLs it, reopens and
//! checks every acknowledged cell with that log as the oracle. Three cycles on one data dir.

#[path = "../../testsupport/kill9.rs"]
mod kill9;

use std::collections::BTreeSet;
use std::io::Write;

use dmp_core::Cell;
use dmp_store::embedded::open_temp;
use dmp_store::{Get, Put, UserStore};

#[test]
#[ignore = "child process of given_writer_killed_when_reopened_then_every_acknowledged_cell_is_there"]
fn crash_child() {
    let dir = std::env::var("DMP_CRASH_DIR").expect("run by the crash test");
    let cycle: u64 = std::env::var("DMP_CRASH_CYCLE").unwrap().parse().unwrap();
    let (_db, store) = open_temp(std::path::Path::new(&dir)).unwrap();
    let t0 = dmp_core::clock::now_ms() - 1_000_000;
    let mut stdout = std::io::stdout();
    for i in 0u64.. {
        let hot = format!("hot{}", i % 5);
        let cold = format!("cold-c{cycle}-{i}");
        let q = format!("c{cycle}-{i}");
        let ts = t0 + (cycle * 10_000_000 + i) as i64;
        store
            .put(&[
                Put {
                    row: hot.clone(),
                    cells: vec![Cell::new("e", q.clone(), ts, b"v".to_vec())],
                },
                Put {
                    row: cold.clone(),
                    cells: vec![Cell::new("e", "url", ts, q.clone().into_bytes())],
                },
            ])
            .unwrap();
        writeln!(stdout, "ack {hot} {q} {cold}").unwrap();
        stdout.flush().unwrap();
        if i % 3 == 0 {
            store.get(&Get::row(hot)).unwrap(); // repacks the hot row now and then
        }
    }
}

#[test]
fn given_writer_killed_when_reopened_then_every_acknowledged_cell_is_there() {
    let dir = tempfile::tempdir().unwrap();
    let mut acked: Vec<(String, String, String)> = Vec::new();
    for cycle in 0..3u64 {
        let lines = kill9::run_and_kill(dir.path(), cycle);
        let before = acked.len();
        for l in lines.iter() {
            if let Some(rest) = l.strip_prefix("ack ") {
                let mut it = rest.split(' ');
                acked.push((
                    it.next().unwrap().to_string(),
                    it.next().unwrap().to_string(),
                    it.next().unwrap().to_string(),
                ));
            }
        }
        assert!(
            acked.len() > before,
            "cycle {cycle}: the child acknowledged nothing"
        );
    }
    let (_db, store) = open_temp(dir.path()).unwrap();
    let mut hot_cells: std::collections::BTreeMap<String, BTreeSet<String>> = Default::default();
    for hot in ["hot0", "hot1", "hot2", "hot3", "hot4"] {
        if let Some(row) = store.get(&Get::row(hot)).unwrap() {
            hot_cells.insert(
                hot.into(),
                row.cells
                    .into_iter()
                    .map(|c| c.qualifier.to_string())
                    .collect(),
            );
        }
    }
    for (hot, q, cold) in &acked {
        assert!(
            hot_cells.get(hot).is_some_and(|s| s.contains(q)),
            "acknowledged cell {q} of row {hot} lost"
        );
        let row = store
            .get(&Get::row(cold.clone()))
            .unwrap()
            .unwrap_or_else(|| panic!("acknowledged row {cold} lost"));
        assert_eq!(&row.cells[0].value[..], q.as_bytes());
    }
    println!(
        "{} acknowledged writes survived 3 kill -9 cycles",
        acked.len()
    );
}
