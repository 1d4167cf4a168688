//! The public ingest format (JSON), and its validation.
//!
//! ```json
//! {"uid":"u1","ts":"2026-11-22T10:00:00Z","type":"search","q":"ипотека","url":"https://bank.example/",
//!  "ip":"203.0.113.7","ua":"Mozilla/5.0 …","src":"pixel","attrs":{"gender":"f"}}
//! ```
//! `ts` is epoch milliseconds or RFC 3339 and defaults to the arrival time. Every error names the
//! field at fault, so an HTTP 4xx or a dead-letter record can say exactly what was wrong.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::clock::DAY_MS;

/// Bounds on an event, checked by [`Event::parse`]. The defaults suit web and app events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventLimits {
    /// Longest uid, in bytes.
    pub max_uid_bytes: usize,
    /// Most entries in `attrs`.
    pub max_attrs: usize,
    /// Longest attribute name, in bytes.
    pub max_attr_key_bytes: usize,
    /// Longest attribute value, in bytes.
    pub max_attr_value_bytes: usize,
    /// Longest value of any other string field (url, ref, q, ua, …), in bytes.
    pub max_field_bytes: usize,
    /// Largest whole event, in bytes of JSON.
    pub max_event_bytes: usize,
    /// How far in the future `ts` may be, in milliseconds.
    pub max_future_ms: i64,
}

impl Default for EventLimits {
    fn default() -> Self {
        EventLimits {
            max_uid_bytes: 256,
            max_attrs: 64,
            max_attr_key_bytes: 128,
            max_attr_value_bytes: 4096,
            max_field_bytes: 8192,
            max_event_bytes: 65_536,
            max_future_ms: DAY_MS,
        }
    }
}

/// A validated event. `ts` is epoch milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// The user id (1..=256 bytes).
    pub uid: String,
    /// Event time, epoch milliseconds.
    pub ts: i64,
    /// Event type: pageview, search, click, purchase, … (free text).
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Page URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Referrer URL.
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub referrer: Option<String>,
    /// Search query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub q: Option<String>,
    /// Client IP address (v4 or v6, as text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// User agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ua: Option<String>,
    /// Source or partner id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src: Option<String>,
    /// Custom attributes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attrs: BTreeMap<String, String>,
}

/// A validated event whose strings borrow from the bytes it was parsed from, those that hold no
/// escapes ([`EventRef::parse`]): for a reader that keeps them in buffers of its own anyway. The
/// storage writer's cells are slices of one copy of the record instead of a string each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRef<'a> {
    /// The user id.
    pub uid: Cow<'a, str>,
    /// Event time, epoch milliseconds.
    pub ts: i64,
    /// Event type.
    pub kind: Option<Cow<'a, str>>,
    /// Page URL.
    pub url: Option<Cow<'a, str>>,
    /// Referrer URL.
    pub referrer: Option<Cow<'a, str>>,
    /// Search query.
    pub q: Option<Cow<'a, str>>,
    /// Client IP address, as text.
    pub ip: Option<Cow<'a, str>>,
    /// User agent.
    pub ua: Option<Cow<'a, str>>,
    /// Source or partner id.
    pub src: Option<Cow<'a, str>>,
    /// Custom attributes, in key order, each key once.
    pub attrs: Vec<(Cow<'a, str>, Cow<'a, str>)>,
}

