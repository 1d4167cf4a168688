//! The bus conformance suite on the embedded backend: with the default in-memory tail (most reads
//! from memory) and without one (every read from the database).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use dmp_bus::conformance::{run_all, Harness};
use dmp_bus::embedded::EmbeddedBus;
use dmp_bus::Bus;
use dmp_store::embedded::EmbeddedDatabase;
use dmp_store::Schema;

struct Embedded {
    dir: tempfile::TempDir,
    tail_mb: u64,
    bus: Option<Arc<EmbeddedBus>>,
    n: AtomicU32,
}

fn open(dir: &std::path::Path, tail_mb: u64) -> Arc<EmbeddedBus> {
    let mut cfg = dmp_core::Config::defaults();
    cfg.bus.tail_cache_mb = tail_mb;
    let db = EmbeddedDatabase::open(dir, &cfg.embedded, &Schema::dmp_default()).unwrap();
    Arc::new(EmbeddedBus::open(&db, &cfg.bus).unwrap())
}

#[async_trait]
impl Harness for Embedded {
    fn bus(&self) -> Arc<dyn Bus> {
        self.bus.clone().unwrap()
    }

    async fn restart(&mut self) {
        let bus = self.bus.take().unwrap();
        assert_eq!(Arc::strong_count(&bus), 1, "something still holds the bus");
        drop(bus);
        self.bus = Some(open(self.dir.path(), self.tail_mb));
    }

    fn unique(&self, base: &str) -> String {
        format!("{base}-{}", self.n.fetch_add(1, Ordering::Relaxed))
    }

    fn compact_now(&self) -> Option<Result<(), String>> {
        let bus = self.bus.as_ref().unwrap();
        Some(
            bus.compact(dmp_core::clock::now_ms(), true)
                .map(|_| ())
                .map_err(|e| e.to_string()),
        )
    }
}

async fn conformance(tail_mb: u64) {
    let dir = tempfile::tempdir().unwrap();
    let bus = open(dir.path(), tail_mb);
    let mut h = Embedded {
        dir,
        tail_mb,
        bus: Some(bus),
        n: AtomicU32::new(0),
    };
    let failures = run_all(&mut h).await;
    assert!(
        failures.is_empty(),
        "conformance failures (tail of {tail_mb} MiB):\n{}",
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_embedded_bus_when_running_conformance_then_every_check_passes() {
    conformance(dmp_core::Config::defaults().bus.tail_cache_mb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_embedded_bus_without_a_tail_when_running_conformance_then_every_check_passes() {
    conformance(0).await;
}
