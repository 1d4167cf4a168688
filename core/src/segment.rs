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
