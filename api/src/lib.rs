//! `dmp-api`: the HTTP API that `dmp run` and `dmp api` serve.
//!
//! - Ingest ([`ingest`]): `GET /px.gif` (tracking pixel, issues a uid cookie when there is none)
//!   and `POST /v1/events` (JSON array or NDJSON, gzip allowed); acknowledged only once on
//!   `dmp.events` or fsynced in the [`spill`] file.
//! - Operations: `GET /healthz` (the process is up), `GET /readyz` (the bus and the store answer
//!   within 2 s and no consuming role is stuck; 503 with the reasons otherwise), `GET /metrics` (Prometheus text),
//!   `GET /v1/topics` (every topic with the low and high offset of each partition).
//!
//! - Audience ([`audience`]): `GET /v1/audience` (estimates of segment expressions over days)
//!   and `GET /v1/segments` (segment sizes per day).
//!
//! - The planner page at `/` (`planner.html`): pick segments, combine them with AND / OR / NOT,
//!   choose days, see the estimate with its interval and the daily sizes as a chart.
//! - Partners ([`stream`]): `GET /v1/stream/segments?group=NAME` (NDJSON, resumable by offset).
//! - Lookup ([`lookup`]): `GET /v1/users/{uid}/segments` (current memberships, explanations,
//!   bounded waits for fresh data).

pub mod audience;
pub mod auth;
pub mod ingest;
pub mod lookup;
pub mod spill;
pub mod stream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;

use dmp_bus::Bus;
use dmp_store::{Get, UserStore};

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The log.
    pub bus: Arc<dyn Bus>,
    /// The user store.
    pub store: Arc<dyn UserStore>,
    /// Renders `/metrics`.
    pub prometheus: PrometheusHandle,
    /// Ingest into `dmp.events`.
    pub ingest: Arc<ingest::Ingest>,
    /// The segment counters (None: audience endpoints answer 503).
    pub counters: Option<Arc<dyn dmp_stats::SegmentCounters>>,
    /// The rule set in force, for lookups with `explain=1` (None: explain answers 503).
    pub rules: Option<lookup::RulesFn>,
    /// API keys per caller role.
    pub auth: Arc<auth::Auth>,
    /// `topics.segments`, for the partner stream.
    pub segments_topic: String,
    /// `topics.segments_current` (compacted), for the partner stream and deletions.
    pub segments_current_topic: String,
    /// The consuming roles' progress and after how long without it a role counts as stuck
    /// (None: no role in this process).
    pub progress: Option<(Arc<dmp_core::health::Progress>, Duration)>,
    /// Deleted users, shared with this process's storage writer (None: no writer here).
    pub suppressions: Option<Arc<dmp_store::suppress::Suppressions>>,
    /// How long a deleted user's events are dropped, ms.
    pub deleted_suppress_ms: i64,
    /// After a deletion, when to delete the row once more (other processes' writers have then
    /// reloaded the suppression).
    pub suppression_settle: Duration,
    /// Becomes true when the process stops: long-lived responses (partner streams) end then, so
    /// a graceful shutdown does not wait for them forever.
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

impl AppState {
    /// The state of an API with ingest and the store's lookups: open to every caller, no
    /// counters, rules or consuming roles in the process; topics and deletion settings from
    /// `cfg`. A process with more sets those fields over this one.
    pub fn new(
        bus: Arc<dyn Bus>,
        store: Arc<dyn UserStore>,
        prometheus: PrometheusHandle,
        ingest: Arc<ingest::Ingest>,
        cfg: &dmp_core::Config,
    ) -> AppState {
        AppState {
            bus,
            store,
            prometheus,
            ingest,
            counters: None,
            rules: None,
            auth: Arc::new(auth::Auth::open()),
            segments_topic: cfg.topics.segments.clone(),
            segments_current_topic: cfg.topics.segments_current.clone(),
            progress: None,
            suppressions: None,
            deleted_suppress_ms: (cfg.api.deleted_user_suppress_secs as i64).saturating_mul(1000),
            // Writers in other processes reload suppressions every `suppression_reload_ms`.
            suppression_settle: Duration::from_millis(
                cfg.storage_writer.suppression_reload_ms * 2 + 1000,
            ),
            stopping: tokio::sync::watch::channel(false).1,
        }
    }
}

