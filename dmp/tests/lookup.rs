//! The credit scorer's lookup against `dmp run`: a user's segments are visible within a second of
//! the post (waiting for fresh data), with explanations; unknown users are 404 and bad
//! parameters 400.

mod common;

use std::time::{Duration, Instant};

use common::{sigterm, start};

const RULES: &str = r#"
version = "lookup-1"

[[segment]]
id = "cats"
when = '''any(url.host == "cats.example")'''

[[segment]]
id = "mortgage"
when = '''count(type == "search" and q contains "mortgage", 30d) >= 2'''
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_posted_events_when_looked_up_with_min_event_ts_then_segments_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, RULES).unwrap();
    let (mut child, url) = start(
        &dir.path().join("data"),
        &[("DMP__SEGMENTER__RULES", rules.to_str().unwrap())],
    );
    let http = reqwest::Client::new();
    let ts = dmp_core::clock::now_ms() - 1000;
    let events = serde_json::json!([
        {"uid": "anna", "ts": ts - 2000, "type": "search", "q": "Mortgage rates"},
        {"uid": "anna", "ts": ts - 1000, "type": "search", "q": "best mortgage"},
        {"uid": "anna", "ts": ts, "url": "https://cats.example/kittens"},
    ]);
    let posted = Instant::now();
    let r = http
        .post(format!("{url}/v1/events"))
        .json(&events)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let r = http
        .get(format!(
            "{url}/v1/users/anna/segments?min_event_ts={ts}&wait_ms=5000"
        ))
        .send()
        .await
        .unwrap();
    let seen = posted.elapsed();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["fresh"], true, "{v}");
    let ids: Vec<&str> = v["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["cats", "mortgage"], "{v}");
    assert_eq!(v["last_event_ts"], ts, "{v}");
    assert_eq!(v["rules_version"], "lookup-1");
    assert!(v["segments"][0]["since"].as_i64().unwrap() >= ts);
    assert!(
        seen < Duration::from_secs(1),
        "segments visible {seen:?} after the post"
    );
    eprintln!("post -> segments through the lookup API in {seen:?}");

    // Explanations: the events that made each segment match.
    let v: serde_json::Value = http
        .get(format!("{url}/v1/users/anna/segments?explain=1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mortgage = v["explain"]["mortgage"].as_array().unwrap();
    assert_eq!(mortgage.len(), 2, "{v}");
    assert_eq!(mortgage[0]["cells"]["q"], "best mortgage", "{v}");
    assert_eq!(
        v["explain"]["cats"][0]["cells"]["url"],
        "https://cats.example/kittens"
    );

    // A user nobody has seen, and bad parameters.
    let r = http
        .get(format!("{url}/v1/users/nobody/segments"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    for (q, word) in [
        ("wait_ms=999999", "wait_ms"),
        ("min_event_ts=yesterday", "min_event_ts"),
        ("explain=maybe", "explain"),
    ] {
        let r = http
            .get(format!("{url}/v1/users/anna/segments?{q}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{q}");
        assert!(r.text().await.unwrap().contains(word), "{q}");
    }
    // Waiting for data that never comes is bounded and says it is not fresh.
    let waited = Instant::now();
    let v: serde_json::Value = http
        .get(format!(
            "{url}/v1/users/anna/segments?min_event_ts={}&wait_ms=300",
            ts + 60_000
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["fresh"], false);
    assert!(waited.elapsed() >= Duration::from_millis(300));
    assert!(waited.elapsed() < Duration::from_secs(3));
    assert!(sigterm(&mut child).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_api_keys_when_calling_then_401_without_403_for_another_role() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, url) = start(
        &dir.path().join("data"),
        &[
            ("DMP__API__KEYS__LOOKUP", r#"["lookup-key-0123456789"]"#),
            ("DMP__API__KEYS__PLANNER", r#"["planner-key-0123456789"]"#),
            ("DMP__API__RATE_LIMIT_PER_SECOND", "2"),
            ("DMP__API__RATE_LIMIT_BURST", "5"),
        ],
    );
    let http = reqwest::Client::new();
    let lookup = |key: Option<&'static str>| {
        let mut r = http.get(format!("{url}/v1/users/nobody/segments"));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r.send()
    };
    assert_eq!(lookup(None).await.unwrap().status(), 401);
    assert_eq!(
        lookup(Some("not-a-key-at-all-000")).await.unwrap().status(),
        401
    );
    let wrong = lookup(Some("planner-key-0123456789")).await.unwrap();
    assert_eq!(wrong.status(), 403);
    assert!(wrong
        .text()
        .await
        .unwrap()
        .contains("planner key cannot call a lookup"));
    // The right key passes (and the user is unknown).
    assert_eq!(
        lookup(Some("lookup-key-0123456789"))
            .await
            .unwrap()
            .status(),
        404
    );
    let r = http
        .get(format!("{url}/v1/audience?expr=all"))
        .header("x-api-key", "planner-key-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Roles without keys stay open; so do health and the pixel.
    let r = http
        .post(format!("{url}/v1/events"))
        .json(&serde_json::json!([{"uid": "u", "url": "https://x.example/"}]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(
        http.get(format!("{url}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // A caller over its rate (2/s, burst 5) gets 429 with Retry-After; others are not affected.
    let mut limited = None;
    for _ in 0..10 {
        let r = lookup(Some("lookup-key-0123456789")).await.unwrap();
        if r.status() == 429 {
            limited = Some(r);
            break;
        }
        assert_eq!(r.status(), 404);
    }
    let limited = limited.expect("no 429 after 10 quick requests at 2/s");
    assert!(limited.headers().contains_key("retry-after"));
    let r = http
        .get(format!("{url}/v1/audience?expr=all"))
        .header("x-api-key", "planner-key-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(sigterm(&mut child).success());
    // A short key is a configuration error naming the key.
    let out = common::dmp()
        .args(["config", "check"])
        .env("DMP__API__KEYS__ADMIN", r#"["short"]"#)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("api.keys.admin"));
}