/// Why an event was rejected. The message always names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// The bytes are not UTF-8.
    #[error("event is not valid UTF-8 (first bad byte at offset {offset})")]
    NotUtf8 {
        /// Offset of the first invalid byte.
        offset: usize,
    },
    /// The event is larger than allowed.
    #[error("event is {size} bytes, over the limit of {limit}")]
    TooLarge {
        /// Size of the event.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Not JSON, or not a JSON object of the expected shape.
    #[error("malformed JSON: {0}")]
    Malformed(String),
    /// `uid` is absent or empty.
    #[error("missing field `uid`")]
    MissingUid,
    /// `uid` is too long.
    #[error("field `uid` is {len} bytes, over the limit of {limit}")]
    UidTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// A field has the wrong JSON type.
    #[error("field `{field}` must be {expected}")]
    WrongType {
        /// The field.
        field: &'static str,
        /// What it should be.
        expected: &'static str,
    },
    /// `ts` could not be understood.
    #[error("field `ts` is not epoch milliseconds or RFC 3339: {value}")]
    BadTs {
        /// The offending value (shortened).
        value: String,
    },
    /// `ts` is too far in the future.
    #[error("field `ts` is {ahead_ms} ms in the future (at most {limit_ms} allowed)")]
    TsInFuture {
        /// How far ahead.
        ahead_ms: i64,
        /// The limit.
        limit_ms: i64,
    },
    /// A string field is too long.
    #[error("field `{field}` is {len} bytes, over the limit of {limit}")]
    FieldTooLong {
        /// The field.
        field: String,
        /// Its length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// `attrs` has too many entries.
    #[error("field `attrs` has {count} entries, over the limit of {limit}")]
    TooManyAttrs {
        /// How many.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// A field that is not part of the format.
    #[error("unknown field `{0}` (custom data goes into `attrs`)")]
    UnknownField(String),
}

impl EventError {
    /// A short stable reason code, for metric labels and dead-letter records.
    pub fn reason(&self) -> &'static str {
        match self {
            EventError::NotUtf8 { .. } => "not_utf8",
            EventError::TooLarge { .. } => "too_large",
            EventError::Malformed(_) => "malformed_json",
            EventError::MissingUid => "missing_uid",
            EventError::UidTooLong { .. } => "uid_too_long",
            EventError::WrongType { .. } => "wrong_type",
            EventError::BadTs { .. } => "bad_ts",
            EventError::TsInFuture { .. } => "ts_in_future",
            EventError::FieldTooLong { .. } => "field_too_long",
            EventError::TooManyAttrs { .. } => "too_many_attrs",
            EventError::UnknownField(_) => "unknown_field",
        }
    }
}

const STRING_FIELDS: [&str; 7] = ["type", "url", "ref", "q", "ip", "ua", "src"];

impl Event {
    /// Parses and validates one event from raw bytes. `now_ms` is the arrival time: the default
    /// `ts`, and the reference for the "not too far in the future" check.
    pub fn parse(bytes: &[u8], now_ms: i64, limits: &EventLimits) -> Result<Event, EventError> {
        EventRef::parse(bytes, now_ms, limits).map(EventRef::into_owned)
    }
}

impl<'a> EventRef<'a> {
    /// [`Event::parse`], with the strings that hold no escapes borrowed from `bytes`.
    pub fn parse(
        bytes: &'a [u8],
        now_ms: i64,
        limits: &EventLimits,
    ) -> Result<EventRef<'a>, EventError> {
        if bytes.len() > limits.max_event_bytes {
            return Err(EventError::TooLarge {
                size: bytes.len(),
                limit: limits.max_event_bytes,
            });
        }
        let text = std::str::from_utf8(bytes).map_err(|e| EventError::NotUtf8 {
            offset: e.valid_up_to(),
        })?;
        // Fast path: a typed, borrowing parse for well-formed events. Anything it does not take
        // (bad types, unknown fields, null uid, …) goes the generic way, whose errors name the field.
        if let Ok(fast) = serde_json::from_str::<FastEvent<'a>>(text) {
            if let Some(ev) = fast.into_ref(now_ms, limits) {
                return Ok(ev);
            }
        }
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| EventError::Malformed(e.to_string()))?;
        Event::from_json(value, now_ms, limits).map(EventRef::from)
    }

    /// The event, its strings owned.
    pub fn into_owned(self) -> Event {
        let own = |f: Option<Cow<'_, str>>| f.map(Cow::into_owned);
        Event {
            uid: self.uid.into_owned(),
            ts: self.ts,
            kind: own(self.kind),
            url: own(self.url),
            referrer: own(self.referrer),
            q: own(self.q),
            ip: own(self.ip),
            ua: own(self.ua),
            src: own(self.src),
            attrs: self
                .attrs
                .into_iter()
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        }
    }
}

impl From<Event> for EventRef<'static> {
    fn from(e: Event) -> EventRef<'static> {
        EventRef {
            uid: Cow::Owned(e.uid),
            ts: e.ts,
            kind: e.kind.map(Cow::Owned),
            url: e.url.map(Cow::Owned),
            referrer: e.referrer.map(Cow::Owned),
            q: e.q.map(Cow::Owned),
            ip: e.ip.map(Cow::Owned),
            ua: e.ua.map(Cow::Owned),
            src: e.src.map(Cow::Owned),
            attrs: e
                .attrs
                .into_iter()
                .map(|(k, v)| (Cow::Owned(k), Cow::Owned(v)))
                .collect(),
        }
    }
}

