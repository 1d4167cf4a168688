//! Summaries (docs/adr/007): after a user's first evaluation, its changes are evaluated from its
//! summary and the cells written since, and give what an evaluation of the whole row gives. Its
//! own test binary: it reads the process's metrics to see which path each evaluation took.

#[path = "../../testsupport/ingest.rs"]
mod ingest;
mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use dmp_rules::RuleSet;
use dmp_segmenter::{evaluated, memberships, Segmenter};
use dmp_store::{Get, UserStore};
use tokio::sync::watch;

const RULES: &str = r#"
version = "summaries-1"

[[segment]]
id = "mortgage_seekers"
when = '''count(type == "search" and q contains "mortgage", 30d) >= 2'''

[[segment]]
id = "cats"
when = '''any(url.host == "cats.example", 7d) and not (count(url.host == "news.example", 30d) > 3)'''

[[segment]]
id = "recent_searcher"
when = '''since(type == "search") <= 1d'''
"#;

/// A counter's value in the rendered metrics (0 when absent).
fn counter(text: &str, name_and_labels: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_users_changing_in_rounds_when_segmented_then_summaries_give_the_whole_rows_results()
{
    let metrics = dmp_core::telemetry::init_metrics();
    let dir = tempfile::tempdir().unwrap();
    let cfg = support::config(dir.path(), RULES);
    let served = ingest::serve(&cfg, None).await;
    let writing = support::spawn_writer(&cfg, &served);
    let ingest::Served {
        db: _db,
        store,
        bus,
        url,
        stop,
        server,
        ..
    } = served;
    let seg = Segmenter::new(bus.clone(), store.clone(), &cfg).unwrap();
    let (seg_stop, seg_rx) = watch::channel(false);
    let segmenting = tokio::spawn(async move { seg.run(seg_rx).await.unwrap() });
    let rules = RuleSet::load(std::path::Path::new(&cfg.segmenter.rules)).unwrap();
    assert!(
        rules.history_needs().is_some(),
        "the test's rules are prunable"
    );

    let users: Vec<String> = (0..24).map(|i| format!("user-{i:02}")).collect();
    let base = dmp_core::clock::now_ms() - 60_000;
    let mut newest: BTreeMap<&str, i64> = BTreeMap::new();
    let client = reqwest::Client::new();
    for round in 0..8i64 {
        let mut events = Vec::new();
        for (i, u) in users.iter().enumerate() {
            // Each user its own mix of cat pages, mortgage searches, news pages and other searches.
            let kind = (i as i64 + round) % 4;
            let mut ts = base + round * 2_000 + i as i64;
            if round == 5 && i % 3 == 0 {
                ts = base + 500 + i as i64; // older than what the summary saw: the whole row
            }
            let ev = match kind {
                0 => {
                    serde_json::json!({"uid": u, "ts": ts, "type": "pageview", "url": "https://cats.example/a"})
                }
                1 => {
                    serde_json::json!({"uid": u, "ts": ts, "type": "search", "q": "mortgage rates"})
                }
                2 => {
                    serde_json::json!({"uid": u, "ts": ts, "type": "pageview", "url": "https://news.example/n"})
                }
                _ => serde_json::json!({"uid": u, "ts": ts, "type": "search", "q": "weather"}),
            };
            // With the newest event, in the same batch: in round 6 a search older than every
            // event of the row (a partner's file), which merges into the summary; in round 7 a
            // page view at the time of the user's newest event so far, which overwrites that
            // event's type and url (a cat page no longer one, for users 2 and 14): the summary
            // may have pruned an older match away, so that one is read from the row.
            match (round, i % 3) {
                (6, 1) => events.push(serde_json::json!(
                    {"uid": u, "ts": base - 10_000 + i as i64, "type": "search", "q": "cat food"}
                )),
                (7, 2) => events.push(serde_json::json!(
                    {"uid": u, "ts": newest[u.as_str()], "type": "pageview", "url": "https://weather.example/"}
                )),
                _ => {}
            }
            let e = newest.entry(u.as_str()).or_default();
            *e = (*e).max(ts);
            events.push(ev);
        }
        let r = client
            .post(format!("{url}/v1/events"))
            .json(&events)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 202);
        // Every user evaluated with its newest event, then each one's memberships are what the
        // rules make of its whole row.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let behind: Vec<&str> = users
                .iter()
                .filter(|u| {
                    let row = store.get(&Get::row(u.as_str())).unwrap();
                    row.as_ref().and_then(evaluated).map(|e| e.last_event_ts)
                        != Some(newest[u.as_str()])
                })
                .map(String::as_str)
                .collect();
            if behind.is_empty() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "round {round}: not evaluated: {behind:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let now = dmp_core::clock::now_ms();
        for u in &users {
            let row = store.get(&Get::row(u.as_str())).unwrap().unwrap();
            let want: Vec<String> = rules.evaluate(&row, now).live.into_keys().collect();
            let have: Vec<String> = memberships(Some(&row), "current").into_keys().collect();
            assert_eq!(have, want, "round {round}, {u}");
        }
    }
    let text = metrics.render();
    let from_summary = counter(&text, "dmp_segmenter_evaluations_from_summary_total");
    let first = counter(
        &text,
        "dmp_segmenter_evaluations_from_row_total{reason=\"no_summary\"}",
    );
    let out_of_order = counter(
        &text,
        "dmp_segmenter_evaluations_from_row_total{reason=\"out_of_order\"}",
    );
    assert!(
        from_summary >= 24 * 5,
        "most evaluations after the first from summaries: {from_summary}\n{text}"
    );
    assert!(first >= 24, "each user's first from its row: {first}");
    assert_eq!(
        out_of_order, 16,
        "the events of rounds 5 and 7 within the rows' times from the rows, and no other: \
         {out_of_order}"
    );
    seg_stop.send(true).unwrap();
    segmenting.await.unwrap();
    stop.send(true).unwrap();
    writing.await.unwrap();
    server.await.unwrap();
}
