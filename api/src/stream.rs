//! `GET /v1/stream/segments?group=NAME[&topic=current][&ack=P:OFFSET,…]`: partners read
//! `dmp.segments` (or, with `topic=current`, the compacted `dmp.segments.current`) over HTTP,
//! without Kafka (the embedded bus's way to reach them; on Kafka they can use their own consumer
//! groups directly).
//!
//! The answer is NDJSON, one line per segment record:
//! `{"partition":P,"offset":O,"timestamp":MS,"key":UID,"record":{…SegmentUpdate…}}`, streamed as
//! records arrive. On the current topic a deleted user's line is a tombstone: `"record":null`.
//! A new partner reads `topic=current` from the start to get the latest set of every user, and
//! keeps reading it for every change after. The group's position is stored by dmp, per topic: a
//! reconnecting client first acknowledges what it has durably processed (`ack=0:41,3:17`: the
//! next offset to read per partition), which is committed for the group before the connection
//! joins it, and the stream resumes from the group's committed position. An acknowledgement waits
//! up to [`ACK_WAIT`] for the group's previous connection to be gone (409 after). Nothing is
//! committed on the client's behalf, so a dropped connection re-sends what was not acknowledged
//! (at-least-once). One connection per group at a time; the stream ends when the server stops.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use dmp_bus::BusError;

use crate::AppState;

/// How long an acknowledgement waits for the group's previous connection to leave.
pub const ACK_WAIT: Duration = Duration::from_secs(5);

/// Query parameters.
#[derive(Debug, Deserialize)]
pub struct Params {
    group: Option<String>,
    topic: Option<String>,
    ack: Option<String>,
}

fn refuse(status: StatusCode, reason: impl Into<String>) -> Response {
    crate::refuse("stream", status, reason)
}

/// `0:41,3:17` -> [(0, 41), (3, 17)].
fn parse_ack(s: &str) -> Result<Vec<(u32, u64)>, String> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (a, b) = p
                .split_once(':')
                .ok_or_else(|| format!("ack: {p:?} is not PARTITION:OFFSET"))?;
            Ok((
                a.parse().map_err(|_| format!("ack: bad partition {a:?}"))?,
                b.parse().map_err(|_| format!("ack: bad offset {b:?}"))?,
            ))
        })
        .collect()
}

/// `GET /v1/stream/segments`.
pub async fn segments(State(state): State<AppState>, Query(p): Query<Params>) -> Response {
    let Some(group) = p.group.filter(|g| {
        !g.is_empty()
            && g.len() <= 200
            && g.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    }) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "group: 1 to 200 characters of A-Z a-z 0-9 - _ . (the partner's own name)",
        );
    };
    let acks = match parse_ack(p.ack.as_deref().unwrap_or("")) {
        Ok(a) => a,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, e),
    };
    let topic = match p.topic.as_deref() {
        None | Some("segments") => state.segments_topic.clone(),
        Some("current") => state.segments_current_topic.clone(),
        Some(other) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!("topic: segments (every change, the default) or current (the latest record of each user, compacted), not {other:?}"),
            )
        }
    };
    let group_id = format!("partner.{group}");
    if !acks.is_empty() {
        // The acknowledgement is the partner's, for its group as a whole: committed before this
        // connection joins the group. (Committed by the new member, it was dropped for any
        // partition the group still gave the previous connection, which leaves the group only
        // when the server notices it closed: the partner then got acknowledged records again.)
        let partitions = match state.bus.offsets(&topic).await {
            Ok(o) => o.len(),
            Err(e) => return refuse(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        };
        if let Some((p, _)) = acks.iter().find(|(p, _)| *p as usize >= partitions) {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!("ack: partition {p} does not exist (the topic has {partitions})"),
            );
        }
        let deadline = tokio::time::Instant::now() + ACK_WAIT;
        loop {
            match state.bus.commit_group(&group_id, &topic, &acks).await {
                Ok(()) => break,
                // Another connection of the group is still live (or just closing): wait for it.
                Err(BusError::Rejected(_)) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(BusError::Rejected(e)) => {
                    return refuse(StatusCode::CONFLICT, format!("ack: {e}"))
                }
                Err(e) => return refuse(StatusCode::SERVICE_UNAVAILABLE, format!("ack: {e}")),
            }
        }
    }
    let consumer = match state
        .bus
        .consumer(&group_id, std::slice::from_ref(&topic))
        .await
    {
        Ok(c) => c,
        Err(e) => return refuse(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    metrics::counter!("dmp_api_stream_connections_total").increment(1);
    let stopping = state.stopping.clone();
    let body = futures_util::stream::unfold((consumer, stopping), |(mut c, stop)| async move {
        loop {
            if *stop.borrow() {
                return None;
            }
            match c.poll(1000, Duration::from_millis(500)).await {
                Ok(records) if records.is_empty() => continue,
                Ok(records) => {
                    let mut out = Vec::with_capacity(records.len() * 256);
                    for r in &records {
                        write_line(r, &mut out);
                    }
                    return Some((Ok::<_, std::io::Error>(bytes::Bytes::from(out)), (c, stop)));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "partner stream ends: bus failed");
                    return None;
                }
            }
        }
    });
    (
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(body),
    )
        .into_response()
}

