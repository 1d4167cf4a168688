//! Events to segment records, in one process as `dmp run` wires it: HTTP ingest -> storage
//! writer -> segmenter -> dmp.segments / dmp.segments.shadow and `s:current` in the row.

#[path = "../../testsupport/ingest.rs"]
mod ingest;
mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use dmp_bus::{Bus, ProduceRecord};
use dmp_core::{Config, SegmentUpdate, UserChange};
use dmp_segmenter::{memberships, Segmenter};
use dmp_store::embedded::EmbeddedStore;
use dmp_store::{Get, UserStore};
use tokio::sync::watch;

const RULES: &str = r#"
version = "e2e-1"

[[segment]]
id = "mortgage_seekers"
when = '''count(type == "search" and q contains "mortgage", 30d) >= 2'''

[[segment]]
id = "cats"
when = '''any(url.host == "cats.example")'''

[[segment]]
id = "trial"
mode = "shadow"
when = '''any(type == "search")'''
"#;

struct Pipe {
    db: dmp_store::embedded::EmbeddedDatabase,
    counters: Arc<dmp_stats::EmbeddedCounters>,
    _dir: tempfile::TempDir,
    cfg: Config,
    bus: Arc<dyn Bus>,
    store: Arc<EmbeddedStore>,
    url: String,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The segmenter runs on its own stop signal so a test can restart it.
    segmenter: Option<(watch::Sender<bool>, tokio::task::JoinHandle<()>)>,
    /// The segmenter's progress reports (for readiness).
    progress: Arc<dmp_core::health::Progress>,
}

fn spawn_segmenter(
    cfg: &Config,
    bus: Arc<dyn Bus>,
    store: Arc<EmbeddedStore>,
    custom: Option<Arc<dyn dmp_segmenter::RulesSource>>,
    counters: Arc<dmp_stats::EmbeddedCounters>,
    progress: Arc<dmp_core::health::Progress>,
) -> (watch::Sender<bool>, tokio::task::JoinHandle<()>) {
    let seg = match custom {
        Some(r) => Segmenter::with_rules(bus, store, cfg, r),
        None => Segmenter::new(bus, store, cfg).unwrap(),
    }
    .with_counters(counters)
    .with_progress(progress);
    let (tx, rx) = watch::channel(false);
    (tx, tokio::spawn(async move { seg.run(rx).await.unwrap() }))
}

/// A plugin rule that counts how often it is evaluated per user, and can be slow.
struct Counting {
    counts: Arc<std::sync::Mutex<BTreeMap<String, usize>>>,
    /// The users in the order they were evaluated.
    order: Order,
    sleep: Duration,
}

impl dmp_rules::Rule for Counting {
    fn id(&self) -> &str {
        "counted"
    }
    fn version(&self) -> u32 {
        1
    }
    fn mode(&self) -> dmp_rules::Mode {
        dmp_rules::Mode::Live
    }
    fn depends_on(&self) -> Vec<String> {
        Vec::new()
    }
    fn evaluate(
        &self,
        user: &dmp_rules::UserView<'_>,
        _: &dmp_rules::Context<'_>,
    ) -> dmp_rules::Outcome {
        *self
            .counts
            .lock()
            .unwrap()
            .entry(user.uid.to_string())
            .or_default() += 1;
        self.order.lock().unwrap().push(user.uid.to_string());
        std::thread::sleep(self.sleep);
        dmp_rules::Outcome {
            matched: true,
            ..Default::default()
        }
    }
}

/// Evaluations per user, shared with the test.
type Counts = Arc<std::sync::Mutex<BTreeMap<String, usize>>>;

/// Users in the order of their evaluations, shared with the test.
type Order = Arc<std::sync::Mutex<Vec<String>>>;

fn counting_rules(sleep: Duration) -> (Arc<dyn dmp_segmenter::RulesSource>, Counts) {
    let (rules, counts, _) = recording_rules(sleep);
    (rules, counts)
}

fn recording_rules(sleep: Duration) -> (Arc<dyn dmp_segmenter::RulesSource>, Counts, Order) {
    let counts = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let rule: Arc<dyn dmp_rules::Rule> = Arc::new(Counting {
        counts: counts.clone(),
        order: order.clone(),
        sleep,
    });
    let set = dmp_rules::RuleSet::new("counting".into(), vec![rule], "test").unwrap();
    (
        Arc::new(dmp_segmenter::FixedRules(Arc::new(set))),
        counts,
        order,
    )
}

async fn start(rules: &str, tweak: impl FnOnce(&mut Config)) -> Pipe {
    start_with(rules, tweak, None, None).await
}

