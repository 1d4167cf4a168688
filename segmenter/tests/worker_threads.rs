//! The segmenter's workers run pinned to cores by default (`segmenter.pin_cores`): worker i on
//! the i-th core the process may use, round robin, and unpinned when it is off (or when a CPU
//! quota lets the process use fewer cores at a time than it may run on). They run at nice value
//! `segmenter.worker_nice`, and the threads that start them keep their own. One test in its own
//! process: it reads every thread's allowed cores and nice value from `/proc/self/task`, where
//! another test's workers would show up too.

#![cfg(target_os = "linux")]

#[path = "../../testsupport/nice.rs"]
mod nice;

use std::sync::Arc;
use std::time::{Duration, Instant};

use dmp_bus::embedded::EmbeddedBus;
use dmp_bus::Bus;
use dmp_core::Config;
use dmp_segmenter::Segmenter;
use dmp_store::embedded::{EmbeddedDatabase, EmbeddedStore};
use dmp_store::Schema;
use nice::{nice_of, own_nice};
use tokio::sync::watch;

/// The CPUs a `Cpus_allowed_list` names ("0-3,6").
fn cpus(list: &str) -> Vec<usize> {
    let mut out = Vec::new();
    for part in list.trim().split(',') {
        match part.split_once('-') {
            Some((a, b)) => out.extend(a.parse::<usize>().unwrap()..=b.parse().unwrap()),
            None => out.push(part.parse().unwrap()),
        }
    }
    out
}

/// The allowed CPUs of a thread's `/proc/…/status`.
fn allowed(status: &str) -> Vec<usize> {
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("a Cpus_allowed_list line");
    cpus(line)
}

/// A worker thread: its name, allowed CPUs and nice value.
type WorkerThread = (String, Vec<usize>, i64);

/// The threads of this process named `dmp-segmenter-*`.
fn workers() -> Vec<WorkerThread> {
    let mut out = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let path = task.unwrap().path();
        let (Ok(name), Ok(status), Ok(stat)) = (
            std::fs::read_to_string(path.join("comm")),
            std::fs::read_to_string(path.join("status")),
            std::fs::read_to_string(path.join("stat")),
        ) else {
            continue; // the thread ended
        };
        let name = name.trim().to_string();
        if name.starts_with("dmp-segmenter-") {
            out.push((name, allowed(&status), nice_of(&stat)));
        }
    }
    out.sort();
    out
}

/// How many cores this process may run on.
fn cores_allowed() -> usize {
    allowed(&std::fs::read_to_string("/proc/self/status").unwrap()).len()
}

/// Runs a segmenter with `tweak`ed defaults and three workers until they are up; returns each
/// worker's allowed CPUs and nice value, by index.
async fn worker_threads(tweak: impl FnOnce(&mut Config)) -> Vec<(Vec<usize>, i64)> {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::defaults();
    cfg.data_dir = dir.path().to_path_buf();
    cfg.topics.partitions = 2;
    cfg.segmenter.workers = 3;
    tweak(&mut cfg);
    let db = EmbeddedDatabase::open(&cfg.data_dir, &cfg.embedded, &Schema::dmp_default()).unwrap();
    let store = Arc::new(EmbeddedStore::open(&db, &cfg.store).unwrap());
    let bus: Arc<dyn Bus> = Arc::new(EmbeddedBus::open(&db, &cfg.bus).unwrap());
    dmp_bus::ensure_topics(bus.as_ref(), &cfg.topics)
        .await
        .unwrap();
    let seg = Segmenter::new(bus, store, &cfg).unwrap();
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(async move { seg.run(rx).await.unwrap() });
    let started = Instant::now();
    let mut found = workers();
    // A worker pins itself and sets its priority first thing: wait until all three are up and
    // have done so.
    let pins = cfg.segmenter.pin_cores
        && std::thread::available_parallelism().unwrap().get() >= cores_allowed();
    let nice = own_nice().max(cfg.segmenter.worker_nice as i64);
    while found.len() < 3
        || (pins && found.iter().any(|(_, c, _)| c.len() != 1))
        || found.iter().any(|(_, _, n)| *n != nice)
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "workers: {found:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        found = workers();
    }
    let _ = stop.send(true);
    task.await.unwrap();
    assert_eq!(
        found.iter().map(|(n, _, _)| n.as_str()).collect::<Vec<_>>(),
        ["dmp-segmenter-0", "dmp-segmenter-1", "dmp-segmenter-2"]
    );
    found.into_iter().map(|(_, c, n)| (c, n)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_default_config_when_the_segmenter_runs_then_each_worker_is_pinned_to_its_core_at_nice_3(
) {
    let process = allowed(&std::fs::read_to_string("/proc/self/status").unwrap());
    let before = own_nice();
    assert!(Config::defaults().segmenter.pin_cores, "pinned by default");
    assert_eq!(
        Config::defaults().segmenter.worker_nice,
        3,
        "nice 3 by default"
    );
    let usable = std::thread::available_parallelism().unwrap().get();
    let pinned = worker_threads(|_| {}).await;
    for (i, (cores, nice)) in pinned.iter().enumerate() {
        assert_eq!(*nice, before.max(3), "worker {i}");
        if usable < process.len() {
            // A CPU quota below the cores (a container's limit): left unpinned.
            assert_eq!(cores, &process, "worker {i}");
        } else {
            // Round robin over the cores this process may use (more workers than cores share).
            assert_eq!(cores, &[process[i % process.len()]], "worker {i}");
        }
    }
    // Off: the workers may run anywhere the process may; at nice 0, at the process's priority.
    let free = worker_threads(|c| {
        c.segmenter.pin_cores = false;
        c.segmenter.worker_nice = 0;
    })
    .await;
    for (i, (cores, nice)) in free.iter().enumerate() {
        assert_eq!(cores, &process, "worker {i}");
        assert_eq!(*nice, before, "worker {i}");
    }
    // Another value; the caller's threads keep their own.
    let niced = worker_threads(|c| c.segmenter.worker_nice = 7).await;
    for (i, (_, nice)) in niced.iter().enumerate() {
        assert_eq!(*nice, before.max(7), "worker {i}");
    }
    assert_eq!(own_nice(), before, "the caller's priority is untouched");
}