impl Event {
    /// Validates one event already parsed as JSON.
    pub fn from_json(
        value: serde_json::Value,
        now_ms: i64,
        limits: &EventLimits,
    ) -> Result<Event, EventError> {
        let serde_json::Value::Object(mut obj) = value else {
            return Err(EventError::Malformed(
                "an event must be a JSON object".into(),
            ));
        };
        let uid = match obj.remove("uid") {
            None | Some(serde_json::Value::Null) => return Err(EventError::MissingUid),
            Some(serde_json::Value::String(s)) => s,
            Some(_) => {
                return Err(EventError::WrongType {
                    field: "uid",
                    expected: "a string",
                })
            }
        };
        if uid.is_empty() {
            return Err(EventError::MissingUid);
        }
        if uid.len() > limits.max_uid_bytes {
            return Err(EventError::UidTooLong {
                len: uid.len(),
                limit: limits.max_uid_bytes,
            });
        }
        if uid.chars().any(char::is_control) {
            return Err(EventError::WrongType {
                field: "uid",
                expected: "a string without control characters",
            });
        }
        let ts = match obj.remove("ts") {
            None | Some(serde_json::Value::Null) => now_ms,
            Some(v) => parse_ts(&v)?,
        };
        if ts - now_ms > limits.max_future_ms {
            return Err(EventError::TsInFuture {
                ahead_ms: ts - now_ms,
                limit_ms: limits.max_future_ms,
            });
        }
        let mut strings: [Option<String>; 7] = Default::default();
        for (i, field) in STRING_FIELDS.iter().enumerate() {
            strings[i] = match obj.remove(*field) {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::String(s)) => {
                    if s.len() > limits.max_field_bytes {
                        return Err(EventError::FieldTooLong {
                            field: (*field).to_string(),
                            len: s.len(),
                            limit: limits.max_field_bytes,
                        });
                    }
                    Some(s)
                }
                Some(_) => {
                    return Err(EventError::WrongType {
                        field,
                        expected: "a string",
                    })
                }
            };
        }
        let attrs = match obj.remove("attrs") {
            None | Some(serde_json::Value::Null) => BTreeMap::new(),
            Some(serde_json::Value::Object(map)) => {
                if map.len() > limits.max_attrs {
                    return Err(EventError::TooManyAttrs {
                        count: map.len(),
                        limit: limits.max_attrs,
                    });
                }
                let mut attrs = BTreeMap::new();
                for (k, v) in map {
                    if k.is_empty() || k.len() > limits.max_attr_key_bytes {
                        return Err(EventError::FieldTooLong {
                            field: format!("attrs.{}", shorten(&k)),
                            len: k.len(),
                            limit: limits.max_attr_key_bytes,
                        });
                    }
                    let v = match v {
                        serde_json::Value::String(s) => s,
                        serde_json::Value::Number(n) => n.to_string(),
                        serde_json::Value::Bool(b) => b.to_string(),
                        _ => {
                            return Err(EventError::WrongType {
                                field: "attrs",
                                expected: "an object of strings, numbers or booleans",
                            })
                        }
                    };
                    if v.len() > limits.max_attr_value_bytes {
                        return Err(EventError::FieldTooLong {
                            field: format!("attrs.{k}"),
                            len: v.len(),
                            limit: limits.max_attr_value_bytes,
                        });
                    }
                    attrs.insert(k, v);
                }
                attrs
            }
            Some(_) => {
                return Err(EventError::WrongType {
                    field: "attrs",
                    expected: "an object",
                })
            }
        };
        if let Some((k, _)) = obj.into_iter().next() {
            return Err(EventError::UnknownField(shorten(&k)));
        }
        let [kind, url, referrer, q, ip, ua, src] = strings;
        Ok(Event {
            uid,
            ts,
            kind,
            url,
            referrer,
            q,
            ip,
            ua,
            src,
            attrs,
        })
    }

    /// The canonical JSON of this event (what dmp itself puts on `dmp.events`).
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.json_len_estimate());
        serde_json::to_writer(&mut out, self).expect("an Event always serialises");
        out
    }

    /// The length of [`Event::to_json`] when no string needs escaping: the buffer is allocated
    /// once instead of grown (and copied) several times from empty.
    fn json_len_estimate(&self) -> usize {
        // `{"uid":"","ts":}` and the digits of any i64.
        let mut n = 36 + self.uid.len();
        for (name, v) in [
            ("type", &self.kind),
            ("url", &self.url),
            ("ref", &self.referrer),
            ("q", &self.q),
            ("ip", &self.ip),
            ("ua", &self.ua),
            ("src", &self.src),
        ] {
            if let Some(v) = v {
                // `,"name":"value"`
                n += name.len() + v.len() + 6;
            }
        }
        if !self.attrs.is_empty() {
            // `,"attrs":{}` and `"k":"v",` each
            n += 11
                + self
                    .attrs
                    .iter()
                    .map(|(k, v)| k.len() + v.len() + 6)
                    .sum::<usize>();
        }
        n
    }
}