/// A pipeline whose rules count evaluations per user, banning users over `max` changes a minute.
async fn start_counting_with_blacklist_of(max: u32) -> (Pipe, Counts) {
    let (rules, counts) = counting_rules(Duration::ZERO);
    let p = start_with(
        RULES,
        |c| c.segmenter.blacklist_max_changes = max,
        Some(rules),
        None,
    )
    .await;
    (p, counts)
}

async fn start_with(
    rules: &str,
    tweak: impl FnOnce(&mut Config),
    custom: Option<Arc<dyn dmp_segmenter::RulesSource>>,
    bus: Option<Arc<dyn Bus>>,
) -> Pipe {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = support::config(dir.path(), rules);
    cfg.segmenter.reload_interval_ms = 100;
    cfg.segmenter.timer_scan_interval_ms = 200;
    tweak(&mut cfg);
    let served = ingest::serve(&cfg, bus).await;
    let writer = support::spawn_writer(&cfg, &served);
    let ingest::Served {
        db,
        store,
        bus,
        url,
        stop,
        server,
        ..
    } = served;
    let tasks = vec![server, writer];
    let counters = Arc::new(dmp_stats::EmbeddedCounters::in_memory());
    let progress = Arc::new(dmp_core::health::Progress::default());
    let segmenter = Some(spawn_segmenter(
        &cfg,
        bus.clone(),
        store.clone(),
        custom,
        counters.clone(),
        progress.clone(),
    ));
    Pipe {
        db,
        counters,
        _dir: dir,
        cfg,
        bus,
        store,
        url,
        stop,
        tasks,
        segmenter,
        progress,
    }
}

