//! The credit scorer's lookup against `dmp run`: a user's segments are visible within a second of
//! the post (waiting for fresh data), with explanations; unknown users are 404 and bad
//! parameters 400.

mod common;

use std::time::{Duration, Instant};

use common::{post_events, sigterm, start, start_with_rules};

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
    let (mut child, url) = start_with_rules(dir.path(), RULES);
    let http = reqwest::Client::new();
    let ts = dmp_core::clock::now_ms() - 1000;
    let events = serde_json::json!([
        {"uid": "anna", "ts": ts - 2000, "type": "search", "q": "Mortgage rates"},
        {"uid": "anna", "ts": ts - 1000, "type": "search", "q": "best mortgage"},
        {"uid": "anna", "ts": ts, "url": "https://cats.example/kittens"},
    ]);
    let posted = Instant::now();
    post_events(&url, &events).await;
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
    let v: serde_json::Value =
        common::get_json(&http, format!("{url}/v1/users/anna/segments?explain=1")).await;
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
    let v: serde_json::Value = common::get_json(
        &http,
        format!(
            "{url}/v1/users/anna/segments?min_event_ts={}&wait_ms=300",
            ts + 60_000
        ),
    )
    .await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_user_deleted_when_late_events_arrive_then_row_stays_gone_and_partners_told() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, url) = start_with_rules(dir.path(), RULES);
    let http = reqwest::Client::new();
    let ts = dmp_core::clock::now_ms() - 1000;
    post_events(
        &url,
        &serde_json::json!([{"uid": "anna", "ts": ts, "url": "https://cats.example/"}]),
    )
    .await;
    let v: serde_json::Value = common::get_json(
        &http,
        format!("{url}/v1/users/anna/segments?min_event_ts={ts}&wait_ms=5000"),
    )
    .await;
    assert_eq!(v["segments"][0]["id"], "cats", "{v}");

    let r = http
        .delete(format!("{url}/v1/users/anna"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["deleted"], true);
    assert_eq!(v["removed"], serde_json::json!(["cats"]));
    let gone = |http: reqwest::Client, url: String| async move {
        http.get(format!("{url}/v1/users/anna/segments"))
            .send()
            .await
            .unwrap()
            .status()
    };
    assert_eq!(gone(http.clone(), url.clone()).await, 404);

    // Partners are told: the user's last segment record is an empty set.
    let mut r = http
        .get(format!("{url}/v1/stream/segments?group=deletion"))
        .send()
        .await
        .unwrap();
    let mut text = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while text.matches("\"anna\"").count() < 2 && std::time::Instant::now() < deadline {
        if let Ok(Ok(Some(c))) = tokio::time::timeout(Duration::from_millis(500), r.chunk()).await {
            text.push_str(&String::from_utf8_lossy(&c));
        }
    }
    drop(r);
    let last = text
        .lines()
        .rfind(|l| l.contains("\"anna\""))
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .expect("segment records for anna");
    assert_eq!(last["record"]["segments"], serde_json::json!([]), "{last}");
    assert_eq!(last["record"]["removed"], serde_json::json!(["cats"]));
    assert_eq!(last["record"]["rules_version"], "deleted");

    // A late event is dropped by the storage writer: the user stays gone.
    post_events(
        &url,
        &serde_json::json!([{"uid": "anna", "ts": ts + 500, "url": "https://cats.example/again"}]),
    )
    .await;
    let started = std::time::Instant::now();
    loop {
        let m = common::get_text(&http, format!("{url}/metrics")).await;
        if m.lines()
            .any(|l| l.starts_with("dmp_storage_writer_events_total{outcome=\"suppressed\"} 1"))
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no suppressed event counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(gone(http.clone(), url.clone()).await, 404);
    // Deleting someone unknown still suppresses them (a request may come before their events).
    let v: serde_json::Value = http
        .delete(format!("{url}/v1/users/nobody"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["deleted"], false);
    assert!(v["suppressed_until"].as_i64().unwrap() > ts);
    assert!(sigterm(&mut child).success());
}