/// One line of input, checked by [`Event::check_line`]: the line itself when it can go on as it
/// is, else the event parsed out of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckedLine<'a> {
    /// A valid event, still in its line.
    Line(EventLine<'a>),
    /// A valid event the line could not carry on as it is (its `ts` in text, or a form only the
    /// generic parse takes), with `src` defaulted.
    Event(Event),
}

impl CheckedLine<'_> {
    /// The user id.
    pub fn uid(&self) -> &str {
        match self {
            CheckedLine::Line(l) => &l.uid,
            CheckedLine::Event(e) => &e.uid,
        }
    }

    /// The source (defaulted).
    pub fn src(&self) -> Option<&str> {
        match self {
            CheckedLine::Line(l) => Some(&l.src),
            CheckedLine::Event(e) => e.src.as_deref(),
        }
    }

    /// The event as JSON for the bus: what [`Event::parse`] reads back as this event, given the
    /// time the line was checked as its arrival time or later.
    pub fn to_json(&self) -> Vec<u8> {
        match self {
            CheckedLine::Line(l) => l.to_json(),
            CheckedLine::Event(e) => e.to_json(),
        }
    }
}

/// A valid event checked where it stands in its JSON line, borrowing from it. Its JSON is the
/// line, with `ts` and `src` appended when the line has none (see [`EventLine::to_json`]):
/// the ingest endpoint sends on what it received instead of an event parsed out of it and
/// written again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventLine<'a> {
    /// The line without the whitespace around it: one JSON object, of known fields only.
    line: &'a str,
    uid: Cow<'a, str>,
    /// The line's source, or the default.
    src: Cow<'a, str>,
    /// The line's time, or the arrival time.
    ts: i64,
    /// Whether the line has no `ts` (or a null one): the JSON appends it.
    append_ts: bool,
    /// Whether the line has no `src` (or a null one): the JSON appends the default.
    append_src: bool,
}

impl EventLine<'_> {
    /// The event's time.
    pub fn ts(&self) -> i64 {
        self.ts
    }

    /// The line, with `,"ts":<arrival time>` and `,"src":<default>` before its closing brace when
    /// it has none. A line with a null `ts` or `src` then holds the key twice: the generic parse
    /// takes the last, as [`Event::parse`] took the arrival time and the default for the null.
    pub fn to_json(&self) -> Vec<u8> {
        let line = self.line.as_bytes();
        if !self.append_ts && !self.append_src {
            return line.to_vec();
        }
        let mut out = Vec::with_capacity(line.len() + appended_len(&self.src));
        // A valid line is one object: it ends with its closing brace.
        out.extend_from_slice(&line[..line.len() - 1]);
        if self.append_ts {
            use std::io::Write as _;
            write!(out, r#","ts":{}"#, self.ts).expect("a vector takes every write");
        }
        if self.append_src {
            out.extend_from_slice(br#","src":"#);
            serde_json::to_writer(&mut out, &*self.src).expect("a string serialises");
        }
        out.push(b'}');
        out
    }
}

/// At most how many bytes [`EventLine::to_json`] appends: `,"ts":` and an i64, `,"src":` and
/// the default, quoted, every byte escaped as `\u00XX` at worst.
fn appended_len(default_src: &str) -> usize {
    6 + 20 + 7 + 2 + 6 * default_src.len()
}

impl Event {
    /// Checks one line of input as [`Event::parse`] does, with `default_src` for an event that
    /// names no source, and keeps a valid event in its line when the line can go on as it is:
    /// its `ts` a number or none, and room within `max_event_bytes` for what its JSON appends.
    /// The errors are [`Event::parse`]'s.
    pub fn check_line<'a>(
        bytes: &'a [u8],
        now_ms: i64,
        default_src: &'a str,
        limits: &EventLimits,
    ) -> Result<CheckedLine<'a>, EventError> {
        let fits = bytes.len() + appended_len(default_src) <= limits.max_event_bytes;
        // A valid event the fast parse took but that cannot stay in its line (its `ts` in text):
        // made owned from that parse, not parsed again.
        let mut parsed = None;
        if let (true, Ok(text)) = (fits, std::str::from_utf8(bytes)) {
            if let Ok(fast) = serde_json::from_str::<FastEvent<'a>>(text) {
                match fast.check(now_ms, limits) {
                    Some(ts) if !matches!(fast.ts, Some(FastTs::Text(_))) => {
                        return Ok(CheckedLine::Line(EventLine {
                            line: text.trim_matches([' ', '\t', '\n', '\r']),
                            append_ts: fast.ts.is_none(),
                            append_src: fast.src.is_none(),
                            src: fast.src.map_or(Cow::Borrowed(default_src), |t| t.0),
                            uid: fast.uid,
                            ts,
                        }));
                    }
                    Some(ts) => parsed = Some(fast.checked(ts)),
                    None => {}
                }
            }
        }
        let mut ev = match parsed {
            Some(ev) => ev.into_owned(),
            None => Event::parse(bytes, now_ms, limits)?,
        };
        if ev.src.is_none() {
            ev.src = Some(default_src.into());
        }
        Ok(CheckedLine::Event(ev))
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FastEvent<'a> {
    #[serde(borrow)]
    uid: Cow<'a, str>,
    #[serde(default)]
    ts: Option<FastTs<'a>>,
    #[serde(rename = "type", default, borrow)]
    kind: Option<Text<'a>>,
    #[serde(default, borrow)]
    url: Option<Text<'a>>,
    #[serde(rename = "ref", default, borrow)]
    referrer: Option<Text<'a>>,
    #[serde(default, borrow)]
    q: Option<Text<'a>>,
    #[serde(default, borrow)]
    ip: Option<Text<'a>>,
    #[serde(default, borrow)]
    ua: Option<Text<'a>>,
    #[serde(default, borrow)]
    src: Option<Text<'a>>,
    #[serde(default, borrow)]
    attrs: Option<BTreeMap<Text<'a>, Text<'a>>>,
}

