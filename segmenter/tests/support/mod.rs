//! What the segmenter's in-process pipeline tests share besides `testsupport/ingest.rs`: their
//! configuration and the storage writer between ingest and the segmenter.

use std::path::Path;

use dmp_core::Config;
use dmp_storage_writer::enrich::{Enricher, IpMode, SHIPPED_CRAWLER_LIST};
use dmp_storage_writer::StorageWriter;

use crate::ingest::Served;

/// A configuration for a pipeline in `dir`: `rules` written to `dir/rules.toml` and read from
/// there, topics of 4 partitions, two segmenter workers.
pub fn config(dir: &Path, rules: &str) -> Config {
    let rules_path = dir.join("rules.toml");
    std::fs::write(&rules_path, rules).unwrap();
    let mut cfg = Config::defaults();
    cfg.data_dir = dir.to_path_buf();
    cfg.topics.partitions = 4;
    cfg.segmenter.rules = rules_path.display().to_string();
    cfg.segmenter.workers = 2;
    cfg
}

/// The storage writer on `served`'s bus and store, until its stop signal.
pub fn spawn_writer(cfg: &Config, served: &Served) -> tokio::task::JoinHandle<()> {
    let writer = StorageWriter::new(
        served.bus.clone(),
        served.store.clone(),
        cfg,
        Enricher::new(IpMode::Full, Vec::new(), SHIPPED_CRAWLER_LIST).unwrap(),
    );
    let rx = served.rx.clone();
    tokio::spawn(async move { writer.run(rx).await.unwrap() })
}
