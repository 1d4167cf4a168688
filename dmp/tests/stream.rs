//! Partners without Kafka: `GET /v1/stream/segments?group=NAME` streams segment records as NDJSON;
//! a reconnecting partner acknowledges what it processed and resumes after it, and what it did
//! not acknowledge comes again. A new partner reading `topic=current` gets every user's latest
//! record, and a deleted user's tombstone.

mod common;

use std::time::{Duration, Instant};

use common::{post_events, sigterm, start_with_rules};

const RULES: &str = r#"
version = "stream-1"

[[segment]]
id = "cats"
when = '''any(url.host == "cats.example")'''

[[segment]]
id = "dogs"
when = '''any(url.host == "dogs.example")'''
"#;

/// Reads NDJSON lines from a streaming response until `want` lines (or 20 s).
async fn lines(url: &str, want: usize) -> Vec<serde_json::Value> {
    let mut r = reqwest::Client::new().get(url).send().await.unwrap();
    assert_eq!(r.status(), 200, "{url}");
    assert_eq!(
        r.headers()["content-type"].to_str().unwrap(),
        "application/x-ndjson"
    );
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while out.len() < want && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(500), r.chunk()).await {
            Ok(Ok(Some(c))) => buf.extend_from_slice(&c),
            Ok(_) => break,
            Err(_) => continue,
        }
        while let Some(i) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            out.push(serde_json::from_slice(&line).unwrap());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_segment_records_when_partner_streams_then_ndjson_resumable_by_ack() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, url) = start_with_rules(dir.path(), RULES);
    let events: Vec<serde_json::Value> = (0..20)
        .map(|u| serde_json::json!({"uid": format!("u{u}"), "url": "https://cats.example/"}))
        .collect();
    post_events(&url, &events).await;

    let first = lines(&format!("{url}/v1/stream/segments?group=acme"), 20).await;
    assert_eq!(first.len(), 20, "{first:?}");
    let mut uids: Vec<&str> = first
        .iter()
        .map(|l| l["record"]["uid"].as_str().unwrap())
        .collect();
    uids.sort();
    uids.dedup();
    assert_eq!(uids.len(), 20);
    assert_eq!(first[0]["record"]["segments"][0], "cats");
    // Acknowledge everything of one partition: on reconnect, only the rest comes again.
    let p = first[0]["partition"].as_u64().unwrap();
    let done: Vec<&serde_json::Value> = first
        .iter()
        .filter(|l| l["partition"].as_u64() == Some(p))
        .collect();
    let next = done
        .iter()
        .map(|l| l["offset"].as_u64().unwrap())
        .max()
        .unwrap()
        + 1;
    // The previous connection may still be in the group when the partner reconnects: hold one
    // open while acknowledging, and close it a moment later. The acknowledgement waits for it
    // to leave, and holds.
    let hold = reqwest::Client::new()
        .get(format!("{url}/v1/stream/segments?group=acme"))
        .send()
        .await
        .unwrap();
    assert_eq!(hold.status(), 200);
    let closer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(hold);
    });
    let again = lines(
        &format!("{url}/v1/stream/segments?group=acme&ack={p}:{next}"),
        20 - done.len(),
    )
    .await;
    closer.await.unwrap();
    assert_eq!(again.len(), 20 - done.len(), "{again:?}");
    assert!(again.iter().all(|l| l["partition"].as_u64() != Some(p)));
    // Another partner has its own position.
    let other = lines(&format!("{url}/v1/stream/segments?group=globex"), 20).await;
    assert_eq!(other.len(), 20);
    // Bad requests name the parameter.
    let r = reqwest::Client::new()
        .get(format!("{url}/v1/stream/segments?group=a%20b"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = reqwest::Client::new()
        .get(format!("{url}/v1/stream/segments?group=acme&ack=1-2"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("ack"));
    let r = reqwest::Client::new()
        .get(format!("{url}/v1/stream/segments?group=acme&ack=999:1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("partition 999"));
    // A partner still connected does not hold up a graceful stop.
    let open = reqwest::Client::new()
        .get(format!("{url}/v1/stream/segments?group=idle"))
        .send()
        .await
        .unwrap();
    assert_eq!(open.status(), 200);
    assert!(sigterm(&mut child).success());
    drop(open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_changed_and_deleted_users_when_new_partner_reads_current_then_latest_state_of_each()
{
    let dir = tempfile::tempdir().unwrap();
    let (mut child, url) = start_with_rules(dir.path(), RULES);
    let cats: Vec<serde_json::Value> = (0..10)
        .map(|u| serde_json::json!({"uid": format!("u{u}"), "url": "https://cats.example/"}))
        .collect();
    post_events(&url, &cats).await;
    assert_eq!(
        lines(&format!("{url}/v1/stream/segments?group=watch"), 10)
            .await
            .len(),
        10
    );
    let dogs: Vec<serde_json::Value> = (0..5)
        .map(|u| serde_json::json!({"uid": format!("u{u}"), "url": "https://dogs.example/"}))
        .collect();
    post_events(&url, &dogs).await;
    // Both topics get the changes: 10 + 5 records on the change stream.
    let mut all = lines(&format!("{url}/v1/stream/segments?group=watch2"), 15).await;
    assert_eq!(all.len(), 15);
    all.retain(|l| l["record"]["segments"].as_array().unwrap().len() == 2);
    assert_eq!(all.len(), 5, "five users are now in cats and dogs");
    let r = reqwest::Client::new()
        .delete(format!("{url}/v1/users/u9"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // A partner arriving now reads the current-state topic from the start.
    let current = lines(
        &format!("{url}/v1/stream/segments?group=newcomer&topic=current"),
        16,
    )
    .await;
    assert_eq!(current.len(), 16, "{current:?}");
    let mut latest = std::collections::BTreeMap::new();
    for l in &current {
        latest.insert(l["key"].as_str().unwrap().to_string(), l["record"].clone());
    }
    assert_eq!(latest.len(), 10);
    for u in 0..9 {
        let segs = &latest[&format!("u{u}")]["segments"];
        let want = if u < 5 {
            serde_json::json!(["cats", "dogs"])
        } else {
            serde_json::json!(["cats"])
        };
        assert_eq!(segs, &want, "u{u}");
    }
    assert!(
        latest["u9"].is_null(),
        "a deleted user ends with a tombstone"
    );
    let r = reqwest::Client::new()
        .get(format!("{url}/v1/stream/segments?group=x&topic=all"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("topic"));
    assert!(sigterm(&mut child).success());
}
