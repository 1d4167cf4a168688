//! Ingest over HTTP: `GET /px.gif` and `POST /v1/events`.
//!
//! An event is acknowledged (2xx) only once it is on `dmp.events`, or, when the bus does not
//! answer within `api.ingest_timeout_ms`, once it is fsynced in the spill file (replayed later).

use std::collections::HashMap;
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use dmp_bus::{Bus, ProduceRecord};
use dmp_core::config::ApiConfig;
use dmp_core::event::{CheckedLine, EventLimits};
use dmp_core::{Event, EventError};

use crate::spill::{Spill, SpillError};
use crate::AppState;

/// Ingest metrics.
pub mod metrics_names {
    /// Events received, by `endpoint` (counter).
    pub const RECEIVED: &str = "dmp_ingest_events_received_total";
    /// Events accepted, by `endpoint` and `source` (configured names or `other`) (counter).
    pub const ACCEPTED: &str = "dmp_ingest_events_accepted_total";
    /// Events rejected, by `endpoint` and `reason` (counter).
    pub const REJECTED: &str = "dmp_ingest_events_rejected_total";
    /// Requests refused whole, by `endpoint` and `status` (counter).
    pub const REFUSED: &str = "dmp_ingest_requests_refused_total";
}
use metrics_names as mn;

/// The 1x1 transparent GIF.
pub const PIXEL_GIF: &[u8] = &[
    0x47, 0x49, 0x46, 0x38, 0x39, 0x61, 0x01, 0x00, 0x01, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xff, 0xff, 0xff, 0x21, 0xf9, 0x04, 0x01, 0x00, 0x00, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x01, 0x00, 0x00, 0x02, 0x02, 0x44, 0x01, 0x00, 0x3b,
];

/// The source of an event sent to `POST /v1/events` that names none.
pub const HTTP_SRC: &str = "http";

/// An accepted event, as the ingest endpoints put it on the bus: parsed, or still in its line.
pub trait Accepted {
    /// The user id (the record's key).
    fn uid(&self) -> &str;
    /// The source, for the accepted events' count.
    fn src(&self) -> Option<&str>;
    /// The record's value.
    fn to_json(&self) -> Vec<u8>;
}

impl Accepted for Event {
    fn uid(&self) -> &str {
        &self.uid
    }
    fn src(&self) -> Option<&str> {
        self.src.as_deref()
    }
    fn to_json(&self) -> Vec<u8> {
        Event::to_json(self)
    }
}

impl Accepted for CheckedLine<'_> {
    fn uid(&self) -> &str {
        CheckedLine::uid(self)
    }
    fn src(&self) -> Option<&str> {
        CheckedLine::src(self)
    }
    fn to_json(&self) -> Vec<u8> {
        CheckedLine::to_json(self)
    }
}

/// Where accepted events go.
pub struct Ingest {
    bus: Arc<dyn Bus>,
    topic: String,
    spill: Arc<Spill>,
    cfg: ApiConfig,
    limits: EventLimits,
}

/// Where a batch ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Landing {
    /// On the bus.
    Bus,
    /// In the spill file, to be replayed.
    Spill,
}

impl Ingest {
    /// Ingest onto `topic` of `bus`, spilling to `spill`.
    pub fn new(bus: Arc<dyn Bus>, topic: String, spill: Arc<Spill>, cfg: ApiConfig) -> Ingest {
        Ingest {
            bus,
            topic,
            spill,
            cfg,
            limits: EventLimits::default(),
        }
    }

    /// The spill.
    pub fn spill(&self) -> &Arc<Spill> {
        &self.spill
    }

    /// Puts validated events on the bus, or in the spill when the bus does not answer in time.
    pub async fn submit<E: Accepted + Sync>(&self, events: &[E]) -> Result<Landing, SpillError> {
        if events.is_empty() {
            return Ok(Landing::Bus);
        }
        let now = dmp_core::clock::now_ms();
        // The records go to the bus; should it fail, they are made again for the spill file
        // (rather than copied on every request in case it does).
        let records = || -> Vec<ProduceRecord> {
            events
                .iter()
                .map(|e| ProduceRecord {
                    key: e.uid().as_bytes().to_vec(),
                    value: e.to_json(),
                    timestamp: Some(now),
                })
                .collect()
        };
        let timeout = Duration::from_millis(self.cfg.ingest_timeout_ms);
        match tokio::time::timeout(timeout, self.bus.produce(&self.topic, records())).await {
            Ok(Ok(_)) => Ok(Landing::Bus),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, events = events.len(), "bus refused ingest; spilling");
                self.spill.append(&records()).map(|_| Landing::Spill)
            }
            Err(_) => {
                tracing::warn!(
                    events = events.len(),
                    "bus did not answer in time; spilling"
                );
                self.spill.append(&records()).map(|_| Landing::Spill)
            }
        }
    }

    fn source_label<'a>(&self, src: Option<&'a str>) -> &'a str {
        match src {
            Some(s) if self.cfg.metric_sources.iter().any(|m| m == s) => s,
            _ => "other",
        }
    }

    fn count_accepted<E: Accepted>(&self, endpoint: &'static str, events: &[E]) {
        let mut by_source: HashMap<&str, u64> = HashMap::new();
        for e in events {
            *by_source.entry(self.source_label(e.src())).or_default() += 1;
        }
        for (source, n) in by_source {
            metrics::counter!(mn::ACCEPTED, "endpoint" => endpoint, "source" => source.to_string())
                .increment(n);
        }
    }
}

