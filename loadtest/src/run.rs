//! One scenario from start to report: start dmp, drive the traffic while sampling dmp's metrics
//! and reading its segment records, wait until every user's newest event is evaluated and check
//! every user against the ground truth, check audience estimates, look users up, stop dmp; then,
//! when asked, the same traffic again with dedupe and the bot blacklist off.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::driver::{Drive, Driven, Progress, Target};
use crate::generator::Generator;
use crate::measure::{self, Latencies, LookupFigures, Percentiles, Sample};
use crate::oracle::{Oracle, SEGMENTS};
use crate::process::DmpProcess;
use crate::scenario::{DriverKind, Mode, Scenario};

/// A user whose segments differ from the ground truth.
#[derive(Debug, Clone, Serialize)]
pub struct Wrong {
    /// User id.
    pub uid: String,
    /// A bot.
    pub bot: bool,
    /// What the ground truth says.
    pub expected: Vec<String>,
    /// What dmp answered.
    pub got: Vec<String>,
}

/// Every user against the ground truth, after the pipeline drained.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Correctness {
    /// Users checked (every user with an acknowledged event).
    pub users: u64,
    /// Of which bots.
    pub bots: u64,
    /// Users whose segments differ from the ground truth.
    pub wrong_total: u64,
    /// Humans whose newest event was still not evaluated after the waits.
    pub not_evaluated: u64,
    /// Lookups that failed.
    pub errors: u64,
    /// The first wrong users.
    pub wrong: Vec<Wrong>,
    /// Bots the rules put in a segment (or in the audience check's intersection) that dmp left
    /// in none, because the blacklist stopped them before their first evaluation: dmp never
    /// counted them, so the audience check takes them off the truth.
    pub bots_never_counted: BTreeMap<String, u64>,
}

/// One audience estimate against the truth.
#[derive(Debug, Clone, Serialize)]
pub struct AudienceCheck {
    /// The expression.
    pub expr: String,
    /// The true number of users: the rules' members, less bots dmp rightly never evaluated
    /// (see [`Correctness::bots_never_counted`]).
    pub truth: u64,
    /// Of the rules' members, bots the blacklist stopped before their first evaluation.
    pub bots_never_counted: u64,
    /// dmp's estimate.
    pub estimate: u64,
    /// Its interval.
    pub low: u64,
    /// Its interval.
    pub high: u64,
    /// The estimator.
    pub method: String,
    /// Whether the truth is inside the interval.
    pub within: bool,
}

/// One step of a find_max ramp.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// Events/s offered.
    pub rate: f64,
    /// Events/s the storage writer wrote during the step.
    pub stored_rate: f64,
    /// Events acknowledged but not yet written at the end of the step.
    pub backlog: f64,
    /// p99 event → segment during the step, ms.
    pub p99_ms: f64,
    /// Whether dmp kept up.
    pub sustained: bool,
}

