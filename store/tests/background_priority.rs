//! The embedded database's background threads (fjall's workers, which flush memtables and
//! compact tables) run at `embedded.background_nice`, so does a thread that asks for it
//! (`lower_to_background_priority`), and the thread that opened the database keeps its own
//! priority. One test in its own process: it reads the nice value of every thread
//! of the process from `/proc/self/task`, which other tests' databases would change.

#![cfg(target_os = "linux")]

#[path = "../../testsupport/nice.rs"]
mod nice;

use dmp_store::embedded::open_temp_with;
use nice::{name_and_nice, own_nice};

/// (thread name, nice value) of every thread of this process.
fn threads() -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let Ok(stat) = std::fs::read_to_string(task.unwrap().path().join("stat")) else {
            continue; // the thread ended
        };
        out.push(name_and_nice(&stat));
    }
    out
}

#[test]
fn given_background_nice_when_the_database_opens_then_its_workers_run_at_it_and_the_caller_does_not(
) {
    let before = own_nice();
    for nice in [7, 0] {
        let mut cfg = dmp_core::Config::defaults();
        cfg.embedded.background_nice = nice;
        let dir = tempfile::tempdir().unwrap();
        let (db, _store) = open_temp_with(dir.path(), &cfg).unwrap();
        let workers: Vec<i64> = threads()
            .into_iter()
            .filter(|(name, _)| name.starts_with("fjall"))
            .map(|(_, n)| n)
            .collect();
        assert!(
            !workers.is_empty(),
            "no fjall worker thread: {:?}",
            threads()
        );
        let want = before.max(nice as i64);
        assert!(
            workers.iter().all(|&n| n == want),
            "nice {nice}: workers at {workers:?}, want {want}"
        );
        assert_eq!(own_nice(), before, "the opening thread's priority changed");
        // A thread doing upkeep of its own (the embedded bus's retention) asks for the same.
        let upkeep = std::thread::scope(|s| {
            s.spawn(|| {
                db.lower_to_background_priority();
                own_nice()
            })
            .join()
            .unwrap()
        });
        assert_eq!(upkeep, want, "nice {nice}: an upkeep thread");
        drop(db);
        drop(_store);
        // The workers end with the database before the next round counts them.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while threads().iter().any(|(name, _)| name.starts_with("fjall")) {
            assert!(
                std::time::Instant::now() < deadline,
                "fjall workers outlived the database"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