fn refuse(endpoint: &'static str, status: StatusCode, reason: String) -> Response {
    metrics::counter!(mn::REFUSED, "endpoint" => endpoint, "status" => status.as_u16().to_string())
        .increment(1);
    (status, Json(serde_json::json!({ "error": reason }))).into_response()
}

fn spill_failure(endpoint: &'static str, e: SpillError) -> Response {
    tracing::error!(error = %e, "ingest could not be made durable");
    refuse(endpoint, StatusCode::SERVICE_UNAVAILABLE, e.to_string())
}

/// The client IP: the first address of the trusted proxy header when one is configured and
/// present, else the peer address.
fn client_ip(cfg: &ApiConfig, headers: &HeaderMap, peer: Option<SocketAddr>) -> Option<String> {
    if !cfg.trusted_proxy_header.is_empty() {
        if let Some(v) = headers
            .get(cfg.trusted_proxy_header.as_str())
            .and_then(|v| v.to_str().ok())
        {
            if let Some(first) = v.split(',').map(str::trim).find(|s| !s.is_empty()) {
                if first.parse::<IpAddr>().is_ok() {
                    return Some(first.to_string());
                }
            }
        }
    }
    peer.map(|p| p.ip().to_string())
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

fn new_uid() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `GET /px.gif?uid=…&url=…&ref=…&q=…&src=…&type=…&a.<name>=…`
pub async fn pixel(
    State(s): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
    req: axum::extract::Request,
) -> Response {
    const EP: &str = "pixel";
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().cloned();
    let headers = req.headers();
    metrics::counter!(mn::RECEIVED, "endpoint" => EP).increment(1);
    let ingest = &s.ingest;
    let cfg = &ingest.cfg;
    let (uid, issued) = match params
        .get("uid")
        .cloned()
        .filter(|u| !u.is_empty())
        .or_else(|| cookie(headers, &cfg.uid_cookie))
    {
        Some(u) => (u, false),
        None => (new_uid(), true),
    };
    let header_str = |h: header::HeaderName| {
        headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let mut obj = serde_json::Map::new();
    obj.insert("uid".into(), uid.clone().into());
    obj.insert(
        "type".into(),
        params
            .get("type")
            .cloned()
            .unwrap_or_else(|| "pageview".into())
            .into(),
    );
    obj.insert(
        "src".into(),
        params
            .get("src")
            .cloned()
            .unwrap_or_else(|| "pixel".into())
            .into(),
    );
    // The page is the pixel request's referrer unless the tag says otherwise.
    if let Some(url) = params
        .get("url")
        .cloned()
        .or_else(|| header_str(header::REFERER))
    {
        obj.insert("url".into(), url.into());
    }
    for (k, field) in [("ref", "ref"), ("q", "q"), ("ts", "ts")] {
        if let Some(v) = params.get(k) {
            obj.insert(field.into(), v.clone().into());
        }
    }
    if let Some(ip) = client_ip(cfg, headers, peer.map(|c| c.0)) {
        obj.insert("ip".into(), ip.into());
    }
    if let Some(ua) = header_str(header::USER_AGENT) {
        obj.insert("ua".into(), ua.into());
    }
    let attrs: serde_json::Map<String, serde_json::Value> = params
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("a.")
                .map(|k| (k.to_string(), v.clone().into()))
        })
        .collect();
    if !attrs.is_empty() {
        obj.insert("attrs".into(), attrs.into());
    }
    let event = match Event::from_json(obj.into(), dmp_core::clock::now_ms(), &ingest.limits) {
        Ok(e) => e,
        Err(e) => {
            metrics::counter!(mn::REJECTED, "endpoint" => EP, "reason" => e.reason()).increment(1);
            return refuse(EP, StatusCode::BAD_REQUEST, e.to_string());
        }
    };
    if let Err(e) = ingest.submit(std::slice::from_ref(&event)).await {
        return spill_failure(EP, e);
    }
    ingest.count_accepted(EP, std::slice::from_ref(&event));
    let mut resp = (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "image/gif"),
            (
                header::CACHE_CONTROL,
                "no-cache, no-store, must-revalidate, private",
            ),
            (header::PRAGMA, "no-cache"),
            (header::EXPIRES, "0"),
        ],
        PIXEL_GIF,
    )
        .into_response();
    if issued {
        let max_age = cfg.uid_cookie_max_age_days * 86_400;
        let c = format!(
            "{}={uid}; Max-Age={max_age}; Path=/; SameSite=Lax; HttpOnly",
            cfg.uid_cookie
        );
        if let Ok(v) = c.parse() {
            resp.headers_mut().insert(header::SET_COOKIE, v);
        }
    }
    resp
}

