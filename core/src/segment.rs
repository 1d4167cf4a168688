//! The segment record published on `dmp.segments` whenever a user's set of segments changes.

use serde::{Deserialize, Serialize};

/// One user's current segments, with what changed since the previous record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentUpdate {
    /// The user.
    pub uid: String,
    /// The whole current set of segment ids, sorted.
    pub segments: Vec<String>,
    /// Segments the user entered with this evaluation.
    pub added: Vec<String>,
    /// Segments the user left with this evaluation.
    pub removed: Vec<String>,
    /// When the evaluation ran (epoch ms). Makes replays idempotent: a consumer keeps the newest.
    pub evaluated_at: i64,
    /// Time of the newest event the evaluation saw (epoch ms).
    pub last_event_ts: i64,
    /// Version of the rule set that produced it.
    pub rules_version: String,
}

impl SegmentUpdate {
    /// The JSON bytes published on the topic.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a SegmentUpdate always serialises")
    }

    /// Parses a record from the topic.
    pub fn from_json(bytes: &[u8]) -> Result<SegmentUpdate, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_update_when_round_tripped_through_json_then_equal() {
        let u = SegmentUpdate {
            uid: "u1".into(),
            segments: vec!["cats".into(), "mortgage".into()],
            added: vec!["mortgage".into()],
            removed: vec![],
            evaluated_at: 10,
            last_event_ts: 9,
            rules_version: "v3".into(),
        };
        let json = String::from_utf8(u.to_json()).unwrap();
        assert!(json.contains(r#""segments":["cats","mortgage"]"#));
        assert_eq!(SegmentUpdate::from_json(json.as_bytes()).unwrap(), u);
    }
}

/// The record the storage writer emits on `dmp.user-changes` (key = uid) after a user's cells are
/// durable. The message timestamp is the write time too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserChange {
    /// The user.
    pub uid: String,
    /// When the cells were written (epoch ms).
    pub ts: i64,
    /// Time of the newest event written for the user in that batch (epoch ms).
    pub last_event_ts: i64,
}

impl UserChange {
    /// The JSON bytes published on the topic.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a UserChange always serialises")
    }

    /// Parses a record from the topic.
    pub fn from_json(bytes: &[u8]) -> Result<UserChange, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// A record on `dmp.dead-letter`: what was rejected, where it came from, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Stable reason code (for example `missing_uid`).
    pub reason: String,
    /// The full error message.
    pub error: String,
    /// The role that rejected it (for example `storage-writer`).
    pub stage: String,
    /// Topic the record was read from.
    pub topic: String,
    /// Partition it was read from.
    pub partition: u32,
    /// Offset it was read from.
    pub offset: u64,
    /// Its message timestamp (epoch ms).
    pub timestamp: i64,
    /// The payload, as UTF-8 (invalid bytes replaced) and cut to 64 KiB.
    pub payload: String,
}

impl DeadLetter {
    /// Longest payload a dead letter keeps (bytes of UTF-8).
    pub const MAX_PAYLOAD: usize = 65_536;

    /// A rejected record's payload as a dead letter keeps it: UTF-8 (invalid bytes replaced), cut
    /// to [`DeadLetter::MAX_PAYLOAD`] bytes at a character boundary.
    pub fn payload_of(bytes: &[u8]) -> String {
        let mut payload = String::from_utf8_lossy(bytes).into_owned();
        if payload.len() > Self::MAX_PAYLOAD {
            let mut end = Self::MAX_PAYLOAD;
            while !payload.is_char_boundary(end) {
                end -= 1;
            }
            payload.truncate(end);
        }
        payload
    }

    /// The JSON bytes published on the topic.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a DeadLetter always serialises")
    }
}

/// The memberships kept in family `s`: segment id -> since (ms).
pub type Memberships = std::collections::BTreeMap<String, i64>;

/// The qualifier (family `s`) of [`Evaluated`].
pub const EVALUATED: &str = "evaluated";

/// The last evaluation of a user, written at every evaluation (`s:evaluated`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Evaluated {
    /// When (ms).
    pub at: i64,
    /// The newest event the evaluation saw (ms; 0: none).
    pub last_event_ts: i64,
    /// The rule set's version.
    pub rules_version: String,
}

