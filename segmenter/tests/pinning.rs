//! The segmenter's workers run pinned to cores by default (`segmenter.pin_cores`): worker i on
//! the i-th core the process may use, round robin, and unpinned when it is off (or when a CPU
//! quota lets the process use fewer cores at a time than it may run on). One test in its
//! own process: it reads every thread's allowed cores from `/proc/self/task`, where another
//! test's workers would show up too.

#![cfg(target_os = "linux")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use dmp_bus::embedded::EmbeddedBus;
use dmp_bus::Bus;
use dmp_core::Config;
use dmp_segmenter::Segmenter;
use dmp_store::embedded::{EmbeddedDatabase, EmbeddedStore};
use dmp_store::Schema;
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

/// (name, allowed CPUs) of this process's threads named `dmp-segmenter-*`.
fn workers() -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let path = task.unwrap().path();
        let (Ok(name), Ok(status)) = (
            std::fs::read_to_string(path.join("comm")),
            std::fs::read_to_string(path.join("status")),
        ) else {
            continue; // the thread ended
        };
        let name = name.trim().to_string();
        if name.starts_with("dmp-segmenter-") {
            out.push((name, allowed(&status)));
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
/// worker's allowed CPUs, by index.
async fn worker_cpus(tweak: impl FnOnce(&mut Config)) -> Vec<Vec<usize>> {
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
    // A worker pins itself first thing: wait until all three are up and have done so.
    let pins = cfg.segmenter.pin_cores
        && std::thread::available_parallelism().unwrap().get() >= cores_allowed();
    while found.len() < 3 || (pins && found.iter().any(|(_, c)| c.len() != 1)) {
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
        found.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["dmp-segmenter-0", "dmp-segmenter-1", "dmp-segmenter-2"]
    );
    found.into_iter().map(|(_, c)| c).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_default_config_when_the_segmenter_runs_then_each_worker_is_pinned_to_its_core() {
    let process = allowed(&std::fs::read_to_string("/proc/self/status").unwrap());
    assert!(Config::defaults().segmenter.pin_cores, "pinned by default");
    let usable = std::thread::available_parallelism().unwrap().get();
    let pinned = worker_cpus(|_| {}).await;
    for (i, cores) in pinned.iter().enumerate() {
        if usable < process.len() {
            // A CPU quota below the cores (a container's limit): left unpinned.
            assert_eq!(cores, &process, "worker {i}");
        } else {
            // Round robin over the cores this process may use (more workers than cores share).
            assert_eq!(cores, &[process[i % process.len()]], "worker {i}");
        }
    }
    // Off: the workers may run anywhere the process may.
    let free = worker_cpus(|c| c.segmenter.pin_cores = false).await;
    for (i, cores) in free.iter().enumerate() {
        assert_eq!(cores, &process, "worker {i}");
    }
}