/// Appends `r` as one NDJSON line of the stream. The record's value, dmp's own compact JSON, goes
/// out as stored once it is checked to be one line of JSON (parsing it into a tree and printing
/// the tree again cost several times more); a value that spans lines is printed compact, and one
/// that is not JSON, such as a tombstone (a deleted user on the current topic), is `null`.
pub fn write_line(r: &dmp_bus::Record, out: &mut Vec<u8>) {
    let mut num = itoa::Buffer::new();
    out.extend_from_slice(br#"{"partition":"#);
    out.extend_from_slice(num.format(r.partition).as_bytes());
    out.extend_from_slice(br#","offset":"#);
    out.extend_from_slice(num.format(r.offset).as_bytes());
    out.extend_from_slice(br#","timestamp":"#);
    out.extend_from_slice(num.format(r.timestamp).as_bytes());
    out.extend_from_slice(br#","key":"#);
    serde_json::to_writer(&mut *out, &*String::from_utf8_lossy(&r.key))
        .expect("a string serialises");
    out.extend_from_slice(br#","record":"#);
    let v = &r.value;
    let one_line = !v.iter().any(|b| *b == b'\n' || *b == b'\r');
    // Strings a value skips are not checked as UTF-8 by serde_json: checked first.
    if one_line
        && std::str::from_utf8(v).is_ok()
        && serde_json::from_slice::<serde::de::IgnoredAny>(v).is_ok()
    {
        out.extend_from_slice(v);
    } else {
        match serde_json::from_slice::<serde_json::Value>(v) {
            Ok(tree) => serde_json::to_writer(&mut *out, &tree).expect("a value serialises"),
            Err(_) => out.extend_from_slice(b"null"),
        }
    }
    out.extend_from_slice(b"}\n");
}

/// A record's line as a JSON tree, the way the stream made it before [`write_line`]: what the
/// tests and `benches/stream.rs` hold it to.
#[doc(hidden)]
pub fn line_tree(r: &dmp_bus::Record) -> serde_json::Value {
    serde_json::json!({
        "partition": r.partition,
        "offset": r.offset,
        "timestamp": r.timestamp,
        "key": String::from_utf8_lossy(&r.key),
        "record": serde_json::from_slice::<serde_json::Value>(&r.value)
            .unwrap_or(serde_json::Value::Null),
    })
}

#[cfg(test)]
mod tests {
    fn record(key: &[u8], value: &[u8]) -> dmp_bus::Record {
        dmp_bus::Record {
            topic: "dmp.segments".into(),
            partition: 3,
            offset: 41,
            timestamp: 1_795_341_600_123,
            key: key.to_vec(),
            value: value.to_vec(),
        }
    }

    #[test]
    fn given_any_record_then_its_line_is_one_line_of_the_same_json_as_the_tree() {
        let update = dmp_core::segment::SegmentUpdate {
            uid: "anna \"the\" user".into(),
            segments: vec!["cat_lovers".into(), "кошки".into()],
            added: vec!["кошки".into()],
            removed: vec![],
            evaluated_at: 1_795_341_600_100,
            last_event_ts: 1_795_341_600_000,
            rules_version: "v1".into(),
        };
        let cases: Vec<(&[u8], Vec<u8>)> = vec![
            (b"anna", update.to_json()),
            (b"anna", Vec::new()),                             // tombstone
            (b"anna", b"{\n  \"pretty\": [1, 2]\n}".to_vec()), // spans lines
            (b"anna", b"not json".to_vec()),
            (b"anna", b"{\"a\":\"\xff\"}".to_vec()), // not UTF-8
            (b"anna", b"{\"a\":1} trailing".to_vec()),
            (b"we\"ird\\key\xff", b"  {\"a\":\"\\u00e9\"}\t".to_vec()), // key to escape
        ];
        for (key, value) in cases {
            let r = record(key, &value);
            let mut out = Vec::new();
            super::write_line(&r, &mut out);
            assert_eq!(out.last(), Some(&b'\n'));
            assert!(!out[..out.len() - 1].contains(&b'\n'), "one line");
            let line: serde_json::Value = serde_json::from_slice(&out)
                .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out)));
            assert_eq!(
                line,
                super::line_tree(&r),
                "{}",
                String::from_utf8_lossy(&value)
            );
        }
    }

    #[test]
    fn acks_parse() {
        assert_eq!(
            super::parse_ack("0:41,3:17").unwrap(),
            vec![(0, 41), (3, 17)]
        );
        assert_eq!(super::parse_ack("").unwrap(), vec![]);
        assert!(super::parse_ack("0-41").is_err());
        assert!(super::parse_ack("x:1").is_err());
    }
}