/// A string of [`FastEvent`], borrowed from the input unless it holds escapes. serde borrows a
/// `Cow<str>` field marked `borrow` only when the field's type is exactly that: an
/// `Option<Cow<str>>` (or a map of them) is always copied, so the optional fields wrap it.
#[derive(serde::Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(transparent)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum FastTs<'a> {
    Ms(i64),
    #[serde(borrow)]
    Text(Cow<'a, str>),
}

impl<'a> FastEvent<'a> {
    /// The event's time when the event is valid, `None` to let the generic path decide (it
    /// names the problem).
    fn check(&self, now_ms: i64, limits: &EventLimits) -> Option<i64> {
        let ts = match &self.ts {
            None => now_ms,
            Some(FastTs::Ms(ms)) if *ms >= 0 => *ms,
            Some(FastTs::Text(t)) => match t.parse::<i64>() {
                Ok(ms) if ms >= 0 => ms,
                Ok(_) => return None,
                Err(_) => match chrono::DateTime::parse_from_rfc3339(t) {
                    Ok(d) => d.timestamp_millis(),
                    Err(_) => return None,
                },
            },
            Some(FastTs::Ms(_)) => return None,
        };
        let uid_ok = !self.uid.is_empty()
            && self.uid.len() <= limits.max_uid_bytes
            && !self.uid.chars().any(char::is_control);
        let fields_ok = [
            &self.kind,
            &self.url,
            &self.referrer,
            &self.q,
            &self.ip,
            &self.ua,
            &self.src,
        ]
        .iter()
        .all(|f| {
            f.as_ref()
                .is_none_or(|s| s.0.len() <= limits.max_field_bytes)
        });
        let attrs_ok = self.attrs.as_ref().is_none_or(|a| {
            a.len() <= limits.max_attrs
                && a.iter().all(|(k, v)| {
                    !k.0.is_empty()
                        && k.0.len() <= limits.max_attr_key_bytes
                        && v.0.len() <= limits.max_attr_value_bytes
                })
        });
        (uid_ok && fields_ok && attrs_ok && ts - now_ms <= limits.max_future_ms).then_some(ts)
    }

    /// The validated event, `None` to let the generic path decide (it names the problem).
    fn into_ref(self, now_ms: i64, limits: &EventLimits) -> Option<EventRef<'a>> {
        let ts = self.check(now_ms, limits)?;
        Some(self.checked(ts))
    }

    /// The event, once [`FastEvent::check`] has passed it with time `ts`.
    fn checked(self, ts: i64) -> EventRef<'a> {
        let text = |f: Option<Text<'a>>| f.map(|s| s.0);
        EventRef {
            uid: self.uid,
            ts,
            kind: text(self.kind),
            url: text(self.url),
            referrer: text(self.referrer),
            q: text(self.q),
            ip: text(self.ip),
            ua: text(self.ua),
            src: text(self.src),
            attrs: self
                .attrs
                .map(|a| a.into_iter().map(|(k, v)| (k.0, v.0)).collect())
                .unwrap_or_default(),
        }
    }
}

