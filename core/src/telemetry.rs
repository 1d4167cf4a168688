//! Tracing and metrics initialisation for the binaries.
//!
//! Metrics follow `dmp_<component>_<noun>_<unit>[_total]`; durations are histograms in seconds;
//! labels are bounded (never a user or segment id). The Prometheus recorder is installed once per
//! process and rendered by the API's `/metrics`.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::TelemetryConfig;

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the tracing subscriber (stderr, text or JSON) with `cfg.log_level`, overridden by
/// `RUST_LOG`. Calling it twice is harmless.
pub fn init_tracing(cfg: &TelemetryConfig) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(cfg.log_level.clone()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if cfg.log_format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Installs the global Prometheus recorder (once) and returns the handle that renders it.
pub fn init_metrics() -> PrometheusHandle {
    PROMETHEUS
        .get_or_init(|| {
            // Durations (`…_seconds`) get time buckets; other histograms count things (events
            // per batch, cells per row).
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_seconds".into()),
                    &[
                        0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
                        0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    ],
                )
                .expect("buckets are not empty")
                .set_buckets(&[
                    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
                    10_000.0, 25_000.0, 100_000.0,
                ])
                .expect("buckets are not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (tests); then ours only renders nothing.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}