/// One pass of traffic through one dmp.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Phase {
    /// `main`, `blacklist_off` or `dedupe_and_blacklist_off`.
    pub label: String,
    /// dmp's configuration on top of the scenario's.
    pub extra_config: BTreeMap<String, String>,
    /// From `dmp run` to ready, ms.
    pub cold_start_ms: f64,
    /// The driver's account.
    pub driven: Driven,
    /// Events/s written by the storage writer after the warmup (mean).
    pub stored_rate: f64,
    /// Event → segment record, ms (publish time − the newest event the evaluation saw).
    pub event_to_segment_ms: Percentiles,
    /// (seconds, ms) of every record, for the chart (not in report.json: one per record).
    #[serde(skip)]
    pub latency_series: Vec<(f64, u64)>,
    /// Segment records read from the partner stream.
    pub segment_records: u64,
    /// Of which left out of the latency figures: a partner dump may have caused them.
    pub segment_records_after_dumps: u64,
    /// Time waited in each topic (p50, p99 seconds) from dmp's histograms, after the warmup.
    pub topic_wait_s: BTreeMap<String, (f64, f64)>,
    /// Changes received, and the shares evaluated / skipped as duplicates / skipped as bots.
    pub changes: f64,
    /// Share evaluated.
    pub share_evaluated: f64,
    /// Share skipped as already seen.
    pub share_duplicate: f64,
    /// Share skipped as bots.
    pub share_bot: f64,
    /// CPU seconds per 1000 stored events, per role and in total, after the warmup.
    pub cpu_per_1k_events: BTreeMap<String, f64>,
    /// The loadtest's own CPU seconds per 1000 events (it shares the machine).
    pub loadtest_cpu_per_1k_events: f64,
    /// Seconds per second each role's threads spent runnable but waiting for a CPU, after the
    /// warmup (over the same samples as the CPU): above 0, that role could have used more CPU
    /// than it got. Empty where the kernel keeps no scheduler times.
    pub cpu_wait_per_s: BTreeMap<String, f64>,
    /// Peak resident memory of dmp, MiB.
    pub peak_rss_mib: f64,
    /// Most bytes the embedded database's memtables held at a sample, MiB.
    pub memtables_peak_mib: f64,
    /// Per-second samples.
    pub samples: Vec<Sample>,
    /// find_max steps.
    pub steps: Vec<Step>,
    /// find_max: the highest rate sustained.
    pub max_sustained_rate: Option<f64>,
    /// Seconds from the end of the traffic until every event was written and every change
    /// evaluated (None: not within 15 minutes).
    pub drain_seconds: Option<f64>,
    /// Every user against the truth.
    pub correctness: Option<Correctness>,
    /// Audience estimates against the truth.
    pub audience: Vec<AudienceCheck>,
    /// The lookup phase.
    pub lookups: Option<LookupFigures>,
    /// Seconds waited before the lookup phase for dmp to go idle (under 0.1 CPU s per second).
    pub lookup_settle_seconds: f64,
    /// dmp stopped by itself on SIGTERM.
    pub graceful_stop: bool,
}

/// A whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The scenario as run.
    pub scenario: Scenario,
    /// Machine, build, command.
    pub setup: BTreeMap<String, String>,
    /// Passes.
    pub phases: Vec<Phase>,
    /// CPU per event without divided by with: both dedupe and blacklist, dedupe alone (both runs
    /// without blacklist), blacklist alone (both with dedupe); total and segmenter.
    pub dedupe_saving: Option<BTreeMap<String, f64>>,
}

/// Runs `scenario` with the dmp at `dmp`, writing under `out`; returns the report.
pub async fn run(scenario: &Scenario, dmp: &Path, out: &Path) -> anyhow::Result<Report> {
    std::fs::create_dir_all(out)?;
    // Before the phases: the load average is the machine's, not the run's.
    let setup = setup(dmp);
    let mut phases = vec![phase(scenario, dmp, out, "main", &[]).await?];
    let mut dedupe_saving = None;
    if scenario.checks.compare_dedupe {
        let mut s = scenario.clone();
        s.checks.correctness = true;
        s.checks.audience = false;
        s.checks.lookup_rate = 0.0;
        let no_blacklist = [("segmenter.blacklist", "false")];
        phases.push(phase(&s, dmp, out, "blacklist_off", &no_blacklist).await?);
        let neither = [
            ("segmenter.dedupe", "false"),
            ("segmenter.blacklist", "false"),
        ];
        phases.push(phase(&s, dmp, out, "dedupe_and_blacklist_off", &neither).await?);
        // Ratios of CPU per event: what each saves, as FACETz reported them.
        let cpu = |i: usize, k: &str| phases[i].cpu_per_1k_events.get(k).copied().unwrap_or(0.0);
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        let mut m = BTreeMap::new();
        for k in ["total", "segmenter"] {
            m.insert(
                format!("{k}: both off / both on"),
                ratio(cpu(2, k), cpu(0, k)),
            );
            m.insert(
                format!("{k}: dedupe (blacklist off)"),
                ratio(cpu(2, k), cpu(1, k)),
            );
            m.insert(
                format!("{k}: blacklist (dedupe on)"),
                ratio(cpu(1, k), cpu(0, k)),
            );
        }
        dedupe_saving = Some(m);
    }
    Ok(Report {
        scenario: scenario.clone(),
        setup,
        phases,
        dedupe_saving,
    })
}