fn parse_ts(v: &serde_json::Value) -> Result<i64, EventError> {
    let bad = || EventError::BadTs {
        value: shorten(&v.to_string()),
    };
    match v {
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                if i >= 0 {
                    return Ok(i);
                }
            }
            Err(bad())
        }
        serde_json::Value::String(s) => {
            if let Ok(i) = s.parse::<i64>() {
                if i >= 0 {
                    return Ok(i);
                }
                return Err(bad());
            }
            chrono::DateTime::parse_from_rfc3339(s)
                .map(|d| d.timestamp_millis())
                .map_err(|_| bad())
        }
        _ => Err(bad()),
    }
}

fn shorten(s: &str) -> String {
    if s.len() <= 64 {
        return s.to_string();
    }
    let mut end = 64;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_795_341_600_000;

    fn parse(s: &str) -> Result<Event, EventError> {
        Event::parse(s.as_bytes(), NOW, &EventLimits::default())
    }

    #[test]
    fn given_full_event_when_parsed_then_every_field_is_kept() {
        let e = parse(
            r#"{"uid":"u1","ts":"2026-11-22T10:00:00Z","type":"search","url":"https://a.example/x",
                "ref":"https://r.example/","q":"ипотека","ip":"203.0.113.7","ua":"Mozilla/5.0",
                "src":"pixel","attrs":{"gender":"f","age":31,"vip":true}}"#,
        )
        .unwrap();
        assert_eq!(e.uid, "u1");
        assert_eq!(e.ts, 1_795_341_600_000);
        assert_eq!(e.kind.as_deref(), Some("search"));
        assert_eq!(e.q.as_deref(), Some("ипотека"));
        assert_eq!(e.referrer.as_deref(), Some("https://r.example/"));
        assert_eq!(e.attrs["age"], "31");
        assert_eq!(e.attrs["vip"], "true");
        let round = Event::parse(&e.to_json(), NOW, &EventLimits::default()).unwrap();
        assert_eq!(round, e);
    }

    #[test]
    fn given_events_without_escapes_when_serialised_then_the_buffer_never_grows() {
        let inputs = [
            r#"{"uid":"u1","ts":"2026-11-22T10:00:00Z","type":"search","url":"https://a.example/x",
                "ref":"https://r.example/","q":"ипотека","ip":"203.0.113.7","ua":"Mozilla/5.0",
                "src":"pixel","attrs":{"gender":"f","age":31,"vip":true}}"#,
            r#"{"uid":"0123456789abcdef","ts":1}"#,
            r#"{"uid":"u","ts":1795341600000,"attrs":{"k":""}}"#,
        ];
        for i in inputs {
            let e = parse(i).unwrap();
            let json = e.to_json();
            assert!(
                json.len() <= e.json_len_estimate(),
                "{} > {}: {}",
                json.len(),
                e.json_len_estimate(),
                String::from_utf8_lossy(&json)
            );
            assert_eq!(json.capacity(), e.json_len_estimate(), "grown: {i}");
        }
    }

    #[test]
    fn given_valid_events_when_parsed_then_fast_path_equals_generic_path() {
        let inputs = [
            r#"{"uid":"u1","ts":"2026-11-22T10:00:00Z","type":"search","q":"ипотека \"x\"","attrs":{"a":"b"}}"#,
            r#"{"uid":"u2","ts":12345,"url":"https://a/","ref":null,"ip":"1.2.3.4","ua":"UA","src":"s"}"#,
            r#"{"uid":"u3","ts":"777"}"#,
            r#"{"uid":"u4"}"#,
        ];
        for i in inputs {
            let fast = parse(i).unwrap();
            let generic = Event::from_json(
                serde_json::from_str(i).unwrap(),
                NOW,
                &EventLimits::default(),
            )
            .unwrap();
            assert_eq!(fast, generic, "{i}");
        }
    }

    #[test]
    fn given_strings_without_escapes_when_parsed_fast_then_borrowed_from_the_input() {
        let line = r#"{"uid":"u","url":"https://a.example/","q":"a\"b","attrs":{"k":"v"}}"#;
        let f: FastEvent<'_> = serde_json::from_str(line).unwrap();
        assert!(matches!(f.uid, Cow::Borrowed(_)));
        assert!(matches!(f.url.unwrap().0, Cow::Borrowed(_)));
        assert!(
            matches!(f.q.unwrap().0, Cow::Owned(_)),
            "an escape is undone in a copy"
        );
        let (k, v) = f.attrs.unwrap().into_iter().next().unwrap();
        assert!(matches!((k.0, v.0), (Cow::Borrowed(_), Cow::Borrowed(_))));
    }

    fn check(s: &str) -> Result<CheckedLine<'_>, EventError> {
        Event::check_line(s.as_bytes(), NOW, "http", &EventLimits::default())
    }

    #[test]
    fn given_a_complete_line_when_checked_then_its_json_is_the_line() {
        let line = r#"{"uid":"0a1b","ts":1795341599500,"type":"search","url":"https://a.example/x","q":"ипотека \"x\"","ip":"203.0.113.7","ua":"Mozilla/5.0","src":"partner"}"#;
        let padded = format!(" {line}\r");
        let CheckedLine::Line(l) = check(&padded).unwrap() else {
            panic!("a complete line stays a line");
        };
        assert_eq!(l.to_json(), line.as_bytes(), "trimmed, not rewritten");
        assert_eq!(l.ts(), 1_795_341_599_500);
        let c = CheckedLine::Line(l);
        assert_eq!((c.uid(), c.src()), ("0a1b", Some("partner")));
    }

    #[test]
    fn given_lines_without_ts_or_src_when_checked_then_their_json_appends_them() {
        let c = check(r#"{"uid":"u" }"#).unwrap();
        assert!(matches!(c, CheckedLine::Line(_)));
        assert_eq!(c.src(), Some("http"));
        assert_eq!(
            String::from_utf8(c.to_json()).unwrap(),
            format!(r#"{{"uid":"u" ,"ts":{NOW},"src":"http"}}"#)
        );
        // A null is not an absent key: the key then appears twice and the last one is read.
        let c = check(r#"{"uid":"u","ts":null,"src":null}"#).unwrap();
        let back = parse(std::str::from_utf8(&c.to_json()).unwrap()).unwrap();
        assert_eq!((back.ts, back.src.as_deref()), (NOW, Some("http")));
    }

    #[test]
    fn given_lines_only_the_generic_parse_takes_when_checked_then_events() {
        for line in [
            r#"{"uid":"u","ts":"2026-11-22T10:00:00Z"}"#,
            r#"{"uid":"u","ts":1,"attrs":{"age":31}}"#,
        ] {
            let c = check(line).unwrap();
            assert!(matches!(c, CheckedLine::Event(_)), "{line}");
            assert_eq!(c.src(), Some("http"), "{line}");
        }
        // Within the limit, but without room for what its JSON would append.
        let attrs: Vec<String> = (0..15)
            .map(|i| format!(r#""k{i:02}":"{}""#, "v".repeat(4096)))
            .collect();
        let mut near_limit = format!(r#"{{"uid":"u","attrs":{{{}}}"#, attrs.join(","));
        near_limit.push_str(&" ".repeat(65_530 - near_limit.len() - 1));
        near_limit.push('}');
        assert!(matches!(check(&near_limit).unwrap(), CheckedLine::Event(_)));
        assert_eq!(
            check(r#"{"uid":"u","colour":"red"}"#).unwrap_err(),
            parse(r#"{"uid":"u","colour":"red"}"#).unwrap_err()
        );
    }

    use proptest::prelude::*;

    proptest::proptest! {
        /// Whatever a line holds, the checked line's JSON is read back as the event
        /// `Event::parse` makes of the line (with the default source), at a later arrival time.
        #[test]
        fn given_any_line_when_checked_then_its_json_parses_as_the_line_does(
            uid in "[a-z0-9\"\\\\é\u{1F600}]{1,12}",
            ts in proptest::prop_oneof![
                proptest::strategy::Just(None),
                proptest::strategy::Just(Some("null".to_string())),
                (0i64..NOW + DAY_MS).prop_map(|t| Some(t.to_string())),
                proptest::strategy::Just(Some(r#""2026-11-22T10:00:00Z""#.to_string())),
            ],
            fields in proptest::collection::vec(
                (proptest::sample::select(&["type", "url", "ref", "q", "ip", "ua", "src"][..]),
                 proptest::option::of("[ a-zA-Z/:?=&\"\\\\\u{0430}-\u{044F}\n\t]{0,16}")),
                0..6,
            ),
            attrs in proptest::option::of(proptest::collection::btree_map(
                "[a-z]{1,4}", "[a-z\"]{0,4}", 0..3,
            )),
            space in proptest::sample::select(&["", " ", "\t", "\r", " \r"][..]),
        ) {
            let mut parts = vec![format!("\"uid\":{}", serde_json::to_string(&uid).unwrap())];
            if let Some(ts) = ts {
                parts.push(format!("\"ts\":{ts}"));
            }
            for (name, value) in fields {
                let v = value.map_or("null".into(), |v| serde_json::to_string(&v).unwrap());
                parts.push(format!("\"{name}\":{v}"));
            }
            if let Some(a) = attrs {
                parts.push(format!("\"attrs\":{}", serde_json::to_string(&a).unwrap()));
            }
            let line = format!("{space}{{{}}}{space}", parts.join(","));
            let want = parse(&line).map(|mut e| {
                e.src.get_or_insert_with(|| "http".into());
                e
            });
            match (check(&line), want) {
                (Ok(c), Ok(want)) => {
                    let back = Event::parse(&c.to_json(), NOW + 5, &EventLimits::default());
                    prop_assert_eq!(back, Ok(want.clone()), "{}", line);
                    prop_assert_eq!(c.uid(), want.uid.as_str());
                    prop_assert_eq!(c.src(), want.src.as_deref());
                }
                (Err(e), Err(want)) => prop_assert_eq!(e, want),
                (got, want) => prop_assert!(false, "{line}: {got:?} against {want:?}"),
            }
        }
    }

    #[test]
    fn given_no_ts_when_parsed_then_arrival_time_is_used() {
        assert_eq!(parse(r#"{"uid":"u"}"#).unwrap().ts, NOW);
        assert_eq!(parse(r#"{"uid":"u","ts":12345}"#).unwrap().ts, 12345);
        assert_eq!(parse(r#"{"uid":"u","ts":"12345"}"#).unwrap().ts, 12345);
    }

    #[test]
    fn given_bad_events_when_parsed_then_error_names_the_field() {
        let cases = [
            (r#"{"ts":1}"#, "missing field `uid`"),
            (r#"{"uid":""}"#, "missing field `uid`"),
            (r#"{"uid":7}"#, "field `uid` must be a string"),
            (r#"{"uid":"a\u0000b"}"#, "without control characters"),
            (r#"{"uid":"u","ts":"yesterday"}"#, "field `ts` is not epoch"),
            (r#"{"uid":"u","ts":-5}"#, "field `ts` is not epoch"),
            (r#"{"uid":"u","ts":1.5}"#, "field `ts` is not epoch"),
            (r#"{"uid":"u","url":5}"#, "field `url` must be a string"),
            (
                r#"{"uid":"u","attrs":[1]}"#,
                "field `attrs` must be an object",
            ),
            (
                r#"{"uid":"u","attrs":{"a":{"b":1}}}"#,
                "field `attrs` must be",
            ),
            (r#"{"uid":"u","colour":"red"}"#, "unknown field `colour`"),
            (r#"[1,2]"#, "malformed JSON"),
            (r#"{"uid":"u""#, "malformed JSON"),
        ];
        for (input, want) in cases {
            let err = parse(input).unwrap_err().to_string();
            assert!(err.contains(want), "{input}: got {err:?}, want {want:?}");
        }
    }

    #[test]
    fn given_uid_over_256_bytes_when_parsed_then_rejected_as_too_long() {
        let ok = format!(r#"{{"uid":"{}"}}"#, "x".repeat(256));
        assert!(parse(&ok).is_ok());
        let long = format!(r#"{{"uid":"{}"}}"#, "x".repeat(257));
        assert_eq!(
            parse(&long).unwrap_err(),
            EventError::UidTooLong {
                len: 257,
                limit: 256
            }
        );
    }

    #[test]
    fn given_ts_more_than_a_day_ahead_when_parsed_then_rejected() {
        let ok = format!(r#"{{"uid":"u","ts":{}}}"#, NOW + DAY_MS);
        assert!(parse(&ok).is_ok());
        let bad = format!(r#"{{"uid":"u","ts":{}}}"#, NOW + DAY_MS + 1);
        assert_eq!(parse(&bad).unwrap_err().reason(), "ts_in_future");
    }

    #[test]
    fn given_invalid_utf8_when_parsed_then_offset_is_named() {
        let bytes = b"{\"uid\":\"a\xff\"}";
        assert_eq!(
            Event::parse(bytes, NOW, &EventLimits::default()).unwrap_err(),
            EventError::NotUtf8 { offset: 9 }
        );
    }

    #[test]
    fn given_oversized_attrs_when_parsed_then_rejected_with_the_limit() {
        let many: Vec<String> = (0..65).map(|i| format!(r#""k{i}":"v""#)).collect();
        let e = parse(&format!(r#"{{"uid":"u","attrs":{{{}}}}}"#, many.join(","))).unwrap_err();
        assert_eq!(
            e,
            EventError::TooManyAttrs {
                count: 65,
                limit: 64
            }
        );
        let big = format!(r#"{{"uid":"u","attrs":{{"k":"{}"}}}}"#, "v".repeat(4097));
        assert!(parse(&big).unwrap_err().to_string().contains("attrs.k"));
        let huge = format!(r#"{{"uid":"u","q":"{}"}}"#, "v".repeat(70_000));
        assert_eq!(parse(&huge).unwrap_err().reason(), "too_large");
    }
}
