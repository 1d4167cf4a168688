//! `dmp`: the one binary. It parses flags, loads the layered config and calls each role.
//!
//! - `dmp run`: every role that exists in one process, on embedded backends by default (data in
//!   `--data-dir`), serving the HTTP API;
//! - `dmp config check`: loads and validates the configuration and prints the effective one;
//! - `dmp topics create|list`: creates dmp's topics, lists topics with their offsets.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 bad usage or bad configuration.

mod audience_cmd;
mod backends;
mod import;
mod memory;
mod replay_cmd;
mod roles;
mod rules_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use dmp_core::Config;

/// mimalloc: the store's reads build hundreds of small cells per row; with the system allocator a
/// 500-cell row read costs about 25% more (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `purge_delay` option (its index in `mi_option_e`, mimalloc.h; a test checks it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps the memory dmp frees instead of returning it to the OS after mimalloc's purge delay
/// (1 s). dmp frees and allocates row-sized buffers all the time, and every purged page came back
/// as a page fault (with transparent huge pages, 2 MiB zeroed at a time): 5% of the segmenter's
/// samples at 30K events/s, about 3% of the CPU per event (docs/benchmarks.md). dmp's memory is
/// bounded by its caches and buffers, so the resident size stays at its high-water mark instead.
/// The environment variable `MIMALLOC_PURGE_DELAY` (ms; -1: never) decides when it is set.
#[allow(unsafe_code)]
fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: called first in `main`, before any other thread exists (mimalloc's option
        // setter is not thread-safe); the index is the purge delay's, as the test below checks.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
    }
}