fn setup(dmp: &Path) -> BTreeMap<String, String> {
    let mut s = BTreeMap::new();
    let sh = |cmd: &str| {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    s.insert("host".into(), sh("hostname"));
    s.insert("cpus".into(), sh("nproc"));
    s.insert(
        "cpu_model".into(),
        sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"),
    );
    s.insert(
        "memory".into(),
        sh("grep MemTotal /proc/meminfo | awk '{printf \"%.1f GiB\", $2/1048576}'"),
    );
    s.insert("kernel".into(), sh("uname -r"));
    s.insert("load_before".into(), sh("cut -d' ' -f1-3 /proc/loadavg"));
    s.insert("dmp".into(), dmp.display().to_string());
    s.insert(
        "git".into(),
        sh("git rev-parse --short HEAD 2>/dev/null; git status --porcelain 2>/dev/null | head -1"),
    );
    s.insert(
        "command".into(),
        std::env::args().collect::<Vec<_>>().join(" "),
    );
    s.insert("date".into(), chrono::Utc::now().to_rfc3339());
    s
}

async fn phase(
    scenario: &Scenario,
    dmp_bin: &Path,
    out: &Path,
    label: &str,
    extra: &[(&str, &str)],
) -> anyhow::Result<Phase> {
    let run_id = format!("lt{}{}", dmp_core::clock::now_ms(), label.len());
    let dir = out.join(label);
    let _ = std::fs::remove_dir_all(dir.join("data"));
    tracing::info!(phase = label, "starting dmp");
    let dmp = DmpProcess::start(dmp_bin, &dir, scenario, extra, &run_id).await?;
    let mut phase = Phase {
        label: label.to_string(),
        extra_config: extra
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        cold_start_ms: dmp.cold_start.as_secs_f64() * 1000.0,
        ..Phase::default()
    };
    let http = reqwest::Client::new();
    let mut gen = Generator::with_bots(scenario.seed, scenario.users, scenario.bot_share);
    let oracle = Arc::new(Mutex::new(Oracle::for_population(gen.users())));
    let dumps: measure::DumpArrivals = Arc::new(Mutex::new(HashMap::new()));
    let progress = Arc::new(Progress::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let start_ms = dmp_core::clock::now_ms();
    let warmup_ms = scenario.traffic.warmup_seconds as i64 * 1000;
    let latencies = Arc::new(Mutex::new(Latencies::default()));
    let reader = tokio::spawn(measure::read_segments(
        dmp.url.clone(),
        format!("loadtest-{run_id}"),
        start_ms,
        warmup_ms,
        dumps.clone(),
        latencies.clone(),
        stop_rx.clone(),
    ));
    // Samples every second.
    let samples: Arc<Mutex<Vec<(Sample, measure::Scrape)>>> = Arc::new(Mutex::new(Vec::new()));
    let sampler = {
        let (samples, progress, http, url, pid, mut stop) = (
            samples.clone(),
            progress.clone(),
            http.clone(),
            dmp.url.clone(),
            dmp.pid(),
            stop_rx.clone(),
        );
        tokio::spawn(async move {
            let started = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => break,
                }
                let Ok(scrape) = measure::scrape(&http, &url).await else {
                    continue;
                };
                let s = measure::sample_from(
                    &scrape,
                    started.elapsed().as_secs_f64(),
                    progress.offered.load(Ordering::Relaxed),
                    progress.acked.load(Ordering::Relaxed),
                    pid,
                );
                samples.lock().expect("not poisoned").push((s, scrape));
            }
        })
    };
    let target = match scenario.driver.kind {
        DriverKind::Http => Target::Http(dmp.url.clone()),
        DriverKind::Files => {
            let d = dir.join("files");
            std::fs::create_dir_all(&d)?;
            Target::Files {
                dmp: dmp_bin.to_path_buf(),
                dir: d,
                api: dmp.url.clone(),
            }
        }
        DriverKind::Bus => {
            let bus = dmp_bus::open(&scenario.dmp.bus, None, &dmp_core::Config::defaults())?;
            Target::Bus(bus, format!("dmp.events.{run_id}"))
        }
    };
    let traffic_start = Instant::now();
    // The drives of this run share its generator and ground truth.
    let mut drive = Drive {
        target: target.clone(),
        gen: &mut gen,
        oracle: oracle.clone(),
        dumps: dumps.clone(),
        progress: progress.clone(),
        traffic: &scenario.traffic,
        driver: &scenario.driver,
    };
    match scenario.traffic.mode {
        Mode::Open => {
            phase.driven = drive
                .run(scenario.traffic.rate, scenario.traffic.seconds)
                .await;
        }
        Mode::FindMax => {
            let mut rate = scenario.traffic.rate;
            if scenario.traffic.prefill_seconds > 0 {
                tracing::info!(
                    rate,
                    seconds = scenario.traffic.prefill_seconds,
                    "prefill before the steps"
                );
                let d = drive.run(rate, scenario.traffic.prefill_seconds).await;
                phase.driven.seconds += d.seconds;
            }
            for _ in 0..scenario.traffic.max_steps {
                // The step is measured from when its traffic starts: a prerendered drive takes
                // seconds to make, and counted in the step's time they lowered its stored rate
                // (80K/s offered, 75.7K/s "stored" in the first try of `find-max-peak`).
                let prepared = drive.prepare(rate, scenario.traffic.seconds);
                let before = measure::scrape(&http, &dmp.url).await?;
                let lat_before = latencies.lock().expect("not poisoned").series.len();
                let t0 = Instant::now();
                let d = drive.send(prepared).await;
                let after = measure::scrape(&http, &dmp.url).await?;
                let secs = t0.elapsed().as_secs_f64();
                let stored = after.sum("dmp_storage_writer_events_total")
                    - before.sum("dmp_storage_writer_events_total");
                let backlog = progress.acked.load(Ordering::Relaxed) as f64
                    - after.sum("dmp_storage_writer_events_total");
                let p99 = {
                    let l = latencies.lock().expect("not poisoned");
                    let mut v: Vec<u64> = l.series[lat_before..].iter().map(|x| x.1).collect();
                    v.sort_unstable();
                    v.get((v.len() as f64 * 0.99) as usize)
                        .copied()
                        .unwrap_or(0) as f64
                };
                let sustained = stored / secs >= 0.95 * rate
                    && backlog < rate
                    && p99 <= 2000.0
                    && d.acked as f64 >= 0.99 * d.offered as f64;
                tracing::info!(
                    rate,
                    stored_rate = stored / secs,
                    backlog,
                    p99,
                    sustained,
                    "step"
                );
                phase.steps.push(Step {
                    rate,
                    stored_rate: stored / secs,
                    backlog,
                    p99_ms: p99,
                    sustained,
                });
                // The drives' counts are the run's so far; their seconds are their own.
                phase.driven.offered = d.offered;
                phase.driven.acked = d.acked;
                phase.driven.retries = d.retries;
                phase.driven.seconds += d.seconds;
                phase.driven.ack_latency_ms = d.ack_latency_ms;
                if !sustained {
                    break;
                }
                phase.max_sustained_rate = Some(rate);
                rate *= scenario.traffic.step_factor;
            }
        }
    }
    let traffic_end = Instant::now();
    tracing::info!(
        offered = phase.driven.offered,
        acked = phase.driven.acked,
        secs = phase.driven.seconds,
        "traffic done"
    );

    let drained = wait_drained(&http, &dmp.url, &progress, Duration::from_secs(900)).await;
    phase.drain_seconds = drained.map(|_| traffic_end.elapsed().as_secs_f64());
    let drained_secs = traffic_start.elapsed().as_secs_f64();
    tracing::info!(drain_seconds = ?phase.drain_seconds, "pipeline drained");
    if scenario.checks.correctness {
        phase.correctness = Some(check_users(&dmp.url, &gen, &oracle).await);
    }
    // Rates: from the first sample after the warmup to the last one of the traffic. Work (CPU,
    // the shares of changes): from the same start to the first sample after the drain, since a
    // segmenter that fell behind does its share of the work after the traffic.
    {
        let all = samples.lock().expect("not poisoned");
        let traffic_secs = traffic_end.duration_since(traffic_start).as_secs_f64();
        let first = all
            .iter()
            .find(|(s, _)| s.t >= scenario.traffic.warmup_seconds as f64);
        let last = all.iter().rev().find(|(s, _)| s.t <= traffic_secs + 0.5);
        let done = all.iter().find(|(s, _)| s.t >= drained_secs).or(all.last());
        if let (Some((a, sa)), Some((b0, _)), Some((b, sb))) = (first, last, done) {
            let secs = (b0.t - a.t).max(1e-9);
            phase.stored_rate = (b0.stored - a.stored) / secs;
            let stored = b.stored - a.stored;
            let per_1k = |x: f64| {
                if stored > 0.0 {
                    x / (stored / 1000.0)
                } else {
                    0.0
                }
            };
            let mut total = 0.0;
            for (role, cpu) in &b.cpu {
                let used = cpu - a.cpu.get(role).copied().unwrap_or(0.0);
                total += used;
                phase
                    .cpu_per_1k_events
                    .insert(role.to_string(), per_1k(used));
            }
            phase
                .cpu_per_1k_events
                .insert("total".into(), per_1k(total));
            let wall = (b.t - a.t).max(1e-9);
            for (role, wait) in &b.cpu_wait {
                let waited = wait - a.cpu_wait.get(role).copied().unwrap_or(0.0);
                phase
                    .cpu_wait_per_s
                    .insert(role.to_string(), waited.max(0.0) / wall);
            }
            // Over the same samples as dmp's: until 2026-11-23 this was the whole run's CPU
            // prorated, which counted the generation of the sessions under way at the start and
            // the correctness check's lookups after the drain.
            phase.loadtest_cpu_per_1k_events = per_1k(b.loadtest_cpu - a.loadtest_cpu);
            let changes = b.changes - a.changes;
            phase.changes = changes;
            if changes > 0.0 {
                phase.share_evaluated = (b.evaluated - a.evaluated) / changes;
                phase.share_duplicate = (b.duplicate - a.duplicate) / changes;
                phase.share_bot = (b.bot - a.bot) / changes;
            }
            for (topic, metric) in [
                ("dmp.events", "dmp_storage_writer_topic_wait_seconds"),
                ("dmp.user-changes", "dmp_segmenter_topic_wait_seconds"),
            ] {
                let (ba, bb) = (sa.buckets(metric), sb.buckets(metric));
                if let (Some(p50), Some(p99)) = (
                    measure::quantile_between(&ba, &bb, 0.5),
                    measure::quantile_between(&ba, &bb, 0.99),
                ) {
                    phase.topic_wait_s.insert(topic.to_string(), (p50, p99));
                }
            }
        }
        phase.samples = all.iter().map(|(s, _)| s.clone()).collect();
        phase.peak_rss_mib =
            phase.samples.iter().map(|s| s.peak_rss).max().unwrap_or(0) as f64 / 1_048_576.0;
        phase.memtables_peak_mib = phase
            .samples
            .iter()
            .map(|s| s.memtable_bytes)
            .fold(0.0, f64::max)
            / 1_048_576.0;
    }
    if scenario.checks.audience {
        let bots = phase
            .correctness
            .as_ref()
            .map(|c| c.bots_never_counted.clone())
            .unwrap_or_default();
        phase.audience = check_audience(&dmp.url, &oracle, &bots).await?;
    }
    if scenario.checks.lookup_rate > 0.0 {
        let uids: Vec<String> = {
            let o = oracle.lock().expect("not poisoned");
            o.active().map(|u| gen.users()[u].uid.clone()).collect()
        };
        // Lookups are measured against a settled dmp: the background work the traffic left
        // (flushes, compactions) is waited out, up to a minute, so the figure is the lookup
        // path's own.
        let settle = Instant::now();
        let busy = |pid| crate::process::cpu_by_role(pid).values().sum::<f64>();
        let mut before = busy(dmp.pid());
        while settle.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = busy(dmp.pid());
            if now - before < 0.1 {
                break;
            }
            before = now;
        }
        phase.lookup_settle_seconds = settle.elapsed().as_secs_f64();
        tracing::info!(
            rate = scenario.checks.lookup_rate,
            settled_after = phase.lookup_settle_seconds,
            "lookups"
        );
        phase.lookups = Some(
            measure::lookups(
                &dmp.url,
                Arc::new(uids),
                scenario.checks.lookup_rate,
                scenario.checks.lookup_seconds,
                scenario.checks.lookup_connections,
                scenario.seed,
            )
            .await,
        );
    }
    let _ = stop_tx.send(true);
    let _ = sampler.await;
    let _ = reader.await;
    {
        let l = latencies.lock().expect("not poisoned");
        phase.event_to_segment_ms = Percentiles::of(&l.all, 1.0);
        phase.latency_series = l.series.clone();
        phase.segment_records = l.records;
        phase.segment_records_after_dumps = l.skipped_dump;
    }
    phase.graceful_stop = dmp.stop(Duration::from_secs(60))?;
    // The data directory of a big run is gigabytes; the report and dmp.log stay.
    let _ = std::fs::remove_dir_all(dir.join("data"));
    let _ = std::fs::remove_dir_all(dir.join("spill"));
    Ok(phase)
}

