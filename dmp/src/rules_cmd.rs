//! `dmp rules check FILE` and `dmp rules test FILE --events sample.jsonl`.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Subcommand;

use dmp_core::event::EventLimits;
use dmp_core::{Config, Event, Row};
use dmp_rules::RuleSet;
use dmp_storage_writer::cells::event_cells;
use dmp_storage_writer::Enricher;

/// `dmp rules …`
#[derive(Subcommand, Debug)]
pub enum RulesCommand {
    /// Validate a rule file (with the built-in rules): every error with file, line and column.
    Check {
        /// The rule file (TOML).
        file: PathBuf,
    },
    /// Show which segments each user of a sample gets, and why.
    Test {
        /// The rule file (TOML).
        file: PathBuf,
        /// Sample events, one JSON event per line (the ingest format).
        #[arg(long)]
        events: PathBuf,
        /// Evaluate as of this time (RFC 3339 or epoch ms; default: now).
        #[arg(long)]
        now: Option<String>,
    },
}

fn load(file: &std::path::Path) -> anyhow::Result<RuleSet> {
    match RuleSet::load(file) {
        Ok(set) => Ok(set),
        Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            bail!("{} error(s) in {}", errors.len(), file.display())
        }
    }
}

/// Runs a `dmp rules` command.
pub fn run(cfg: &Config, cmd: RulesCommand) -> anyhow::Result<()> {
    match cmd {
        RulesCommand::Check { file } => {
            let set = load(&file)?;
            let ids: Vec<&str> = set.rules().iter().map(|r| r.id()).collect();
            crate::out(format_args!(
                "{}: ok, rule set version {:?}, {} segments: {}",
                file.display(),
                set.version(),
                ids.len(),
                ids.join(", ")
            ))
        }
        RulesCommand::Test { file, events, now } => {
            let set = load(&file)?;
            let now = match now {
                None => dmp_core::clock::now_ms(),
                Some(t) => t
                    .parse::<i64>()
                    .or_else(|_| {
                        chrono::DateTime::parse_from_rfc3339(&t).map(|d| d.timestamp_millis())
                    })
                    .with_context(|| format!("--now {t:?} is not RFC 3339 or epoch ms"))?,
            };
            let mut enricher = Enricher::from_config(&cfg.storage_writer)?;
            let reader = std::io::BufReader::new(
                std::fs::File::open(&events)
                    .with_context(|| format!("cannot open {}", events.display()))?,
            );
            let mut rows: BTreeMap<String, Row> = BTreeMap::new();
            for (i, line) in reader.lines().enumerate() {
                let line = line?;
                if line.trim().is_empty() {
                    continue;
                }
                let ev = Event::parse(line.as_bytes(), now, &EventLimits::default())
                    .map_err(|e| anyhow::anyhow!("{}:{}: {e}", events.display(), i + 1))?;
                let en = enricher.enrich(ev.ip.as_deref(), ev.ua.as_deref());
                let row = rows.entry(ev.uid.clone()).or_insert_with(|| Row {
                    key: ev.uid.clone(),
                    cells: Vec::new(),
                });
                row.cells.extend(event_cells(ev, &en));
            }
            for (uid, mut row) in rows {
                row.sort();
                // Keep the earliest first_seen, as the store's single version does.
                let mut seen = false;
                row.cells.retain(|c| {
                    if c.family == "m" && c.qualifier == "first_seen" {
                        let keep = !seen;
                        seen = true;
                        keep
                    } else {
                        true
                    }
                });
                let e = set.explain(&row, now);
                let live: Vec<&str> = e.live.keys().map(String::as_str).collect();
                let shadow: Vec<&str> = e.shadow.keys().map(String::as_str).collect();
                crate::out(format_args!(
                    "{uid}: {}{}",
                    if live.is_empty() {
                        "(no segments)".to_string()
                    } else {
                        live.join(", ")
                    },
                    if shadow.is_empty() {
                        String::new()
                    } else {
                        format!("  [shadow: {}]", shadow.join(", "))
                    }
                ))?;
                for (id, o) in e.live.iter().chain(e.shadow.iter()) {
                    for ev in &o.evidence {
                        let when = chrono::DateTime::from_timestamp_millis(ev.ts)
                            .map(|d| d.to_rfc3339())
                            .unwrap_or_default();
                        let cells: Vec<String> = ev
                            .cells
                            .iter()
                            .filter(|(q, _)| !q.starts_with("ua") && q != "ip")
                            .map(|(q, v)| format!("{q}={v}"))
                            .collect();
                        crate::out(format_args!("    {id} <- {when} {}", cells.join(" ")))?;
                    }
                }
                if let Some(t) = e.recheck_at {
                    let when = chrono::DateTime::from_timestamp_millis(t)
                        .map(|d| d.to_rfc3339())
                        .unwrap_or_default();
                    crate::out(format_args!(
                        "    (results can change without new events at {when})"
                    ))?;
                }
            }
            Ok(())
        }
    }
}