#[derive(Parser)]
#[command(
    name = "dmp",
    version,
    about = "dmp: a real-time user segmentation engine",
    long_about = "dmp stores web and app events per user, segments users with rules as they act, \
                  and serves segments to partners, lookups and audience estimates.\n\n\
                  Configuration layers: built-in defaults (config/dmp.toml), then --config FILE, \
                  then DMP__SECTION__KEY environment variables."
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Global {
    /// A TOML file layered over the built-in defaults.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Where the embedded backends keep their data (overrides `data_dir`).
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run every role in one process and serve the HTTP API (embedded backends by default).
    Run {
        /// Listen address of the HTTP API (overrides `api.listen`).
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
        /// Also post generated traffic (and use the demo rules unless segmenter.rules is set),
        /// so segments and audiences appear within seconds.
        #[arg(long)]
        demo: bool,
    },
    /// Run the HTTP API alone (ingest with its spill; needs a bus another process does not own).
    Api {
        /// Listen address (overrides `api.listen`).
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
    },
    /// Run the storage writer alone: dmp.events to the user store and dmp.user-changes.
    StorageWriter,
    /// Run the segmenter alone: dmp.user-changes to dmp.segments with the rules of segmenter.rules.
    Segmenter,
    /// Import partner files (JSONL or TSV with a header line, plain or gzip) into dmp.events.
    Import(import::ImportArgs),
    /// Estimate an audience: users in an expression of segments over days (asks a running dmp).
    Audience(audience_cmd::AudienceArgs),
    /// Move a consumer group back (or forward) to a time, e.g. a partner re-reading dmp.segments.
    Replay(replay_cmd::ReplayArgs),
    /// Check segment rule files and try them on sample events.
    Rules {
        #[command(subcommand)]
        command: rules_cmd::RulesCommand,
    },
    /// Inspect the configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Manage topics on the configured bus.
    Topics {
        #[command(subcommand)]
        command: TopicsCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Load and validate the configuration, then print the effective one.
    Check,
}

#[derive(Subcommand)]
enum TopicsCommand {
    /// Create dmp's topics (or one named topic) if they do not exist.
    Create {
        /// Create only this topic.
        #[arg(long)]
        topic: Option<String>,
        /// Partitions (default: `topics.partitions`).
        #[arg(long)]
        partitions: Option<u32>,
    },
    /// List topics with the low and high offset of each partition.
    List,
}

fn load_config(g: &Global) -> Result<(Config, String), dmp_core::config::ConfigError> {
    let (mut cfg, text) = Config::load_effective(g.config.as_deref(), std::env::vars())?;
    if let Some(dir) = &g.data_dir {
        cfg.data_dir = dir.clone();
    }
    Ok((cfg, text))
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    let (cfg, effective) = match load_config(&cli.global) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dmp: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    dmp_core::telemetry::init_tracing(&cfg.telemetry);
    let serves = matches!(
        cli.command,
        Command::Run { .. } | Command::Api { .. } | Command::StorageWriter | Command::Segmenter
    );
    if serves && cfg.memory.pretouch_mb > 0 {
        match memory::pretouch(cfg.memory.pretouch_mb) {
            Ok(p) => tracing::info!(
                mb = p.mb,
                seconds = p.took.as_secs_f64(),
                "memory faulted in and handed to the allocator (memory.pretouch_mb)"
            ),
            Err(e @ memory::PretouchError::TooLarge { .. }) => {
                eprintln!("dmp: configuration error: {e}");
                return ExitCode::from(2);
            }
            Err(e) => {
                eprintln!("dmp: {e}");
                return ExitCode::from(1);
            }
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("dmp-rt")
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dmp: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Run { listen, demo } => {
                roles::run_with(cfg, roles::Roles::ALL, listen, demo).await
            }
            Command::Api { listen } => {
                let roles = roles::Roles {
                    api: true,
                    ..roles::Roles::NONE
                };
                roles::run(cfg, roles, listen).await
            }
            Command::StorageWriter => {
                let roles = roles::Roles {
                    storage_writer: true,
                    ..roles::Roles::NONE
                };
                roles::run(cfg, roles, None).await
            }
            Command::Segmenter => {
                let roles = roles::Roles {
                    segmenter: true,
                    ..roles::Roles::NONE
                };
                roles::run(cfg, roles, None).await
            }
            Command::Import(args) => import::run(cfg, args).await,
            Command::Audience(args) => audience_cmd::run(cfg, args).await,
            Command::Replay(args) => replay_cmd::run(cfg, args).await,
            Command::Rules { command } => rules_cmd::run(&cfg, command),
            Command::Config {
                command: ConfigCommand::Check,
            } => out(format_args!(
                "# configuration is valid; effective values:\n{effective}"
            )),
            Command::Topics { command } => topics(cfg, command).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dmp: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Prints a line to stdout; a closed pipe (`dmp topics list | head`) is not an error.
pub(crate) fn out(line: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    use std::io::Write;
    match writeln!(std::io::stdout().lock(), "{line}") {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

async fn topics(cfg: Config, command: TopicsCommand) -> anyhow::Result<()> {
    let (db, bus) = backends::Backends::open_bus_only(&cfg)?;
    match command {
        TopicsCommand::Create { topic, partitions } => {
            let partitions = partitions.unwrap_or(cfg.topics.partitions);
            let names: Vec<String> = match topic {
                Some(t) => vec![t],
                None => cfg.topics.all().iter().map(|s| s.to_string()).collect(),
            };
            for name in names {
                let cleanup = if cfg.topics.compacted(&name) {
                    dmp_bus::Cleanup::Compact
                } else {
                    dmp_bus::Cleanup::Delete
                };
                let created = bus.create_topic_with(&name, partitions, cleanup).await?;
                let what = if created {
                    let how = if cleanup == dmp_bus::Cleanup::Compact {
                        ", compacted"
                    } else {
                        ""
                    };
                    format!("created with {partitions} partitions{how}")
                } else {
                    "exists".to_string()
                };
                out(format_args!("{name}: {what}"))?;
            }
        }
        TopicsCommand::List => {
            out(format_args!(
                "{:<32} {:>9} {:>14} {:>14}",
                "topic", "partition", "low", "high"
            ))?;
            for t in bus.topics().await? {
                for o in bus.offsets(&t.name).await? {
                    out(format_args!(
                        "{:<32} {:>9} {:>14} {:>14}",
                        t.name, o.partition, o.low, o.high
                    ))?;
                }
            }
        }
    }
    drop(bus);
    backends::close_db(db.as_ref())
}

#[cfg(test)]
mod tests {
    #[test]
    #[allow(unsafe_code)]
    fn given_mimalloc_when_option_15_is_read_then_it_is_the_purge_delay() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return; // the environment decides the value: nothing to recognise it by
        }
        // SAFETY: reading an option is thread-safe once mimalloc is initialised (at load).
        let value = unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        // mimalloc 3's default purge delay (options.c); no other option defaults to 1000.
        assert_eq!(value, 1000, "option 15 is not mimalloc's purge_delay");
    }
}