/// Reads `s:evaluated` from a row.
pub fn evaluated(row: &crate::Row) -> Option<Evaluated> {
    row.latest(crate::cell::FAMILY_SEGMENTS, EVALUATED)
        .and_then(|c| serde_json::from_slice(&c.value).ok())
}

/// Reads `s:<qualifier>` (a JSON object of segment -> since) from a row.
pub fn memberships(row: Option<&crate::Row>, qualifier: &str) -> Memberships {
    row.and_then(|r| r.latest(crate::cell::FAMILY_SEGMENTS, qualifier))
        .map_or_else(Memberships::new, |c| parse_memberships(&c.value))
}

/// A stored `s:<qualifier>` value's memberships; none when it cannot be read.
fn parse_memberships(value: &[u8]) -> Memberships {
    serde_json::from_slice(value).unwrap_or_default()
}

/// Whether `s:<qualifier>` of `row` (in HBase order, as read from the store) holds exactly the
/// segments `ids` (ascending, as a [`Memberships`]' keys), read without building the map: what
/// an evaluation asks of every user's stored memberships, nearly always to hear yes. Answers as
/// [`memberships`] would (an absent or unreadable cell is no segments): the compact JSON dmp
/// writes is checked in place, anything else is parsed.
pub fn same_segments<'a>(
    row: &crate::Row,
    qualifier: &str,
    ids: impl Iterator<Item = &'a str> + Clone,
) -> bool {
    let Some(cell) = row.latest_in_order(crate::cell::FAMILY_SEGMENTS, qualifier) else {
        return ids.clone().next().is_none();
    };
    match compact_keys_equal(&cell.value, ids.clone()) {
        Some(same) => same,
        None => parse_memberships(&cell.value)
            .keys()
            .map(String::as_str)
            .eq(ids),
    }
}

/// Whether `value` is the compact JSON object `{"id":since,...}` (no spaces, no escapes in the
/// ids, ids ascending, integer sinces: what serialising a [`Memberships`] writes) whose ids are
/// `ids` in order: `Some(answer)` when it is such an object, `None` when it is not of that form.
fn compact_keys_equal<'a>(value: &[u8], mut ids: impl Iterator<Item = &'a str>) -> Option<bool> {
    let mut rest = value.strip_prefix(b"{")?;
    if let Some(after) = rest.strip_prefix(b"}") {
        return after.is_empty().then(|| ids.next().is_none());
    }
    let mut same = true;
    let mut previous: Option<&[u8]> = None;
    loop {
        rest = rest.strip_prefix(b"\"")?;
        let end = rest.iter().position(|&b| b == b'"' || b == b'\\')?;
        if rest[end] != b'"' {
            return None;
        }
        let key = &rest[..end];
        // Ascending, so no id twice (a parse keeps the last of a repeated id); text a parse takes
        // (UTF-8, no control characters), so that it would not fail where this answers.
        if previous.is_some_and(|p| p >= key)
            || key.iter().any(|&b| b < 0x20)
            || std::str::from_utf8(key).is_err()
        {
            return None;
        }
        previous = Some(key);
        same &= ids.next().is_some_and(|id| id.as_bytes() == key);
        rest = rest[end + 1..].strip_prefix(b":")?;
        let digits = rest.strip_prefix(b"-").unwrap_or(rest);
        let n = digits.iter().take_while(|b| b.is_ascii_digit()).count();
        // Up to 18 digits: always an i64, which the parse would read too.
        if n == 0 || n > 18 || (n > 1 && digits[0] == b'0') {
            return None;
        }
        rest = &digits[n..];
        match rest.split_first() {
            Some((b',', r)) => rest = r,
            Some((b'}', [])) => return Some(same && ids.next().is_none()),
            _ => return None,
        }
    }
}

#[cfg(test)]
mod same_segments_tests {
    use super::*;
    use crate::{Cell, Row};
    use proptest::prelude::*;

    fn row_with(value: Option<Vec<u8>>) -> Row {
        Row {
            key: "u".into(),
            cells: value
                .map(|v| vec![Cell::new(crate::cell::FAMILY_SEGMENTS, "current", 1, v)])
                .unwrap_or_default(),
        }
    }