/// Waits until the storage writer has written every acknowledged event and the segmenter has
/// received every change the writer emitted, with both counts still for a second (a change is
/// counted when a worker takes it, and evaluated right after).
async fn wait_drained(
    http: &reqwest::Client,
    base: &str,
    progress: &Progress,
    timeout: Duration,
) -> Option<()> {
    let deadline = Instant::now() + timeout;
    let mut last = (f64::NAN, f64::NAN);
    let mut still = 0;
    while Instant::now() < deadline {
        if let Ok(s) = measure::scrape(http, base).await {
            let stored = s.sum("dmp_storage_writer_events_total");
            let emitted = s.sum("dmp_storage_writer_changes_emitted_total");
            let received = s.sum("dmp_segmenter_changes_received_total");
            let acked = progress.acked.load(Ordering::Relaxed) as f64;
            if stored >= acked && received >= emitted && (stored, received) == last {
                still += 1;
                if still >= 4 {
                    return Some(());
                }
            } else {
                still = 0;
            }
            last = (stored, received);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    None
}

/// Looks every user up once its newest event has been evaluated and compares with the truth.
async fn check_users(base: &str, gen: &Generator, oracle: &Arc<Mutex<Oracle>>) -> Correctness {
    let users: Vec<(String, bool, Vec<&'static str>, Option<i64>)> = {
        let o = oracle.lock().expect("not poisoned");
        o.active()
            .map(|u| {
                let user = &gen.users()[u];
                (user.uid.clone(), user.bot, o.expected(u), o.last_ts(u))
            })
            .collect()
    };
    tracing::info!(
        users = users.len(),
        "checking every user against the ground truth"
    );
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(32)
        .build()
        .expect("an HTTP client");
    let sem = Arc::new(tokio::sync::Semaphore::new(32));
    let mut tasks = tokio::task::JoinSet::new();
    for (uid, bot, expected, last_ts) in users {
        let (http, sem, base) = (http.clone(), sem.clone(), base.to_string());
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await.expect("open semaphore");
            // Humans: wait (up to 3 x 10 s) until their newest event is evaluated. Bots are
            // blacklisted, so never evaluated with their newest events: they are read as they
            // are, and must be in no segment (they crawl pages no rule looks at).
            let url = match (bot, last_ts) {
                (false, Some(ts)) => {
                    format!("{base}/v1/users/{uid}/segments?min_event_ts={ts}&wait_ms=10000")
                }
                _ => format!("{base}/v1/users/{uid}/segments"),
            };
            let mut answer = None;
            for _ in 0..3 {
                match http.get(&url).send().await {
                    Ok(r) if r.status().is_success() => {
                        let v: serde_json::Value = r.json().await.unwrap_or_default();
                        let fresh = v["fresh"].as_bool().unwrap_or(true);
                        answer = Some((v, fresh));
                        if fresh {
                            break;
                        }
                    }
                    Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND && bot => {
                        answer = Some((serde_json::json!({"segments": []}), true));
                        break;
                    }
                    _ => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
            (uid, bot, expected, answer)
        });
    }
    let mut c = Correctness::default();
    while let Some(Ok((uid, bot, expected, answer))) = tasks.join_next().await {
        c.users += 1;
        c.bots += bot as u64;
        let Some((v, fresh)) = answer else {
            c.errors += 1;
            continue;
        };
        if !fresh {
            c.not_evaluated += 1;
        }
        let got: Vec<String> = v["segments"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s["id"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let mut got_sorted = got.clone();
        got_sorted.sort();
        // A bot may have been blacklisted before its first evaluation: then it has no segment.
        let right = got_sorted == expected || (bot && got_sorted.is_empty());
        if bot && got_sorted.is_empty() && !expected.is_empty() {
            for s in &expected {
                *c.bots_never_counted.entry(s.to_string()).or_default() += 1;
            }
            if expected.contains(&BOTH.0) && expected.contains(&BOTH.1) {
                *c.bots_never_counted.entry(both_expr()).or_default() += 1;
            }
        }
        if !right {
            c.wrong_total += 1;
            if c.wrong.len() < 20 {
                c.wrong.push(Wrong {
                    uid,
                    bot,
                    expected: expected.iter().map(|s| s.to_string()).collect(),
                    got,
                });
            }
        }
    }
    c
}

/// The intersection the audience check asks about.
const BOTH: (&str, &str) = ("cat_lovers", "mortgage_seekers");

fn both_expr() -> String {
    format!("{} and {}", BOTH.0, BOTH.1)
}

/// Audience estimates of each segment and of one intersection over the days of the run.
async fn check_audience(
    base: &str,
    oracle: &Arc<Mutex<Oracle>>,
    bots_never_counted: &BTreeMap<String, u64>,
) -> anyhow::Result<Vec<AudienceCheck>> {
    let (sizes, both) = {
        let o = oracle.lock().expect("not poisoned");
        (o.segment_sizes(), o.both(BOTH.0, BOTH.1))
    };
    let day = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let yesterday = (chrono::Utc::now() - chrono::Duration::days(1))
        .format("%Y-%m-%d")
        .to_string();
    let http = reqwest::Client::new();
    let mut out = Vec::new();
    let mut exprs: Vec<(String, u64)> =
        SEGMENTS.iter().map(|s| (s.to_string(), sizes[s])).collect();
    exprs.push((both_expr(), both));
    for (expr, members) in exprs {
        let bots = bots_never_counted.get(&expr).copied().unwrap_or(0);
        let truth = members - bots;
        // The run may cross midnight (UTC): users are counted on the day they were evaluated.
        let v: serde_json::Value = http
            .get(format!("{base}/v1/audience"))
            .query(&[("expr", expr.as_str()), ("from", &yesterday), ("to", &day)])
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let (estimate, low, high) = (
            v["estimate"].as_u64().unwrap_or(0),
            v["low"].as_u64().unwrap_or(0),
            v["high"].as_u64().unwrap_or(0),
        );
        out.push(AudienceCheck {
            expr,
            truth,
            bots_never_counted: bots,
            estimate,
            low,
            high,
            method: v["method"].as_str().unwrap_or("").to_string(),
            within: (low..=high).contains(&truth),
        });
    }
    Ok(out)
}

/// `loadtest/runs/<date>-<machine>/<scenario>` under `root`.
pub fn run_dir(root: &Path, scenario: &Scenario) -> PathBuf {
    let host = std::process::Command::new("hostname")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "machine".into());
    root.join(format!("{}-{host}", chrono::Utc::now().format("%Y-%m-%d")))
        .join(&scenario.name)
}
