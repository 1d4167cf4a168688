//! Opens the backends named in the config: the shared embedded database when any layer is
//! embedded, then the bus and the store by URL.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use dmp_bus::embedded::EmbeddedBus;
use dmp_bus::Bus;
use dmp_core::Config;
use dmp_store::embedded::EmbeddedDatabase;
use dmp_store::{Schema, UserStore};

/// The open backends of this process.
pub struct Backends {
    /// The shared embedded database, when a layer is embedded.
    pub db: Option<EmbeddedDatabase>,
    /// The log.
    pub bus: Arc<dyn Bus>,
    /// The user store.
    pub store: Arc<dyn UserStore>,
}

fn open_db(cfg: &Config) -> anyhow::Result<EmbeddedDatabase> {
    EmbeddedDatabase::open(
        &cfg.data_dir,
        &cfg.embedded,
        &Schema::new(cfg.store.families.clone()),
    )
    .with_context(|| {
        format!(
            "cannot open the embedded database in {}",
            cfg.data_dir.display()
        )
    })
}

fn open_bus(cfg: &Config, db: Option<&EmbeddedDatabase>) -> anyhow::Result<Arc<dyn Bus>> {
    if cfg.backends.bus == "embedded" {
        let db = db.context("the embedded bus needs the embedded database")?;
        let bus = EmbeddedBus::open(db, &cfg.bus)?;
        bus.spawn_retention(Duration::from_secs(30));
        Ok(Arc::new(bus))
    } else {
        Ok(dmp_bus::open(&cfg.backends.bus, db, cfg)?)
    }
}

impl Backends {
    /// Opens every backend and creates dmp's topics that are missing.
    pub async fn open(cfg: &Config) -> anyhow::Result<Backends> {
        let needs_db = cfg.backends.bus == "embedded"
            || cfg.backends.store == "embedded"
            || cfg.backends.stats == "embedded";
        let db = needs_db.then(|| open_db(cfg)).transpose()?;
        let bus = open_bus(cfg, db.as_ref())?;
        let store = dmp_store::open(&cfg.backends.store, db.as_ref(), &cfg.store)?;
        let created = dmp_bus::ensure_topics(bus.as_ref(), &cfg.topics)
            .await
            .with_context(|| format!("cannot create dmp's topics on {}", cfg.backends.bus))?;
        if !created.is_empty() {
            tracing::info!(?created, "created topics");
        }
        Ok(Backends { db, bus, store })
    }

    /// Opens the bus alone (for `dmp topics`), with the embedded database when the bus is embedded.
    pub fn open_bus_only(cfg: &Config) -> anyhow::Result<(Option<EmbeddedDatabase>, Arc<dyn Bus>)> {
        let db = (cfg.backends.bus == "embedded")
            .then(|| open_db(cfg))
            .transpose()?;
        let bus = open_bus(cfg, db.as_ref())?;
        Ok((db, bus))
    }

    /// Makes everything durable and releases the database.
    pub fn close(self) -> anyhow::Result<()> {
        close_db(self.db.as_ref())
    }
}

/// Makes everything durable in the embedded database, if there is one.
pub fn close_db(db: Option<&EmbeddedDatabase>) -> anyhow::Result<()> {
    if let Some(db) = db {
        db.db().persist(fjall::PersistMode::SyncAll)?;
    }
    Ok(())
}
