//! Each role's `run`, started alone (`dmp api`, `dmp storage-writer`) or together (`dmp run`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;

use dmp_api::ingest::Ingest;
use dmp_api::spill::Spill;
use dmp_core::Config;
use dmp_storage_writer::{Enricher, StorageWriter};

use crate::backends::Backends;

/// Which roles a process runs.
#[derive(Debug, Clone, Copy)]
pub struct Roles {
    /// The HTTP API with ingest.
    pub api: bool,
    /// The storage writer.
    pub storage_writer: bool,
    /// The segmenter.
    pub segmenter: bool,
}

impl Roles {
    /// Every role (`dmp run`).
    pub const ALL: Roles = Roles {
        api: true,
        storage_writer: true,
        segmenter: true,
    };
    /// No role; set the ones wanted.
    pub const NONE: Roles = Roles {
        api: false,
        storage_writer: false,
        segmenter: false,
    };
}

/// Runs the roles until SIGTERM or Ctrl-C, then drains: the API stops accepting, the writer
/// finishes and commits its batch, the database is synced.
pub async fn run(cfg: Config, roles: Roles, listen: Option<String>) -> anyhow::Result<()> {
    run_with(cfg, roles, listen, false).await
}

/// [`run`], with `demo`: generated traffic posted to this process's own API, and the demo rules
/// (`loadtest/scenarios/demo-rules.toml`) when no rule file is configured.
pub async fn run_with(
    mut cfg: Config,
    roles: Roles,
    listen: Option<String>,
    demo: bool,
) -> anyhow::Result<()> {
    if demo && cfg.segmenter.rules.is_empty() {
        std::fs::create_dir_all(&cfg.data_dir)
            .with_context(|| format!("cannot create {}", cfg.data_dir.display()))?;
        let path = cfg.data_dir.join("demo-rules.toml");
        std::fs::write(&path, dmp_loadtest::generator::DEMO_RULES)
            .with_context(|| format!("cannot write {}", path.display()))?;
        cfg.segmenter.rules = path.display().to_string();
    }
    let prometheus = dmp_core::telemetry::init_metrics();
    let started = std::time::Instant::now();
    let backends = Backends::open(&cfg).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    // The consuming roles' progress, for /readyz.
    let progress = Arc::new(dmp_core::health::Progress::default());
    // Deleted users: the API adds to it, the storage writer drops their events.
    let suppressions = Arc::new(dmp_store::suppress::Suppressions::default());

    if roles.storage_writer {
        let enricher = Enricher::from_config(&cfg.storage_writer)?;
        let writer =
            StorageWriter::new(backends.bus.clone(), backends.store.clone(), &cfg, enricher)
                .with_progress(progress.clone())
                .with_suppressions(suppressions.clone());
        // Its own thread and runtime: the writer's CPU is then its own (per-role CPU in the
        // loadtest, `top -H`), and the API's tasks cannot delay it.
        let rx = stop_rx.clone();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("dmp-writer".into())
            .spawn(move || {
                let r = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .thread_name("dmp-writer")
                    .build()
                    .map_err(anyhow::Error::from)
                    .and_then(|rt| rt.block_on(writer.run(rx)).map_err(anyhow::Error::from));
                let _ = done_tx.send(r);
            })
            .context("cannot start the storage writer's thread")?;
        tasks.push((
            "storage-writer",
            tokio::spawn(async move {
                done_rx.await.unwrap_or_else(|_| {
                    Err(anyhow::anyhow!("the storage writer's thread panicked"))
                })
            }),
        ));
    }

    // One counters instance for the segmenter and the audience endpoints of this process.
    let counters = if roles.segmenter || roles.api {
        let c = dmp_stats::open(&cfg.backends.stats, backends.db.as_ref(), &cfg.stats)?;
        tracing::info!(backend = c.backend_name(), "segment counters");
        Some(c)
    } else {
        None
    };

    if roles.segmenter {
        let mut seg =
            dmp_segmenter::Segmenter::new(backends.bus.clone(), backends.store.clone(), &cfg)?;
        if let Some(c) = &counters {
            seg = seg.with_counters(c.clone());
        }
        seg = seg.with_progress(progress.clone());
        let rx = stop_rx.clone();
        tasks.push((
            "segmenter",
            tokio::spawn(async move { seg.run(rx).await.map_err(anyhow::Error::from) }),
        ));
    }

    let mut server = None;
    if roles.api {
        let spill = Arc::new(Spill::open(&cfg.spill_dir(), cfg.spill.max_bytes)?);
        let replay = spill.spawn_replay(
            backends.bus.clone(),
            cfg.topics.events.clone(),
            Duration::from_millis(cfg.spill.replay_interval_ms),
            Duration::from_millis(cfg.api.ingest_timeout_ms.max(5000)),
            stop_rx.clone(),
        );
        tasks.push((
            "spill-replay",
            tokio::spawn(async move { replay.await.map_err(anyhow::Error::from) }),
        ));
        let ingest = Arc::new(Ingest::new(
            backends.bus.clone(),
            cfg.topics.events.clone(),
            spill,
            cfg.api.clone(),
        ));
        let listen = listen.unwrap_or_else(|| cfg.api.listen.clone());
        let listener = tokio::net::TcpListener::bind(&listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let addr = listener.local_addr()?;
        let state = dmp_api::AppState {
            counters: counters.clone(),
            rules: Some(rules_fn(&cfg)?),
            auth: Arc::new(dmp_api::auth::Auth::from_api_config(&cfg.api)),
            stopping: stop_rx.clone(),
            suppressions: roles.storage_writer.then(|| suppressions.clone()),
            progress: (roles.storage_writer || roles.segmenter).then(|| {
                (
                    progress.clone(),
                    Duration::from_secs(cfg.api.ready_stuck_secs),
                )
            }),
            ..dmp_api::AppState::new(
                backends.bus.clone(),
                backends.store.clone(),
                prometheus,
                ingest,
                &cfg,
            )
        };
        let mut rx = stop_rx.clone();
        server = Some(tokio::spawn(async move {
            dmp_api::serve(listener, state, async move {
                let _ = rx.changed().await;
            })
            .await
        }));
        crate::out(format_args!(
            "dmp is ready: http://{addr}/  (POST /v1/events, GET /px.gif, /healthz, /readyz, /metrics, /v1/topics)"
        ))?;
        if demo {
            let key = cfg
                .api
                .keys
                .ingest
                .first()
                .or(cfg.api.keys.admin.first())
                .cloned();
            tasks.push((
                "demo",
                tokio::spawn(demo_traffic(format!("http://{addr}"), key, stop_rx.clone())),
            ));
            crate::out(format_args!(
                "demo: posting generated traffic (about 200 events/s); open http://{addr}/ for the planner, \
                 or curl http://{addr}/v1/segments"
            ))?;
        }
    } else {
        crate::out(format_args!("dmp is ready (roles: {roles:?})"))?;
    }
    tracing::info!(
        ?roles,
        bus = %cfg.backends.bus,
        store = %cfg.backends.store,
        data_dir = %cfg.data_dir.display(),
        startup_ms = started.elapsed().as_millis() as u64,
        "dmp is ready"
    );

    // Run until a signal, or until a role fails.
    let failed = tokio::select! {
        _ = crate::shutdown_signal() => None,
        r = first_exit(&mut tasks) => Some(r),
    };
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    if let Some(server) = server {
        server.await??;
    }
    let mut result = Ok(());
    if let Some((name, r)) = failed {
        result = r.with_context(|| format!("role {name} stopped"));
    }
    for (name, t) in tasks {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = result.and(Err(e.context(format!("role {name}")))),
            Err(e) => result = result.and(Err(anyhow::anyhow!("role {name} panicked: {e}"))),
        }
    }
    backends.close()?;
    result
}

