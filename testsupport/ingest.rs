//! Shared by the in-process pipeline tests of the storage writer and the segmenter (included with
//! `#[path]`): opens the embedded database, store and bus (or uses the given bus), creates dmp's
//! topics, and serves the HTTP API with ingest on a free loopback port, until `stop`.
#![allow(dead_code)] // each including test uses its part

use std::sync::Arc;

use dmp_api::ingest::Ingest;
use dmp_api::spill::Spill;
use dmp_bus::embedded::EmbeddedBus;
use dmp_bus::Bus;
use dmp_core::Config;
use dmp_store::embedded::{EmbeddedDatabase, EmbeddedStore};
use dmp_store::Schema;
use tokio::sync::watch;

/// What the tests build on.
pub struct Served {
    /// The embedded database under the store (and the bus unless one was given).
    pub db: EmbeddedDatabase,
    /// The user store.
    pub store: Arc<EmbeddedStore>,
    /// The bus (embedded unless one was given).
    pub bus: Arc<dyn Bus>,
    /// Base URL of the API.
    pub url: String,
    /// Send `true` to stop the server (and whatever else watches `rx`).
    pub stop: watch::Sender<bool>,
    /// The stop signal, for the roles the test starts.
    pub rx: watch::Receiver<bool>,
    /// The server task.
    pub server: tokio::task::JoinHandle<()>,
}

/// Opens the backends in `cfg.data_dir` and serves the API.
pub async fn serve(cfg: &Config, bus: Option<Arc<dyn Bus>>) -> Served {
    let db = EmbeddedDatabase::open(&cfg.data_dir, &cfg.embedded, &Schema::dmp_default()).unwrap();
    let store = Arc::new(EmbeddedStore::open(&db, &cfg.store).unwrap());
    let bus: Arc<dyn Bus> = match bus {
        Some(b) => b,
        None => Arc::new(EmbeddedBus::open(&db, &cfg.bus).unwrap()),
    };
    dmp_bus::ensure_topics(bus.as_ref(), &cfg.topics)
        .await
        .unwrap();
    let spill = Arc::new(Spill::open(&cfg.spill_dir(), cfg.spill.max_bytes).unwrap());
    let ingest = Arc::new(Ingest::new(
        bus.clone(),
        cfg.topics.events.clone(),
        spill,
        cfg.api.clone(),
    ));
    let state = dmp_api::AppState::new(
        bus.clone(),
        store.clone(),
        dmp_core::telemetry::init_metrics(),
        ingest,
        cfg,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, rx) = watch::channel(false);
    let mut srx = rx.clone();
    let server = tokio::spawn(async move {
        dmp_api::serve(listener, state, async move {
            let _ = srx.changed().await;
        })
        .await
        .unwrap();
    });
    Served {
        db,
        store,
        bus,
        url,
        stop,
        rx,
        server,
    }
}