impl Pipe {
    async fn post(&self, events: serde_json::Value) {
        let r = reqwest::Client::new()
            .post(format!("{}/v1/events", self.url))
            .json(&events)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 202);
    }

    /// Reads until `want` records arrived (or 60 s), then 300 ms more for any extra.
    async fn records(&self, topic: &str, group: &str, want: usize) -> Vec<SegmentUpdate> {
        let mut c = self
            .bus
            .consumer(group, &[topic.to_string()])
            .await
            .unwrap();
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while out.len() < want && tokio::time::Instant::now() < deadline {
            for r in c.poll(100, Duration::from_millis(100)).await.unwrap() {
                out.push(SegmentUpdate::from_json(&r.value).unwrap());
            }
        }
        for r in c.poll(100, Duration::from_millis(300)).await.unwrap() {
            out.push(SegmentUpdate::from_json(&r.value).unwrap());
        }
        c.close().await.unwrap();
        out
    }

    async fn drained(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let committed: u64 = self
                .bus
                .committed(&self.cfg.segmenter.group, &self.cfg.topics.user_changes)
                .await
                .unwrap()
                .iter()
                .map(|c| c.unwrap_or(0))
                .sum();
            let high = self.changes_high().await;
            if high > 0 && committed == high {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "segmenter did not finish: {committed} of {high}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop_segmenter(&mut self) {
        if let Some((tx, task)) = self.segmenter.take() {
            let _ = tx.send(true);
            task.await.unwrap();
        }
    }

    /// A new segmenter instance (nothing in memory from the last one) on the same bus and store.
    fn start_segmenter(&mut self) {
        self.start_segmenter_with(None);
    }

    /// A new segmenter instance with `custom` rules (none: the rule file).
    fn start_segmenter_with(&mut self, custom: Option<Arc<dyn dmp_segmenter::RulesSource>>) {
        assert!(self.segmenter.is_none(), "stop the running segmenter first");
        self.segmenter = Some(spawn_segmenter(
            &self.cfg,
            self.bus.clone(),
            self.store.clone(),
            custom,
            self.counters.clone(),
            self.progress.clone(),
        ));
    }

    /// Change records written so far, over every partition.
    async fn changes_high(&self) -> u64 {
        self.bus
            .offsets(&self.cfg.topics.user_changes)
            .await
            .unwrap()
            .iter()
            .map(|o| o.high)
            .sum()
    }

    /// Waits until the storage writer has emitted `n` change records (or 60 s).
    async fn changes_written(&self, n: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let high = self.changes_high().await;
            if high >= n {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{high} of {n} changes written"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// One event of each of `users`, at `ts` (the users' order within the request), in one request.
    async fn post_users(&self, users: impl Iterator<Item = String>, ts: i64) {
        let events: Vec<serde_json::Value> = users
            .enumerate()
            .map(|(i, uid)| {
                serde_json::json!({"uid": uid, "ts": ts + i as i64, "url": "https://cats.example/"})
            })
            .collect();
        self.post(serde_json::Value::Array(events)).await;
    }

    async fn stop(mut self) {
        self.stop_segmenter().await;
        let _ = self.stop.send(true);
        for t in self.tasks {
            t.await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_events_when_rules_match_then_segment_records_and_row_memberships_follow() {
    let p = start(RULES, |_| {}).await;
    let now = dmp_core::clock::now_ms();
    p.post(serde_json::json!([
        {"uid": "anna", "ts": now - 3000, "type": "search", "q": "mortgage rates"},
        {"uid": "olga", "ts": now - 2000, "type": "pageview", "url": "https://cats.example/x"},
    ]))
    .await;
    let first = p.records(&p.cfg.topics.segments, "check-1", 1).await;
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0].uid, "olga");
    assert_eq!(first[0].segments, vec!["cats"]);
    assert_eq!(first[0].added, vec!["cats"]);
    assert_eq!(first[0].rules_version, "e2e-1");
    assert_eq!(first[0].last_event_ts, now - 2000);
    // A second mortgage search puts anna in the segment.
    p.post(serde_json::json!([{"uid": "anna", "ts": now - 1000, "type": "search", "q": "Mortgage calculator"}])).await;
    let all = p.records(&p.cfg.topics.segments, "check-2", 2).await;
    let anna: Vec<&SegmentUpdate> = all.iter().filter(|u| u.uid == "anna").collect();
    assert_eq!(anna.len(), 1, "{all:?}");
    assert_eq!(anna[0].segments, vec!["mortgage_seekers"]);
    // The row holds the memberships with their since.
    let row = p.store.get(&Get::row("anna")).unwrap().unwrap();
    let current = memberships(Some(&row), "current");
    assert_eq!(current.keys().collect::<Vec<_>>(), vec!["mortgage_seekers"]);
    assert!(current["mortgage_seekers"] >= now - 1000);
    // Counted per day, in the segment and in `all` (HLL: exact at this size).
    let today = dmp_stats::day_of(dmp_core::clock::now_ms());
    use dmp_stats::SegmentCounters;
    assert_eq!(p.counters.count("mortgage_seekers", today).unwrap(), 1);
    assert_eq!(p.counters.count("cats", today).unwrap(), 1);
    assert_eq!(p.counters.count(dmp_stats::ALL, today).unwrap(), 2);
    assert_eq!(
        p.counters.count("trial", today).unwrap(),
        0,
        "shadow results are never counted"
    );
    // Shadow results go to the shadow topic only.
    let shadow = p.records(&p.cfg.topics.segments_shadow, "check-3", 1).await;
    assert!(
        shadow
            .iter()
            .any(|u| u.uid == "anna" && u.segments == vec!["trial"]),
        "{shadow:?}"
    );
    assert!(all
        .iter()
        .all(|u| !u.segments.contains(&"trial".to_string())));
    // A rule change (hot reload) that drops olga's segment publishes her removal on her next event.
    std::fs::write(
        &p.cfg.segmenter.rules,
        RULES
            .replace("cats.example", "dogs.example")
            .replace("e2e-1", "e2e-2"),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    p.post(serde_json::json!([{"uid": "olga", "ts": now, "type": "pageview", "url": "https://cats.example/y"}])).await;
    let after = p.records(&p.cfg.topics.segments, "check-4", 3).await;
    let removal = after
        .iter()
        .find(|u| u.uid == "olga" && u.rules_version == "e2e-2")
        .expect("olga's update");
    assert_eq!(removal.removed, vec!["cats"]);
    assert!(removal.segments.is_empty());
    p.stop().await;
}

/// Bad input never stops the segmenter: a record on `dmp.user-changes` that is not a change, and a
/// user whose stored row does not decode (a delta of garbage, written under the store), each
/// become a dead letter naming the reason and where it came from; the users around them are
/// segmented and every offset is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_bad_change_and_an_unreadable_row_when_segmenting_then_dead_lettered_and_the_rest_segmented(
) {
    let p = start(RULES, |_| {}).await;
    // Row "broken": one delta (`uid 0x00 0x01 seq`) that is not an encoding of cells. Nothing has
    // read the row, so the row cache does not hold it.
    let rows = p.db.keyspace(dmp_store::embedded::ROWS_KEYSPACE).unwrap();
    rows.insert(
        b"broken\x00\x01\x00\x00\x00\x00\x00\x00\x00\x01",
        b"garbage".to_vec(),
    )
    .unwrap();
    p.bus
        .produce(
            &p.cfg.topics.user_changes,
            vec![ProduceRecord::new("junk", b"{not a change".to_vec())],
        )
        .await
        .unwrap();
    let now = dmp_core::clock::now_ms();
    p.post(serde_json::json!([
        {"uid": "broken", "ts": now - 2000, "type": "pageview", "url": "https://cats.example/a"},
        {"uid": "olga", "ts": now - 1000, "type": "pageview", "url": "https://cats.example/b"},
    ]))
    .await;
    let records = p.records(&p.cfg.topics.segments, "check-dead", 1).await;
    assert_eq!(
        records.iter().map(|u| u.uid.as_str()).collect::<Vec<_>>(),
        vec!["olga"]
    );
    p.drained().await;
    let mut c = p
        .bus
        .consumer(
            "check-dead-letters",
            std::slice::from_ref(&p.cfg.topics.dead_letter),
        )
        .await
        .unwrap();
    let mut dead: BTreeMap<String, dmp_core::DeadLetter> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while dead.len() < 2 && tokio::time::Instant::now() < deadline {
        for r in c.poll(100, Duration::from_millis(100)).await.unwrap() {
            let d: dmp_core::DeadLetter = serde_json::from_slice(&r.value).unwrap();
            dead.insert(d.reason.clone(), d);
        }
    }
    c.close().await.unwrap();
    let reasons: Vec<&str> = dead.keys().map(String::as_str).collect();
    assert_eq!(
        reasons,
        vec![dmp_segmenter::BAD_CHANGE, dmp_segmenter::UNREADABLE_ROW]
    );
    let bad = &dead[dmp_segmenter::BAD_CHANGE];
    assert_eq!(bad.stage, "segmenter");
    assert_eq!(bad.topic, p.cfg.topics.user_changes);
    assert_eq!(bad.payload, "{not a change");
    let unreadable = &dead[dmp_segmenter::UNREADABLE_ROW];
    assert_eq!(unreadable.topic, p.cfg.topics.user_changes);
    assert!(unreadable.error.contains("broken"), "{unreadable:?}");
    let change = UserChange::from_json(unreadable.payload.as_bytes()).unwrap();
    assert_eq!(change.uid, "broken");
    assert_eq!(
        change.last_event_ts,
        now - 2000,
        "the change record as it was read"
    );
    p.stop().await;
}

/// With `segmenter.coalesce_ms`, a user's changes written within the window (three pages opened
/// 150 ms apart, each its own write) are one read and one evaluation that sees all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_coalescing_when_a_user_changes_three_times_in_a_burst_then_one_evaluation_sees_all()
{
    let (rules, counts) = counting_rules(Duration::ZERO);
    let p = start_with(RULES, |c| c.segmenter.coalesce_ms = 1000, Some(rules), None).await;
    let now = dmp_core::clock::now_ms();
    for i in 0..3 {
        p.post(serde_json::json!([{"uid": "tabs", "ts": now + i, "url": format!("https://cats.example/{i}")}]))
            .await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    p.drained().await;
    assert_eq!(counts.lock().unwrap().get("tabs"), Some(&1));
    let row = p.store.get(&Get::row("tabs")).unwrap().unwrap();
    let evaluated = dmp_segmenter::evaluated(&row).expect("the evaluation is recorded");
    assert_eq!(
        evaluated.last_event_ts,
        now + 2,
        "the evaluation saw the last page"
    );
    p.stop().await;
}

/// A change stamped by a writer whose clock runs ahead (10 minutes) waits no longer than the
/// coalescing window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_coalescing_when_the_writer_clock_is_ahead_then_a_change_waits_only_the_window() {
    let (rules, counts) = counting_rules(Duration::ZERO);
    let p = start_with(RULES, |c| c.segmenter.coalesce_ms = 200, Some(rules), None).await;
    let now = dmp_core::clock::now_ms();
    p.post(serde_json::json!([{"uid": "ahead", "ts": now, "url": "https://cats.example/"}]))
        .await;
    p.drained().await;
    let ahead = UserChange {
        uid: "ahead".into(),
        ts: now + 600_000,
        last_event_ts: now,
    };
    p.bus
        .produce(
            &p.cfg.topics.user_changes,
            vec![ProduceRecord::new("ahead", ahead.to_json())],
        )
        .await
        .unwrap();
    let started = std::time::Instant::now();
    p.drained().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "waited {:?}",
        started.elapsed()
    );
    assert_eq!(counts.lock().unwrap().get("ahead"), Some(&2));
    p.stop().await;
}

/// A crawler-like user (60 pages, one every 50 ms) below the blacklist's threshold but above the
/// throttle's: its first pages are evaluated at once, after that at most once a second, and the
/// last evaluation sees the last page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_busy_user_when_throttled_then_evaluated_once_a_second_and_nothing_missed() {
    let (rules, counts) = counting_rules(Duration::ZERO);
    let p = start_with(
        RULES,
        |c| {
            c.segmenter.blacklist_max_changes = 1000;
            c.segmenter.throttle_after_changes = 10;
            c.segmenter.throttle_interval_ms = 1000;
        },
        Some(rules),
        None,
    )
    .await;
    let now = dmp_core::clock::now_ms();
    for i in 0..60 {
        p.post(serde_json::json!([{"uid": "busy", "ts": now + i, "url": format!("https://cats.example/{i}")}]))
            .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    p.drained().await;
    let evaluations = counts.lock().unwrap().get("busy").copied().unwrap_or(0);
    // 10 at once, then about one a second over the remaining 2.5 s (and its last, after).
    assert!(
        (10..=16).contains(&evaluations),
        "{evaluations} evaluations of 60 changes"
    );
    let row = p.store.get(&Get::row("busy")).unwrap().unwrap();
    let evaluated = dmp_segmenter::evaluated(&row).expect("the evaluation is recorded");
    assert_eq!(evaluated.last_event_ts, now + 59, "the last page was read");
    p.stop().await;
}

/// A change held back by the throttle when the segmenter stops is evaluated before it stops, and
/// its offset committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_held_back_change_when_the_segmenter_stops_then_it_is_evaluated_first() {
    let (rules, counts) = counting_rules(Duration::ZERO);
    let mut p = start_with(
        RULES,
        |c| {
            c.segmenter.throttle_after_changes = 1;
            c.segmenter.throttle_interval_ms = 60_000;
        },
        Some(rules),
        None,
    )
    .await;
    let now = dmp_core::clock::now_ms();
    p.post(serde_json::json!([{"uid": "held", "ts": now, "url": "https://cats.example/"}]))
        .await;
    p.drained().await;
    p.post(serde_json::json!([{"uid": "held", "ts": now + 1, "url": "https://cats.example/2"}]))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        counts.lock().unwrap().get("held"),
        Some(&1),
        "the second is held back"
    );
    p.stop_segmenter().await;
    assert_eq!(counts.lock().unwrap().get("held"), Some(&2));
    p.drained().await;
    let row = p.store.get(&Get::row("held")).unwrap().unwrap();
    assert_eq!(
        dmp_segmenter::evaluated(&row).unwrap().last_event_ts,
        now + 1
    );
    p.stop().await;
}