/// One rejected event of a batch.
#[derive(Debug, Serialize)]
pub struct Rejection {
    /// Position in the batch (0-based).
    pub index: usize,
    /// Reason code.
    pub reason: &'static str,
    /// The message, naming the field.
    pub error: String,
}

/// The answer to `POST /v1/events`.
#[derive(Debug, Serialize)]
pub struct BatchAnswer {
    /// Events acknowledged.
    pub accepted: usize,
    /// Events refused.
    pub rejected: usize,
    /// Where the accepted events went.
    pub landed: Landing,
    /// Each refused event.
    pub errors: Vec<Rejection>,
}

enum Format {
    JsonArray,
    Ndjson,
}

/// The events of an NDJSON body (blank lines skipped), or why each line could not be one, in
/// order, each event still in its line when the line can go to the bus as it is
/// ([`Event::check_line`], with [`HTTP_SRC`] for a line that names no source). Lines are found
/// with `memchr`, and the vector is sized once from their count, up to one more than
/// `max_events` (a longer batch is refused after parsing anyway, and a body of
/// newlines must not reserve room for millions of events): collecting a request's events into a
/// vector grown from empty was 7% of the API runtime's samples at 100K events/s, most of it
/// faults of fresh pages.
pub fn ndjson_events<'a>(
    body: &'a [u8],
    now: i64,
    limits: &EventLimits,
    max_events: usize,
) -> Vec<Result<CheckedLine<'a>, EventError>> {
    let lines = memchr::memchr_iter(b'\n', body).count() + 1;
    let mut items = Vec::with_capacity(lines.min(max_events.saturating_add(1)));
    let mut start = 0;
    for end in memchr::memchr_iter(b'\n', body).chain(std::iter::once(body.len())) {
        let line = &body[start..end];
        start = end + 1;
        if !line.iter().all(u8::is_ascii_whitespace) {
            items.push(Event::check_line(line, now, HTTP_SRC, limits));
        }
    }
    items
}