/// The router with every endpoint.
pub fn router(state: AppState) -> Router {
    use auth::Role;
    let guard = |role: Role| {
        axum::middleware::from_fn_with_state((state.auth.clone(), role), auth::require)
    };
    let ingest = Router::new()
        .route("/v1/events", axum::routing::post(ingest::events))
        .route_layer(guard(Role::Ingest));
    let lookup = Router::new()
        .route("/v1/users/{uid}/segments", get(lookup::segments))
        .route_layer(guard(Role::Lookup));
    let partner = Router::new()
        .route("/v1/stream/segments", get(stream::segments))
        .route_layer(guard(Role::Partner));
    let planner = Router::new()
        .route("/v1/audience", get(audience::audience))
        .route("/v1/segments", get(audience::segments))
        .route_layer(guard(Role::Planner));
    let admin = Router::new()
        .route("/v1/topics", get(topics))
        .route("/v1/users/{uid}", axum::routing::delete(lookup::delete))
        .route_layer(guard(Role::Admin));
    Router::new()
        .route("/", get(planner_page))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/px.gif", get(ingest::pixel))
        .merge(ingest)
        .merge(lookup)
        .merge(planner)
        .merge(partner)
        .merge(admin)
        // The body limit is enforced (with a clear 413) by the handler itself.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state)
}

/// Serves `router(state)` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(?addr, "http api listening");
    axum::serve(
        listener,
        router(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

/// The planner page: static HTML and JS over the audience API (no framework, no build step).
async fn planner_page() -> Response {
    (
        [
            (axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (axum::http::header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("planner.html"),
    )
        .into_response()
}

/// A refusal of the audience, lookup, stream and key-checked endpoints: counted in
/// `dmp_api_requests_refused_total{endpoint,status}`, answered as `{"error": reason}`.
pub(crate) fn refuse(
    endpoint: &'static str,
    status: StatusCode,
    reason: impl Into<String>,
) -> Response {
    metrics::counter!("dmp_api_requests_refused_total", "endpoint" => endpoint, "status" => status.as_u16().to_string())
        .increment(1);
    (status, Json(serde_json::json!({ "error": reason.into() }))).into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

#[derive(Serialize)]
struct Readiness {
    ready: bool,
    bus: String,
    store: String,
    consumers: String,
}

async fn readyz(State(s): State<AppState>) -> Response {
    let limit = Duration::from_secs(2);
    let bus = match tokio::time::timeout(limit, s.bus.topics()).await {
        Ok(Ok(_)) => "ok".to_string(),
        Ok(Err(e)) => format!("error: {e}"),
        Err(_) => "error: no answer within 2 s".to_string(),
    };
    let store_handle = s.store.clone();
    let probe =
        tokio::task::spawn_blocking(move || store_handle.get(&Get::row("dmp-readiness-probe")));
    let store = match tokio::time::timeout(limit, probe).await {
        Ok(Ok(Ok(_))) => "ok".to_string(),
        Ok(Ok(Err(e))) => format!("error: {e}"),
        Ok(Err(e)) => format!("error: {e}"),
        Err(_) => "error: no answer within 2 s".to_string(),
    };
    let stuck = s
        .progress
        .as_ref()
        .map(|p| p.0.stuck(p.1))
        .unwrap_or_default();
    let consumers = if stuck.is_empty() {
        "ok".to_string()
    } else {
        format!("stuck: {}", stuck.join("; "))
    };
    let ready = bus == "ok" && store == "ok" && consumers == "ok";
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(Readiness {
            ready,
            bus,
            store,
            consumers,
        }),
    )
        .into_response()
}

async fn metrics_text(State(s): State<AppState>) -> Response {
    (
        [("content-type", "text/plain; version=0.0.4")],
        s.prometheus.render(),
    )
        .into_response()
}

#[derive(Serialize)]
struct TopicView {
    name: String,
    partitions: Vec<PartitionView>,
}

#[derive(Serialize)]
struct PartitionView {
    partition: u32,
    low: u64,
    high: u64,
}

async fn topics(State(s): State<AppState>) -> Response {
    let result = async {
        let mut out = Vec::new();
        for t in s.bus.topics().await? {
            let offsets = s.bus.offsets(&t.name).await?;
            out.push(TopicView {
                name: t.name,
                partitions: offsets
                    .into_iter()
                    .map(|o| PartitionView {
                        partition: o.partition,
                        low: o.low,
                        high: o.high,
                    })
                    .collect(),
            });
        }
        Ok::<_, dmp_bus::BusError>(out)
    }
    .await;
    match result {
        Ok(v) => Json(v).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "error": e.to_string() })),
        )
            .into_response(),
    }
}