/// Backfill (a partner's file of events hours old) waits behind live changes: with both queued,
/// the live users are evaluated first, then the backfill, and every change is handled. (A batch
/// evaluates its users in uid order: the backfill users' uids sort first.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_backfill_queued_before_live_changes_when_segmenting_then_live_users_go_first() {
    let (rules, counts, order) = recording_rules(Duration::from_millis(20));
    let mut p = start_with(RULES, |c| c.segmenter.workers = 1, None, None).await;
    p.stop_segmenter().await;
    let now = dmp_core::clock::now_ms();
    p.post_users((0..40).map(|i| format!("a-past-{i}")), now - 2 * 3_600_000)
        .await;
    p.post_users((0..5).map(|i| format!("z-now-{i}")), now)
        .await;
    p.changes_written(45).await;
    p.start_segmenter_with(Some(rules));
    p.drained().await;
    let order = order.lock().unwrap().clone();
    assert_eq!(order.len(), 45, "each user once: {order:?}");
    assert!(counts.lock().unwrap().values().all(|n| *n == 1));
    let last_live = order.iter().rposition(|u| u.starts_with("z-now")).unwrap();
    let backfill_first = order[..last_live]
        .iter()
        .filter(|u| u.starts_with("a-past"))
        .count();
    // The worker may take the first backfill changes before the rest reach its queue; it handles
    // what it holds when nothing live is queued. Without the priority all 40 come first.
    assert!(
        backfill_first <= 10,
        "{backfill_first} backfill users before the last live one: {order:?}"
    );
    p.stop().await;
}

