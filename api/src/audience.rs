//! Audience endpoints for media planners:
//! - `GET /v1/audience?expr=…&from=YYYY-MM-DD&to=YYYY-MM-DD`: the estimated users of an
//!   expression of segments (`and`, `or`, `not`, parentheses; `not` relative to all evaluated
//!   users) over the days, with a low-high interval, the method and a `too_small` flag;
//! - `GET /v1/segments?from=…&to=…`: every counted segment with its users per day (the last 7
//!   days by default).
//!
//! Bad expressions and dates answer 400 naming the position or the parameter; no counters in
//! this process answer 503.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use dmp_stats::audience::{self, format_day, parse_day};
use dmp_stats::SegmentCounters;

use crate::AppState;

/// Query parameters.
#[derive(Debug, Deserialize)]
pub struct Params {
    expr: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

fn bad(status: StatusCode, reason: impl Into<String>) -> Response {
    crate::refuse("audience", status, reason)
}

/// A refusal: its status and reason.
type Refusal = (StatusCode, String);

fn counters(state: &AppState) -> Result<Arc<dyn SegmentCounters>, Refusal> {
    state.counters.clone().ok_or_else(|| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "no segment counters in this process (serve the API from `dmp run`, or set backends.stats to a redis:// URL)".to_string(),
        )
    })
}

/// The day range of the parameters (default: the last `default_days` days up to today).
fn range(p: &Params, default_days: u32) -> Result<Vec<u32>, Refusal> {
    let today = dmp_stats::day_of(dmp_core::clock::now_ms());
    let day = |name: &str, v: &Option<String>, default: u32| match v {
        None => Ok(default),
        Some(s) => parse_day(s).ok_or_else(|| {
            (
                StatusCode::BAD_REQUEST,
                format!("{name}: {s:?} is not a date (YYYY-MM-DD)"),
            )
        }),
    };
    let to = day("to", &p.to, today)?;
    let from = day(
        "from",
        &p.from,
        dmp_stats::days_before(to, default_days - 1),
    )?;
    audience::days(from, to).map_err(|e| (StatusCode::BAD_REQUEST, e))
}

/// `GET /v1/audience`.
pub async fn audience(State(state): State<AppState>, Query(p): Query<Params>) -> Response {
    let started = std::time::Instant::now();
    let Some(src) = p.expr.clone() else {
        return bad(
            StatusCode::BAD_REQUEST,
            "expr is missing (e.g. expr=cats and not dogs)",
        );
    };
    let expr = match audience::parse(&src) {
        Ok(e) => e,
        Err(e) => return bad(StatusCode::BAD_REQUEST, format!("expr: {e}")),
    };
    let days = match range(&p, 1) {
        Ok(d) => d,
        Err((status, reason)) => return bad(status, reason),
    };
    let c = match counters(&state) {
        Ok(c) => c,
        Err((status, reason)) => return bad(status, reason),
    };
    let (first, last) = (days[0], days[days.len() - 1]);
    let answer =
        tokio::task::spawn_blocking(move || audience::estimate(c.as_ref(), &expr, &days)).await;
    metrics::histogram!("dmp_api_audience_duration_seconds")
        .record(started.elapsed().as_secs_f64());
    match answer {
        Ok(Ok(e)) => Json(serde_json::json!({
            "expr": src,
            "from": format_day(first),
            "to": format_day(last),
            "estimate": e.estimate,
            "low": e.low,
            "high": e.high,
            "method": e.method,
            "too_small": e.too_small,
            "union": e.union,
            "segments": e.segments,
        }))
        .into_response(),
        Ok(Err(audience::AudienceError::TooManySegments(n))) => bad(
            StatusCode::BAD_REQUEST,
            format!("expr: {n} segments, at most {}", audience::MAX_SEGMENTS),
        ),
        Ok(Err(e)) => bad(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e) => bad(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `GET /v1/segments`.
pub async fn segments(State(state): State<AppState>, Query(p): Query<Params>) -> Response {
    let days = match range(&p, 7) {
        Ok(d) => d,
        Err((status, reason)) => return bad(status, reason),
    };
    let c = match counters(&state) {
        Ok(c) => c,
        Err((status, reason)) => return bad(status, reason),
    };
    let answer = tokio::task::spawn_blocking(
        move || -> Result<serde_json::Value, dmp_stats::StatsError> {
            let wanted: std::collections::HashSet<u32> = days.iter().copied().collect();
            let mut per: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
            for (seg, day) in c.segments()? {
                if wanted.contains(&day) {
                    let n = c.count(&seg, day)?;
                    per.entry(seg).or_default().insert(format_day(day), n);
                }
            }
            Ok(serde_json::json!({
                "from": format_day(days[0]),
                "to": format_day(days[days.len() - 1]),
                "segments": per
                    .into_iter()
                    .map(|(id, days)| serde_json::json!({ "id": id, "days": days }))
                    .collect::<Vec<_>>(),
            }))
        },
    )
    .await;
    match answer {
        Ok(Ok(v)) => Json(v).into_response(),
        Ok(Err(e)) => bad(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e) => bad(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
