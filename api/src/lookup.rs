//! Point lookups for credit scorers: `GET /v1/users/{uid}/segments`.
//!
//! Answers the user's current live memberships (with `since`), when the user was last evaluated,
//! the newest event that evaluation saw and the rule set's version, all from the user's row
//! (`s:current`, `s:evaluated`).
//! - `?explain=1` adds, per segment, the events (time and cells) that make it match, evaluated
//!   now with the rule set in force;
//! - `?min_event_ts=T&wait_ms=W` waits up to `W` ms (at most [`MAX_WAIT_MS`]) until the user has
//!   been evaluated with data at least as new as `T` (epoch ms); `fresh` says whether it was.
//!
//! 404 for a user with no row, 400 naming the bad parameter.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use dmp_core::segment::{evaluated, memberships};
use dmp_store::Get;

use crate::AppState;

/// The longest wait a lookup may ask for.
pub const MAX_WAIT_MS: u64 = 10_000;

/// The rule set in force, for explanations.
pub type RulesFn = Arc<dyn Fn() -> Arc<dmp_rules::RuleSet> + Send + Sync>;

/// Query parameters (strings, so a bad value gets our own 400).
#[derive(Debug, Deserialize)]
pub struct Params {
    explain: Option<String>,
    min_event_ts: Option<String>,
    wait_ms: Option<String>,
}

fn refuse(status: StatusCode, reason: impl Into<String>) -> Response {
    crate::refuse("lookup", status, reason)
}

fn int(name: &str, v: &Option<String>) -> Result<Option<i64>, String> {
    match v {
        None => Ok(None),
        Some(s) => s
            .parse::<i64>()
            .map(Some)
            .map_err(|_| format!("{name}: {s:?} is not an integer")),
    }
}

/// A refusal when `uid` is not one ingest accepts (1 to 256 bytes, no control characters).
fn bad_uid(uid: &str) -> Option<Response> {
    (uid.is_empty() || uid.len() > 256 || uid.chars().any(char::is_control)).then(|| {
        refuse(
            StatusCode::BAD_REQUEST,
            "uid: 1 to 256 bytes without control characters",
        )
    })
}

/// `GET /v1/users/{uid}/segments`.
pub async fn segments(
    State(state): State<AppState>,
    Path(uid): Path<String>,
    Query(p): Query<Params>,
) -> Response {
    let started = Instant::now();
    if let Some(r) = bad_uid(&uid) {
        return r;
    }
    let explain = match p.explain.as_deref() {
        None | Some("0") | Some("false") => false,
        Some("1") | Some("true") => true,
        Some(other) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!("explain: {other:?} is not 1, 0, true or false"),
            )
        }
    };
    let min_event_ts = match int("min_event_ts", &p.min_event_ts) {
        Ok(v) => v,
        Err(reason) => return refuse(StatusCode::BAD_REQUEST, reason),
    };
    let wait_ms = match int("wait_ms", &p.wait_ms) {
        Ok(v) => v.unwrap_or(0),
        Err(reason) => return refuse(StatusCode::BAD_REQUEST, reason),
    };
    if !(0..=MAX_WAIT_MS as i64).contains(&wait_ms) {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!("wait_ms: {wait_ms} is not within 0..={MAX_WAIT_MS}"),
        );
    }
    let deadline = started + Duration::from_millis(wait_ms as u64);
    let (row, fresh) = loop {
        let store = state.store.clone();
        let key = uid.clone();
        let row = match tokio::task::spawn_blocking(move || store.get(&Get::row(key))).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return refuse(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            Err(e) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        };
        let fresh = match (min_event_ts, row.as_ref().and_then(evaluated)) {
            (None, _) => true,
            (Some(t), Some(ev)) => ev.last_event_ts >= t,
            (Some(_), None) => false,
        };
        if fresh || Instant::now() >= deadline {
            break (row, fresh);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    metrics::histogram!("dmp_api_lookup_duration_seconds").record(started.elapsed().as_secs_f64());
    let Some(row) = row else {
        return refuse(StatusCode::NOT_FOUND, format!("no user {uid:?}"));
    };
    let current = memberships(Some(&row), "current");
    let ev = evaluated(&row);
    let mut body = serde_json::json!({
        "uid": uid,
        "segments": current
            .iter()
            .map(|(id, since)| serde_json::json!({ "id": id, "since": since }))
            .collect::<Vec<_>>(),
        "evaluated_at": ev.as_ref().map(|e| e.at),
        "last_event_ts": ev.as_ref().map(|e| e.last_event_ts),
        "rules_version": ev.as_ref().map(|e| e.rules_version.clone()),
    });
    if min_event_ts.is_some() {
        body["fresh"] = serde_json::json!(fresh);
    }
    if explain {
        let Some(rules) = state.rules.as_ref() else {
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "explain: no rule set in this process",
            );
        };
        let set = rules();
        let now = dmp_core::clock::now_ms();
        let e = set.explain(&row, now);
        body["explained_at"] = serde_json::json!(now);
        body["explain"] = e
            .live
            .iter()
            .map(|(id, o)| {
                (
                    id.clone(),
                    serde_json::json!(o
                        .evidence
                        .iter()
                        .map(|ev| serde_json::json!({
                            "ts": ev.ts,
                            "cells": ev.cells.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
                        }))
                        .collect::<Vec<_>>()),
                )
            })
            .collect::<serde_json::Map<_, _>>()
            .into();
    }
    Json(body).into_response()
}