/// One worker whose rule takes 20 ms, waiting at most `max_wait_ms` for backfill; queued before
/// it starts: `live` live users, with one backfill user (`a-past`, events two hours old) in the
/// middle; then, while it runs, `rounds` rounds of 5 more live users every 50 ms (twice what it
/// evaluates: its queue is never empty).
async fn backfill_among_live(
    max_wait_ms: u64,
    live: usize,
    rounds: usize,
) -> (Pipe, Counts, Order) {
    let (rules, counts, order) = recording_rules(Duration::from_millis(20));
    let mut p = start_with(
        RULES,
        |c| {
            c.segmenter.workers = 1;
            c.segmenter.backfill_max_wait_ms = max_wait_ms;
        },
        None,
        None,
    )
    .await;
    p.stop_segmenter().await;
    let now = dmp_core::clock::now_ms();
    p.post_users((0..live / 2).map(|i| format!("z-now-{i:03}")), now)
        .await;
    p.post_users(std::iter::once("a-past".to_string()), now - 2 * 3_600_000)
        .await;
    p.post_users((live / 2..live).map(|i| format!("z-now-{i:03}")), now)
        .await;
    p.changes_written(live as u64 + 1).await;
    p.start_segmenter_with(Some(rules));
    for round in 0..rounds {
        p.post_users((0..5).map(|i| format!("z-now-{round}-{i}")), now)
            .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (p, counts, order)
}

/// While live changes keep a worker busy, a backfill change waits `backfill_max_wait_ms` (here
/// 1 ms: one batch) and no longer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_busy_worker_when_backfill_waits_then_no_longer_than_the_max_wait() {
    let (p, _, order) = backfill_among_live(1, 60, 60).await;
    p.drained().await;
    let order = order.lock().unwrap().clone();
    assert_eq!(order.len(), 361, "each user once");
    let at = order.iter().position(|u| u == "a-past").unwrap();
    // At the start of the batch after the one it came with (its uid sorts first), about 60 live
    // users in; waiting for an empty queue it would be the last of 361.
    assert!(
        at <= 250,
        "the backfill user was evaluated after {at} live users"
    );
    p.stop().await;
}