type Task = (&'static str, tokio::task::JoinHandle<anyhow::Result<()>>);

/// Waits for the first role task to end (they only end on failure before shutdown) and takes it
/// out of `tasks`.
async fn first_exit(tasks: &mut Vec<Task>) -> (&'static str, anyhow::Result<()>) {
    if tasks.is_empty() {
        return std::future::pending().await;
    }
    loop {
        if let Some(i) = tasks.iter().position(|(_, t)| t.is_finished()) {
            let (name, t) = tasks.remove(i);
            let r = t
                .await
                .unwrap_or_else(|e| Err(anyhow::anyhow!("panicked: {e}")));
            return (name, r);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The rule set in force for the API's explanations: the rule file (watched) or the built-in
/// rules, as the segmenter loads them.
fn rules_fn(cfg: &Config) -> anyhow::Result<dmp_api::lookup::RulesFn> {
    if cfg.segmenter.rules.is_empty() {
        let set = Arc::new(
            dmp_rules::RuleSet::new(
                "builtin".into(),
                dmp_rules::builtin::builtin_rules(),
                "built-in rules",
            )
            .map_err(|e| anyhow::anyhow!("{e:?}"))?,
        );
        return Ok(Arc::new(move || set.clone()));
    }
    let w = dmp_rules::RuleWatcher::start(
        cfg.segmenter.rules.clone().into(),
        Duration::from_millis(cfg.segmenter.reload_interval_ms),
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "{}",
            e.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        )
    })?;
    Ok(Arc::new(move || w.current()))
}

/// Posts generated traffic (sessions of 2,000 users, about 200 events/s) to the API at `base`
/// until `stop`.
async fn demo_traffic(
    base: String,
    key: Option<String>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut gen = dmp_loadtest::generator::Generator::new(dmp_core::clock::now_ms() as u64, 2_000);
    let http = reqwest::Client::new();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            _ = tick.tick() => {}
        }
        let batch = gen.batch(dmp_core::clock::now_ms(), 100);
        let mut req = http.post(format!("{base}/v1/events")).json(&batch);
        if let Some(k) = &key {
            req = req.bearer_auth(k);
        }
        match req.send().await {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => tracing::warn!(status = %r.status(), "demo traffic refused"),
            Err(e) => tracing::warn!(error = %e, "demo traffic not posted"),
        }
    }
}