/// `DELETE /v1/users/{uid}` (admin): removes the user's row, publishes a segment record with an
/// empty set (partners drop the user), and suppresses the user's events for
/// `api.deleted_user_suppress_secs` so late events do not bring the user back. Counters are
/// HyperLogLogs: a user cannot be taken out of a day's count, which ages out with retention.
pub async fn delete(State(state): State<AppState>, Path(uid): Path<String>) -> Response {
    if let Some(r) = bad_uid(&uid) {
        return r;
    }
    let now = dmp_core::clock::now_ms();
    let until = now + state.deleted_suppress_ms;
    let (store, suppressions, key) = (state.store.clone(), state.suppressions.clone(), uid.clone());
    let removed = tokio::task::spawn_blocking(move || -> dmp_store::Result<Option<Vec<String>>> {
        // Suppress first: from here on, the storage writer drops this user's events.
        store.put(&[dmp_store::suppress::put(&key, until)])?;
        if let Some(s) = &suppressions {
            s.insert(&key, until);
        }
        let row = store.get(&Get::row(key.clone()))?;
        store.delete_row(&key)?;
        Ok(row.map(|r| memberships(Some(&r), "current").into_keys().collect()))
    })
    .await;
    let removed = match removed {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return refuse(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    if let Some(segs) = removed.as_ref().filter(|s| !s.is_empty()) {
        let update = dmp_core::SegmentUpdate {
            uid: uid.clone(),
            segments: Vec::new(),
            added: Vec::new(),
            removed: segs.clone(),
            evaluated_at: now,
            last_event_ts: 0,
            rules_version: "deleted".into(),
        };
        let record = dmp_bus::ProduceRecord::new(uid.clone().into_bytes(), update.to_json());
        if let Err(e) = state.bus.produce(&state.segments_topic, vec![record]).await {
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the row is deleted but the empty segment record was not published: {e}"),
            );
        }
    }
    // On the compacted topic the user's key gets a tombstone, so compaction forgets the user.
    let tombstone = dmp_bus::ProduceRecord::new(uid.clone().into_bytes(), Vec::new());
    if let Err(e) = state
        .bus
        .produce(&state.segments_current_topic, vec![tombstone])
        .await
    {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the row is deleted but the tombstone on the current-state topic was not published: {e}"),
        );
    }
    // A writer in another process learns of the suppression at its next reload; an event it
    // wrote meanwhile would recreate the row, so the row is deleted once more after that.
    let (store, key) = (state.store.clone(), uid.clone());
    let later = state.suppression_settle;
    tokio::spawn(async move {
        tokio::time::sleep(later).await;
        let _ = tokio::task::spawn_blocking(move || store.delete_row(&key)).await;
    });
    metrics::counter!("dmp_api_users_deleted_total").increment(1);
    tracing::info!(existed = removed.is_some(), "user deleted on request");
    Json(serde_json::json!({
        "uid": uid,
        "deleted": removed.is_some(),
        "removed": removed.unwrap_or_default(),
        "suppressed_until": until,
    }))
    .into_response()
}
