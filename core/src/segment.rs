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
        .and_then(|c| serde_json::from_slice(&c.value).ok())
        .unwrap_or_default()
}