    /// What the evaluation compared before: the parsed map's keys.
    fn parsed(row: &Row, ids: &[String]) -> bool {
        memberships(Some(row), "current").keys().eq(ids.iter())
    }

    #[test]
    fn given_stored_memberships_when_compared_then_only_the_same_ids_are_the_same() {
        let stored = br#"{"cats":1795000000000,"news":-5}"#.to_vec();
        let row = row_with(Some(stored));
        for (ids, same) in [
            (vec!["cats", "news"], true),
            (vec!["cats"], false),
            (vec!["cats", "news", "zoo"], false),
            (vec!["cats", "newt"], false),
            (vec![], false),
        ] {
            assert_eq!(
                same_segments(&row, "current", ids.iter().copied()),
                same,
                "{ids:?}"
            );
        }
        assert!(same_segments(
            &row_with(None),
            "current",
            std::iter::empty()
        ));
        assert!(!same_segments(
            &row_with(None),
            "current",
            ["cats"].into_iter()
        ));
        assert!(same_segments(
            &row_with(Some(b"{}".to_vec())),
            "current",
            std::iter::empty()
        ));
        // Not the compact form: parsed, with the parse's answer.
        let spaced = row_with(Some(br#"{ "cats" : 1 }"#.to_vec()));
        assert!(same_segments(&spaced, "current", ["cats"].into_iter()));
        let escaped = row_with(Some(br#"{"c\u0061ts":1}"#.to_vec()));
        assert!(same_segments(&escaped, "current", ["cats"].into_iter()));
        // What a parse reads otherwise than in order: a repeated id (the last one kept), ids out
        // of order; and keys a parse refuses (not UTF-8, a raw control character).
        for (value, ids, same) in [
            (&br#"{"a":1,"a":2}"#[..], &["a"][..], true),
            (br#"{"b":1,"a":2}"#, &["a", "b"], true),
            (b"{\"\xff\":1}", &[], true),
            (b"{\"\n\":1}", &[], true),
            (b"{\"a\n\":1}", &["a\n"], false),
        ] {
            let row = row_with(Some(value.to_vec()));
            assert_eq!(
                same_segments(&row, "current", ids.iter().copied()),
                same,
                "{value:?}"
            );
        }
        // Unreadable: no segments, as `memberships` has it.
        for bad in [
            &b"{\"cats\":1"[..],
            b"{\"cats\":1x}",
            b"{\"cats\":01}",
            b"[]",
            b"",
        ] {
            let row = row_with(Some(bad.to_vec()));
            assert!(
                same_segments(&row, "current", std::iter::empty()),
                "{bad:?}"
            );
            assert!(
                !same_segments(&row, "current", ["cats"].into_iter()),
                "{bad:?}"
            );
        }
    }

    proptest! {
        #[test]
        fn given_any_stored_memberships_when_compared_then_the_parse_agrees(
            stored in proptest::collection::btree_map("[a-z_\"\\\\é]{0,6}", any::<i64>(), 0..5),
            ids in proptest::collection::btree_set("[a-z_\"\\\\é]{0,6}", 0..5),
            take_stored in any::<bool>(),
        ) {
            let ids: Vec<String> = if take_stored { stored.keys().cloned().collect() } else { ids.into_iter().collect() };
            let row = row_with(Some(serde_json::to_vec(&stored).unwrap()));
            prop_assert_eq!(
                same_segments(&row, "current", ids.iter().map(String::as_str)),
                parsed(&row, &ids)
            );
        }

        #[test]
        fn given_any_bytes_when_compared_then_the_parse_agrees(
            value in proptest::collection::vec(
                prop_oneof![Just(b'{'), Just(b'}'), Just(b'"'), Just(b':'), Just(b','), Just(b'-'), Just(b'0'), Just(b'7'), Just(b'a'), Just(b' '), Just(b'\\'), Just(b'\n'), Just(0xff)],
                0..24),
            ids in proptest::collection::btree_set("[a7]{0,2}", 0..3),
        ) {
            let ids: Vec<String> = ids.into_iter().collect();
            let row = row_with(Some(value));
            prop_assert_eq!(
                same_segments(&row, "current", ids.iter().map(String::as_str)),
                parsed(&row, &ids)
            );
        }
    }
}
