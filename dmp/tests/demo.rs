//! `dmp run --demo`: a newcomer sees segments and audiences appear within seconds.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{dmp, sigterm};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_demo_flag_when_dmp_runs_then_segments_fill_within_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = common::Running(
        dmp()
            .args(["run", "--demo", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let url = first
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap()
        .trim_end_matches('/')
        .to_string();
    let second = lines.next().unwrap().unwrap();
    assert!(second.starts_with("demo:"), "{second}");
    let http = reqwest::Client::new();
    let started = Instant::now();
    let filled = loop {
        let v: serde_json::Value = common::get_json(&http, format!("{url}/v1/segments")).await;
        let with_users: Vec<String> = v["segments"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| {
                s["days"]
                    .as_object()
                    .unwrap()
                    .values()
                    .any(|n| n.as_u64() > Some(0))
            })
            .map(|s| s["id"].as_str().unwrap().to_string())
            .collect();
        // Every segment of the demo rules, and `all` (the built-in `known_crawler` may be empty).
        let demo = [
            "all",
            "cat_lovers",
            "mortgage_seekers",
            "car_service_seekers",
            "news_readers",
        ];
        if demo.iter().all(|id| with_users.iter().any(|w| w == id)) {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "segments with users after 20 s: {with_users:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("demo: all demo segments have users {filled:?} after start");
    let v: serde_json::Value = common::get_json(
        &http,
        format!("{url}/v1/audience?expr=cat_lovers%20and%20not%20news_readers"),
    )
    .await;
    assert!(v["estimate"].as_u64().unwrap() > 0, "{v}");
    assert!(sigterm(&mut child).success());
}