/// `POST /v1/events` with a JSON array (`application/json`) or NDJSON (`application/x-ndjson`),
/// optionally `Content-Encoding: gzip`.
pub async fn events(State(s): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    const EP: &str = "events";
    let ingest = &s.ingest;
    let cfg = &ingest.cfg;
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let format = match ctype.as_str() {
        "application/json" => Format::JsonArray,
        "application/x-ndjson" | "application/ndjson" | "application/jsonl" | "application/x-jsonlines" => {
            Format::Ndjson
        }
        other => {
            return refuse(
                EP,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "content type {:?} is not supported: send application/json (an array of events) or application/x-ndjson (one event per line)",
                    other
                ),
            )
        }
    };
    let gzip = match headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
    {
        None | Some("identity") => false,
        Some("gzip") | Some("x-gzip") => true,
        Some(other) => {
            return refuse(
                EP,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("content encoding {other:?} is not supported: use gzip or none"),
            )
        }
    };
    let limit = cfg.max_body_bytes;
    let raw = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(_) => {
            return refuse(
                EP,
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body exceeds the limit of {limit} bytes (api.max_body_bytes)"),
            )
        }
    };
    let body: bytes::Bytes = if gzip {
        let mut out = Vec::new();
        let read = flate2::read::GzDecoder::new(&raw[..])
            .take(limit as u64 + 1)
            .read_to_end(&mut out);
        match read {
            Err(e) => {
                return refuse(
                    EP,
                    StatusCode::BAD_REQUEST,
                    format!("body is not valid gzip: {e}"),
                )
            }
            Ok(n) if n > limit => {
                return refuse(
                    EP,
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "decompressed body exceeds the limit of {limit} bytes (api.max_body_bytes)"
                    ),
                )
            }
            Ok(_) => out.into(),
        }
    } else {
        raw
    };
    let now = dmp_core::clock::now_ms();
    let limits = &ingest.limits;
    // Items: events, or why each could not be one. NDJSON lines take `Event::check_line`'s typed,
    // borrowing parse (no JSON tree per event, and the line goes on as the record); a JSON array
    // is parsed whole first.
    let parsed = |v: serde_json::Value| {
        Event::from_json(v, now, limits).map(|mut e| {
            e.src.get_or_insert_with(|| HTTP_SRC.into());
            CheckedLine::Event(e)
        })
    };
    let items: Vec<Result<CheckedLine<'_>, EventError>> = match format {
        Format::JsonArray => match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(serde_json::Value::Array(a)) => a.into_iter().map(parsed).collect(),
            Ok(obj @ serde_json::Value::Object(_)) => vec![parsed(obj)],
            Ok(_) => {
                return refuse(
                    EP,
                    StatusCode::BAD_REQUEST,
                    "body must be a JSON array of events (or one event object)".into(),
                )
            }
            Err(e) => return refuse(EP, StatusCode::BAD_REQUEST, format!("malformed JSON: {e}")),
        },
        Format::Ndjson => ndjson_events(&body, now, limits, cfg.max_batch_events),
    };
    if items.len() > cfg.max_batch_events {
        return refuse(
            EP,
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "batch of {} events exceeds the limit of {} (api.max_batch_events)",
                items.len(),
                cfg.max_batch_events
            ),
        );
    }
    metrics::counter!(mn::RECEIVED, "endpoint" => EP).increment(items.len() as u64);
    let mut accepted = Vec::with_capacity(items.len());
    let mut errors = Vec::new();
    for (index, item) in items.into_iter().enumerate() {
        match item {
            Ok(ev) => accepted.push(ev),
            Err(e) => {
                metrics::counter!(mn::REJECTED, "endpoint" => EP, "reason" => e.reason())
                    .increment(1);
                errors.push(Rejection {
                    index,
                    reason: e.reason(),
                    error: e.to_string(),
                });
            }
        }
    }
    let landed = match ingest.submit(&accepted).await {
        Ok(l) => l,
        Err(e) => return spill_failure(EP, e),
    };
    ingest.count_accepted(EP, &accepted);
    let answer = BatchAnswer {
        accepted: accepted.len(),
        rejected: errors.len(),
        landed,
        errors,
    };
    let status = if answer.accepted == 0 && answer.rejected > 0 {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::ACCEPTED
    };
    (status, Json(answer)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(header: &str) -> ApiConfig {
        let mut c = dmp_core::Config::defaults().api;
        c.trusted_proxy_header = header.to_string();
        c
    }

    #[test]
    fn given_an_ndjson_body_when_parsed_then_lines_in_order_blank_ones_skipped() {
        let body = b"{\"uid\":\"a\",\"ts\":1}\n\n  \n{\"uid\":\"\"}\r\n{\"uid\":\"b\",\"ts\":2}";
        let items = ndjson_events(body, 10, &EventLimits::default(), 100);
        assert_eq!(items.len(), 3);
        assert_eq!(items[0].as_ref().unwrap().uid(), "a");
        assert!(items[1].is_err(), "an empty uid is refused");
        assert_eq!(items[2].as_ref().unwrap().uid(), "b");
    }

    #[test]
    fn given_a_body_of_newlines_when_parsed_then_room_for_no_more_than_the_limit() {
        let body = vec![b'\n'; 1_000_000];
        let items = ndjson_events(&body, 10, &EventLimits::default(), 2000);
        assert!(items.is_empty());
        assert!(items.capacity() <= 2001, "{}", items.capacity());
    }

    #[test]
    fn given_trusted_proxy_header_configured_when_present_then_its_first_address_is_the_client() {
        let peer: SocketAddr = "10.0.0.5:4000".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "178.49.0.1, 10.0.0.2".parse().unwrap());
        assert_eq!(
            client_ip(&cfg("x-forwarded-for"), &h, Some(peer)).as_deref(),
            Some("178.49.0.1")
        );
        // Not configured: the header is ignored, whatever it says.
        assert_eq!(
            client_ip(&cfg(""), &h, Some(peer)).as_deref(),
            Some("10.0.0.5")
        );
        // Configured but garbage or absent: the peer address.
        let mut bad = HeaderMap::new();
        bad.insert("x-forwarded-for", "unknown".parse().unwrap());
        assert_eq!(
            client_ip(&cfg("x-forwarded-for"), &bad, Some(peer)).as_deref(),
            Some("10.0.0.5")
        );
        assert_eq!(
            client_ip(&cfg("x-forwarded-for"), &HeaderMap::new(), Some(peer)).as_deref(),
            Some("10.0.0.5")
        );
    }

    #[test]
    fn given_cookie_header_when_parsed_then_named_cookie_is_found() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, "a=1; dmp_uid=abc ; b=2".parse().unwrap());
        assert_eq!(cookie(&h, "dmp_uid").as_deref(), Some("abc"));
        assert_eq!(cookie(&h, "missing"), None);
        assert_eq!(new_uid().len(), 32);
        assert_ne!(new_uid(), new_uid());
    }
}