/// Backfill held back behind live changes when the segmenter stops is evaluated before it stops
/// (a new instance then takes up from the committed offsets and finishes the rest).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_held_backfill_when_the_segmenter_stops_then_it_is_evaluated_first() {
    let (mut p, counts, _) = backfill_among_live(60_000, 40, 10).await;
    p.stop_segmenter().await;
    assert_eq!(counts.lock().unwrap().get("a-past"), Some(&1));
    // Changes written after it stopped are the next instance's: it takes up from the commit.
    p.start_segmenter();
    p.drained().await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_burst_of_changes_when_segmented_then_duplicates_skipped_and_bots_blacklisted() {
    let (p, counts) = start_counting_with_blacklist_of(50).await;
    let now = dmp_core::clock::now_ms();
    p.post(serde_json::json!([{"uid": "burst", "ts": now - 500, "url": "https://cats.example/"}]))
        .await;
    p.drained().await;
    assert_eq!(counts.lock().unwrap().get("burst"), Some(&1));
    // Ten more change records of the write the segmenter already read: all skipped.
    let row = p.store.get(&Get::row("burst")).unwrap().unwrap();
    let written = dmp_storage_writer::cells::written_of(&row).unwrap();
    let stale: Vec<ProduceRecord> = (0..10)
        .map(|_| {
            ProduceRecord::new(
                "burst",
                UserChange {
                    uid: "burst".into(),
                    ts: written,
                    last_event_ts: now - 500,
                }
                .to_json(),
            )
        })
        .collect();
    p.bus
        .produce(&p.cfg.topics.user_changes, stale)
        .await
        .unwrap();
    // A newer write is read again.
    p.post(serde_json::json!([{"uid": "burst", "ts": now, "url": "https://cats.example/2"}]))
        .await;
    // A bot: 200 changes in a moment; it is blacklisted after 50 and never read after that.
    let flood: Vec<ProduceRecord> = (0..200)
        .map(|i| {
            ProduceRecord::new(
                "bot-9",
                UserChange {
                    uid: "bot-9".into(),
                    ts: now + i,
                    last_event_ts: now,
                }
                .to_json(),
            )
        })
        .collect();
    p.bus
        .produce(&p.cfg.topics.user_changes, flood)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    p.drained().await;
    let counts = counts.lock().unwrap().clone();
    assert_eq!(
        counts.get("burst"),
        Some(&2),
        "stale changes skipped, the new write read: {counts:?}"
    );
    // bot-9 has no row (no events were written), so it is never evaluated; the blacklist flags it.
    assert_eq!(counts.get("bot-9"), None);
    let bot = p
        .store
        .get(&Get::row("bot-9"))
        .unwrap()
        .expect("the bot is flagged in its row");
    assert_eq!(
        bot.latest("m", "bot").map(|c| c.value.to_vec()),
        Some(b"1".to_vec())
    );
    p.stop().await;
}

