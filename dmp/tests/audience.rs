//! A planner's questions against `dmp run`: events posted over HTTP, segmented, counted, and then
//! `GET /v1/audience`, `GET /v1/segments` and `dmp audience` answer; bad questions get a 400
//! naming the position or parameter.

mod common;

use std::time::{Duration, Instant};

use common::{dmp, post_events, sigterm, start};

const RULES: &str = r#"
version = "audience-1"

[[segment]]
id = "cats"
when = '''any(url.host == "cats.example")'''

[[segment]]
id = "dogs"
when = '''any(url.host == "dogs.example")'''
"#;

/// With theta sketches (the default): fewer users than a sketch holds, so every answer is an
/// exact count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_counted_segments_when_planner_asks_then_exact_counts() {
    planner_asks(
        &[],
        [
            ("cats", 300u64, "exact"),
            ("cats or dogs", 400, "exact"),
            ("cats and dogs", 100, "exact"),
            ("cats and not dogs", 200, "exact"),
            ("not (cats or dogs)", 400, "exact"),
            ("(cats and dogs) or not cats", 600, "exact"),
        ],
    )
    .await;
}

/// Without theta sketches (`stats.theta_lg_k = 0`): the HyperLogLog estimators.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_hll_only_counters_when_planner_asks_then_estimates_with_intervals() {
    planner_asks(
        &[("DMP__STATS__THETA_LG_K", "0")],
        [
            ("cats", 300u64, "union"),
            ("cats or dogs", 400, "union"),
            ("cats and dogs", 100, "joint-mle"),
            ("cats and not dogs", 200, "joint-mle"),
            ("not (cats or dogs)", 400, "joint-mle"),
            ("(cats and dogs) or not cats", 600, "inclusion-exclusion"),
        ],
    )
    .await;
}

async fn planner_asks(env: &[(&str, &str)], answers: [(&'static str, u64, &str); 6]) {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, RULES).unwrap();
    let mut vars = vec![("DMP__SEGMENTER__RULES", rules.to_str().unwrap())];
    vars.extend_from_slice(env);
    let (mut child, url) = start(&dir.path().join("data"), &vars);
    // 300 cat people, 200 dog people, 100 of them both, 400 neither: 800 users.
    let now = dmp_core::clock::now_ms();
    let mut events = Vec::new();
    for u in 0..800 {
        let uid = format!("user-{u}");
        if u < 300 {
            events.push(
                serde_json::json!({"uid": uid, "ts": now - 1000, "url": "https://cats.example/"}),
            );
        }
        if (200..400).contains(&u) {
            events.push(
                serde_json::json!({"uid": uid, "ts": now - 2000, "url": "https://dogs.example/"}),
            );
        }
        if u >= 400 {
            events.push(
                serde_json::json!({"uid": uid, "ts": now - 3000, "url": "https://news.example/"}),
            );
        }
    }
    let http = reqwest::Client::new();
    post_events(&url, &events).await;
    let audience = |expr: &'static str| {
        let http = http.clone();
        let url = url.clone();
        async move {
            let r = http
                .get(format!("{url}/v1/audience"))
                .query(&[("expr", expr)])
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap(),
            )
        }
    };
    // Wait until every user is counted in `all`.
    let started = Instant::now();
    loop {
        let (status, v) = audience("all").await;
        assert_eq!(status, 200, "{v}");
        if v["estimate"].as_u64() == Some(800) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "not all counted: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (expr, truth, method) in answers {
        let (status, v) = audience(expr).await;
        assert_eq!(status, 200, "{expr}: {v}");
        let (low, high) = (v["low"].as_u64().unwrap(), v["high"].as_u64().unwrap());
        assert!(
            low <= truth && truth <= high,
            "{expr}: truth {truth} outside {v}"
        );
        assert_eq!(v["method"], method, "{expr}");
        if method == "exact" {
            assert_eq!(v["estimate"].as_u64(), Some(truth), "{expr}: {v}");
        }
    }
    // Bad questions: position and reason.
    let (status, v) = audience("cats and (dogs").await;
    assert_eq!(status, 400);
    assert!(
        v["error"].as_str().unwrap().contains("at character 15"),
        "{v}"
    );
    let r = http
        .get(format!("{url}/v1/audience?expr=cats&from=2026-02-30"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("from"));
    // Daily sizes.
    let v: serde_json::Value = common::get_json(&http, format!("{url}/v1/segments")).await;
    let ids: Vec<&str> = v["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["all", "cats", "dogs"], "{v}");
    // The command line asks the same API.
    let out = dmp()
        .args(["audience", "cats and dogs", "--api", &url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("users (") && text.contains(answers[2].2),
        "{text}"
    );
    let out = dmp()
        .args(["audience", "cats +", "--api", &url])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at character 6"));
    assert!(sigterm(&mut child).success());
}
