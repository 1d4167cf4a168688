//! `dmp-loadtest --scenario loadtest/scenarios/peak.toml`: runs a scenario against a fresh
//! `dmp run` and writes the report and charts under `loadtest/runs/<date>-<machine>/<scenario>/`.
//! Exits non-zero when the run's correctness checks fail (CI runs a short scenario that way).

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

use dmp_loadtest::{report, run, scenario::Scenario};

/// Runs a loadtest scenario against dmp.
#[derive(Parser)]
#[command(name = "dmp-loadtest", version)]
struct Args {
    /// The scenario file.
    #[arg(long, value_name = "FILE")]
    scenario: PathBuf,
    /// The dmp binary (default: `dmp` next to this executable).
    #[arg(long, value_name = "PATH")]
    dmp: Option<PathBuf>,
    /// Where run directories go.
    #[arg(long, value_name = "DIR", default_value = "loadtest/runs")]
    runs: PathBuf,
    /// Write the run here instead of `<runs>/<date>-<machine>/<scenario>`.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let scenario = Scenario::load(&args.scenario)?;
    let dmp = dmp_loadtest::process::find_dmp(args.dmp.as_deref())?;
    let out = args
        .out
        .unwrap_or_else(|| run::run_dir(&args.runs, &scenario));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = rt.block_on(run::run(&scenario, &dmp, &out))?;
    std::fs::write(out.join("scenario.toml"), std::fs::read(&args.scenario)?)
        .context("copying the scenario")?;
    report::write(&report, &out)?;
    println!("{}", report::summary(&report));
    println!("report: {}", out.join("report.json").display());
    report::verdict(&report)
}