/// A worker catching up on a backlog (after a restart, or behind at a peak) reads a user's changes
/// far faster than the user made them. The blacklist counts each change at its own time, so a
/// busy human's ten minutes read in a second are not a crawler's second; a crawler's second is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_backlog_when_caught_up_then_the_blacklist_counts_changes_at_their_own_times() {
    let (p, _counts) = start_counting_with_blacklist_of(50).await;
    let now = dmp_core::clock::now_ms();
    // 120 changes each, produced at once: the human's over ten minutes (12 a minute), the
    // crawler's within 1.2 s, both ten minutes ago.
    let backlog = |uid: &str, spacing_ms: i64| -> Vec<ProduceRecord> {
        (0..120)
            .map(|i| {
                let t = now - 600_000 + i * spacing_ms;
                ProduceRecord::new(
                    uid,
                    UserChange {
                        uid: uid.into(),
                        ts: t + 5,
                        last_event_ts: t,
                    }
                    .to_json(),
                )
            })
            .collect()
    };
    let mut records = backlog("busy-human", 5_000);
    records.extend(backlog("crawler-7", 10));
    p.bus
        .produce(&p.cfg.topics.user_changes, records)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    p.drained().await;
    let flagged = |uid: &str| {
        p.store
            .get(&Get::row(uid))
            .unwrap()
            .and_then(|r| r.latest("m", "bot").map(|c| c.value.to_vec()))
    };
    assert_eq!(
        flagged("busy-human"),
        None,
        "12 changes a minute is no crawler"
    );
    assert_eq!(flagged("crawler-7"), Some(b"1".to_vec()));
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kafka-protocol broker: run scripts/test.sh"]
async fn given_rule_slower_than_max_poll_interval_when_segmenting_on_kafka_then_no_rebalance_and_no_redelivery(
) {
    let broker =
        std::env::var("DMP_TEST_KAFKA").expect("DMP_TEST_KAFKA is not set (run scripts/test.sh)");
    let mut kcfg = Config::defaults().kafka;
    kcfg.consumer
        .insert("session.timeout.ms".into(), "6000".into());
    kcfg.consumer
        .insert("max.poll.interval.ms".into(), "7000".into());
    kcfg.consumer
        .insert("auto.commit.interval.ms".into(), "200".into());
    let bus: Arc<dyn Bus> =
        Arc::new(dmp_bus::kafka::KafkaBus::from_url(&format!("kafka://{broker}"), &kcfg).unwrap());
    let suffix = format!("-slow-{}", dmp_core::clock::now_ms());
    // Each evaluation sleeps 9 s, longer than max.poll.interval.ms.
    let (rules, counts) = counting_rules(Duration::from_secs(9));
    let p = start_with(
        RULES,
        |c| {
            for t in [
                &mut c.topics.events,
                &mut c.topics.user_changes,
                &mut c.topics.segments,
                &mut c.topics.segments_shadow,
                &mut c.topics.dead_letter,
            ] {
                t.push_str(&suffix);
            }
            c.storage_writer.group.push_str(&suffix);
            c.segmenter.group.push_str(&suffix);
            c.segmenter.workers = 1;
        },
        Some(rules),
        Some(bus),
    )
    .await;
    let now = dmp_core::clock::now_ms();
    p.post(serde_json::json!([{"uid": "slow-1", "ts": now - 100, "type": "pageview"}]))
        .await;
    let recs = p
        .records(&p.cfg.topics.segments, &format!("check{suffix}"), 1)
        .await;
    assert!(recs.iter().any(|u| u.uid == "slow-1"), "{recs:?}");
    p.post(serde_json::json!([{"uid": "slow-2", "ts": now, "type": "pageview"}]))
        .await;
    let recs = p
        .records(&p.cfg.topics.segments, &format!("check2{suffix}"), 2)
        .await;
    assert!(recs.iter().any(|u| u.uid == "slow-2"), "{recs:?}");
    let counts = counts.lock().unwrap().clone();
    // Had the member left its group, its changes would have been delivered again.
    assert_eq!(counts.get("slow-1"), Some(&1), "{counts:?}");
    assert_eq!(counts.get("slow-2"), Some(&1), "{counts:?}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_window_rule_when_time_passes_without_events_then_user_leaves_the_segment() {
    let rules = r#"
version = "timers-1"

[[segment]]
id = "searched_lately"
when = '''any(type == "search", 3s)'''
"#;
    let p = start(rules, |_| {}).await;
    let now = dmp_core::clock::now_ms();
    p.post(serde_json::json!([{"uid": "fleeting", "ts": now - 500, "type": "search", "q": "x"}]))
        .await;
    // Enters now, and leaves about 2.5 s later with no new event: the worker's timer fires.
    let recs = p.records(&p.cfg.topics.segments, "timers", 2).await;
    let mine: Vec<&SegmentUpdate> = recs.iter().filter(|u| u.uid == "fleeting").collect();
    assert_eq!(mine.len(), 2, "{recs:?}");
    assert_eq!(mine[0].added, vec!["searched_lately"]);
    assert_eq!(mine[1].removed, vec!["searched_lately"]);
    assert!(mine[1].segments.is_empty());
    let left_after = mine[1].evaluated_at - (now - 500);
    assert!(
        (3000..6000).contains(&left_after),
        "left {left_after} ms after the search, window 3 s"
    );
    let row = p.store.get(&Get::row("fleeting")).unwrap().unwrap();
    assert!(memberships(Some(&row), "current").is_empty());
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_pending_timer_when_segmenter_restarts_then_new_instance_fires_it() {
    let rules = r#"
version = "timers-2"

[[segment]]
id = "searched_lately"
when = '''any(type == "search", 3s)'''
"#;
    let mut p = start(rules, |_| {}).await;
    let now = dmp_core::clock::now_ms();
    p.post(serde_json::json!([{"uid": "durable", "ts": now - 500, "type": "search", "q": "x"}]))
        .await;
    let recs = p.records(&p.cfg.topics.segments, "restart-1", 1).await;
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0].added, vec!["searched_lately"]);
    p.drained().await;
    // The timer is in the store, recorded in the row.
    let row = p.store.get(&Get::row("durable")).unwrap().unwrap();
    let pending = dmp_segmenter::timers::recorded(&row).expect("a recorded timer");
    assert!(
        (now + 2_000..now + 4_000).contains(&pending.due),
        "due {} ms after the search",
        pending.due - (now - 500)
    );
    // Down across the due time: the first instance never fires it.
    p.stop_segmenter().await;
    tokio::time::sleep(Duration::from_millis(
        (pending.due - dmp_core::clock::now_ms()).max(0) as u64 + 500,
    ))
    .await;
    p.start_segmenter();
    let recs = p.records(&p.cfg.topics.segments, "restart-2", 2).await;
    let mine: Vec<&SegmentUpdate> = recs.iter().filter(|u| u.uid == "durable").collect();
    assert_eq!(mine.len(), 2, "{recs:?}");
    assert_eq!(mine[1].removed, vec!["searched_lately"]);
    let row = p.store.get(&Get::row("durable")).unwrap().unwrap();
    assert!(memberships(Some(&row), "current").is_empty());
    // The fired timer is gone and none is pending.
    assert_eq!(dmp_segmenter::timers::recorded(&row), None);
    let left =
        dmp_segmenter::timers::scan_due(p.store.as_ref(), pending.partition, i64::MAX, 10).unwrap();
    assert!(left.is_empty(), "{left:?}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_evaluation_hanging_when_readiness_asked_then_segmenter_reported_stuck_until_it_moves(
) {
    let (rules, counts) = counting_rules(Duration::from_millis(2500));
    let p = start_with("", |_| {}, Some(rules), None).await;
    let after = Duration::from_millis(1000);
    // Idle: not stuck, however long nothing happens.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert!(
        p.progress.stuck(after).is_empty(),
        "{:?}",
        p.progress.stuck(after)
    );
    let now = dmp_core::clock::now_ms();
    p.post(serde_json::json!([{"uid": "slow", "ts": now - 100, "type": "x"}]))
        .await;
    // The rule takes 2.5 s: for a while, a change is in flight and nothing is committed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut seen_stuck = Vec::new();
    while seen_stuck.is_empty() && tokio::time::Instant::now() < deadline {
        seen_stuck = p.progress.stuck(after);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        seen_stuck
            .iter()
            .any(|s| s.starts_with("segmenter: no progress")),
        "{seen_stuck:?}"
    );
    // Once the evaluation finishes and is committed, it is not stuck any more.
    p.drained().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(p.progress.stuck(after).is_empty());
    assert_eq!(counts.lock().unwrap().get("slow"), Some(&1));
    p.stop().await;
}
