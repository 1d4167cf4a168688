//! `dmp import`: partner files into `dmp.events`.
//!
//! JSONL (one event per line) or TSV (a header line names the columns: `uid`, `ts`, `type`, `url`,
//! `ref`, `q`, `ip`, `ua`, `src`, and `a.<name>` for custom attributes), plain or gzip (detected by
//! content). Each line is validated here, so bad lines are reported with their line numbers, in
//! the summary and in a rejects file, and never stop the import. Lines go in batches: with the
//! embedded bus, to the running `dmp run` over its HTTP API (the database belongs to that
//! process); with Kafka, straight to the topic.
//!
//! Resume: after each acknowledged batch, `<FILE>.dmp-import` records the lines done and the
//! default timestamp of lines without `ts` (the time the import first started), so running the
//! same command again continues where it stopped and sends identical events: nothing is
//! duplicated in the store.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde::{Deserialize, Serialize};

use dmp_bus::{Bus, ProduceRecord};
use dmp_core::event::EventLimits;
use dmp_core::{Config, Event};

/// `dmp import` arguments.
#[derive(Args, Debug)]
pub struct ImportArgs {
    /// Partner / source id written into events that carry no `src`.
    #[arg(long)]
    source: String,
    /// Files to import (JSONL or TSV, plain or gzip).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Base URL of the running dmp's API (embedded bus). Default: http://<api.listen>.
    #[arg(long, value_name = "URL")]
    api: Option<String>,
    /// Lines per batch.
    #[arg(long, default_value_t = 5000)]
    batch: usize,
    /// `jsonl` or `tsv` (default: `tsv` for *.tsv and *.tsv.gz, else `jsonl`).
    #[arg(long)]
    format: Option<String>,
    /// Ignore a previous checkpoint and import from the first line.
    #[arg(long)]
    restart: bool,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Checkpoint {
    file_len: u64,
    mtime_ms: i64,
    lines_done: u64,
    default_ts: i64,
}

fn checkpoint_path(file: &Path) -> PathBuf {
    let mut p = file.as_os_str().to_owned();
    p.push(".dmp-import");
    PathBuf::from(p)
}

fn rejects_path(file: &Path) -> PathBuf {
    let mut p = file.as_os_str().to_owned();
    p.push(".rejects");
    PathBuf::from(p)
}

fn file_identity(file: &Path) -> anyhow::Result<(u64, i64)> {
    let md = std::fs::metadata(file).with_context(|| format!("cannot read {}", file.display()))?;
    let mtime = md
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    Ok((md.len(), mtime))
}

/// Counts bytes read from the file itself (compressed), for progress.
struct Counting<R> {
    inner: R,
    read: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

fn open_lines(file: &Path, read: Arc<AtomicU64>) -> anyhow::Result<Box<dyn BufRead + Send>> {
    let mut f =
        std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let mut magic = [0u8; 2];
    let n = f.read(&mut magic)?;
    drop(f);
    let f = std::fs::File::open(file)?;
    let counting = Counting { inner: f, read };
    if n == 2 && magic == [0x1f, 0x8b] {
        Ok(Box::new(BufReader::with_capacity(
            1 << 20,
            flate2::read::MultiGzDecoder::new(BufReader::with_capacity(1 << 20, counting)),
        )))
    } else {
        Ok(Box::new(BufReader::with_capacity(1 << 20, counting)))
    }
}

/// Turns one line into an event.
struct LineParser {
    tsv_columns: Option<Vec<String>>,
    source: String,
    default_ts: i64,
    limits: EventLimits,
}

const TSV_FIELDS: [&str; 9] = ["uid", "ts", "type", "url", "ref", "q", "ip", "ua", "src"];

impl LineParser {
    fn tsv_header(line: &str) -> anyhow::Result<Vec<String>> {
        let cols: Vec<String> = line
            .trim_end_matches(['\r', '\n'])
            .split('\t')
            .map(str::to_string)
            .collect();
        for c in &cols {
            if !TSV_FIELDS.contains(&c.as_str()) && !c.starts_with("a.") {
                bail!("unknown column {c:?} in the TSV header (columns: {}, or a.<name> for custom attributes)", TSV_FIELDS.join(", "));
            }
        }
        if !cols.iter().any(|c| c == "uid") {
            bail!("the TSV header has no uid column");
        }
        Ok(cols)
    }

    fn parse(&self, line: &[u8]) -> Result<Event, String> {
        let text = std::str::from_utf8(line)
            .map_err(|e| format!("not valid UTF-8 (byte {})", e.valid_up_to()))?
            .trim_end_matches(['\r', '\n']);
        let mut value: serde_json::Value = match &self.tsv_columns {
            None => serde_json::from_str(text).map_err(|e| format!("malformed JSON: {e}"))?,
            Some(cols) => {
                let fields: Vec<&str> = text.split('\t').collect();
                if fields.len() != cols.len() {
                    return Err(format!(
                        "{} fields, but the header has {} columns",
                        fields.len(),
                        cols.len()
                    ));
                }
                let mut obj = serde_json::Map::new();
                let mut attrs = serde_json::Map::new();
                for (c, v) in cols.iter().zip(fields) {
                    if v.is_empty() {
                        continue;
                    }
                    match c.strip_prefix("a.") {
                        Some(name) => {
                            attrs.insert(name.to_string(), v.into());
                        }
                        None => {
                            obj.insert(c.clone(), v.into());
                        }
                    }
                }
                if !attrs.is_empty() {
                    obj.insert("attrs".into(), attrs.into());
                }
                obj.into()
            }
        };
        if let serde_json::Value::Object(o) = &mut value {
            o.entry("src").or_insert_with(|| self.source.clone().into());
        }
        Event::from_json(value, self.default_ts, &self.limits).map_err(|e| e.to_string())
    }
}

enum Sink {
    Http {
        client: reqwest::Client,
        url: String,
    },
    Bus {
        bus: Arc<dyn Bus>,
        topic: String,
    },
}

impl Sink {
    /// Sends a batch; returns the indexes (within the batch) the receiver rejected, with reasons.
    async fn send(&self, events: &[Event]) -> anyhow::Result<Vec<(usize, String)>> {
        match self {
            Sink::Bus { bus, topic } => {
                let records = events
                    .iter()
                    .map(|e| ProduceRecord::new(e.uid.clone().into_bytes(), e.to_json()))
                    .collect();
                bus.produce(topic, records).await?;
                Ok(Vec::new())
            }
            Sink::Http { client, url } => {
                let mut body = Vec::with_capacity(events.len() * 200);
                for e in events {
                    body.extend_from_slice(&e.to_json());
                    body.push(b'\n');
                }
                let mut backoff = Duration::from_millis(200);
                loop {
                    let r = client
                        .post(url)
                        .header("content-type", "application/x-ndjson")
                        .body(body.clone())
                        .send()
                        .await;
                    match r {
                        Ok(resp)
                            if resp.status().as_u16() == 202 || resp.status().as_u16() == 400 =>
                        {
                            let status = resp.status();
                            let answer: serde_json::Value =
                                resp.json().await.context("reading dmp's answer")?;
                            let Some(errors) = answer["errors"].as_array() else {
                                bail!("dmp answered {status}: {answer}");
                            };
                            return Ok(errors
                                .iter()
                                .map(|e| {
                                    (
                                        e["index"].as_u64().unwrap_or(0) as usize,
                                        e["error"].as_str().unwrap_or("rejected").to_string(),
                                    )
                                })
                                .collect());
                        }
                        Ok(resp)
                            if resp.status().is_server_error()
                                && backoff < Duration::from_secs(30) =>
                        {
                            tracing::warn!(status = %resp.status(), "dmp is not accepting; retrying");
                        }
                        Ok(resp) => {
                            let status = resp.status();
                            let text = resp.text().await.unwrap_or_default();
                            bail!("dmp refused the batch: {status} {text}");
                        }
                        Err(e) if backoff < Duration::from_secs(30) => {
                            tracing::warn!(error = %e, "cannot reach dmp; retrying");
                        }
                        Err(e) => bail!("cannot reach dmp at {url} (is `dmp run` running?): {e}"),
                    }
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
            }
        }
    }
}

struct Rejects {
    out: std::io::BufWriter<std::fs::File>,
    count: u64,
    first: Vec<String>,
}

impl Rejects {
    fn add(&mut self, line: u64, reason: &str, original: &str) -> anyhow::Result<()> {
        self.count += 1;
        writeln!(self.out, "line {line}: {reason}\t{original}")?;
        if self.first.len() < 20 {
            self.first.push(format!("line {line}: {reason}"));
        }
        Ok(())
    }
}

struct Batch {
    events: Vec<Event>,
    /// Line number of each event.
    lines: Vec<u64>,
    /// Lines read so far (the checkpoint after this batch).
    lines_done: u64,
    /// Bad lines found while building this batch: (line, reason, original).
    bad: Vec<(u64, String, String)>,
}

/// Runs `dmp import`.
pub async fn run(cfg: Config, args: ImportArgs) -> anyhow::Result<()> {
    if args.batch == 0 || args.batch > cfg.api.max_batch_events {
        bail!(
            "--batch must be 1..={} (api.max_batch_events)",
            cfg.api.max_batch_events
        );
    }
    let sink = if cfg.backends.bus == "embedded" {
        let base = args
            .api
            .clone()
            .unwrap_or_else(|| format!("http://{}", cfg.api.listen));
        Sink::Http {
            client: reqwest::Client::new(),
            url: format!("{}/v1/events", base.trim_end_matches('/')),
        }
    } else {
        Sink::Bus {
            bus: dmp_bus::open(&cfg.backends.bus, None, &cfg)?,
            topic: cfg.topics.events.clone(),
        }
    };
    let mut failed = false;
    for file in &args.files {
        match import_file(&args, file, &sink).await {
            Ok(()) => {}
            Err(e) => {
                eprintln!("dmp import: {}: {e:#}", file.display());
                failed = true;
            }
        }
    }
    if failed {
        bail!("some files were not fully imported; run the same command again to resume");
    }
    Ok(())
}

async fn import_file(args: &ImportArgs, file: &Path, sink: &Sink) -> anyhow::Result<()> {
    let started = Instant::now();
    let (file_len, mtime_ms) = file_identity(file)?;
    let ckpt_path = checkpoint_path(file);
    let previous: Option<Checkpoint> = if args.restart {
        None
    } else {
        std::fs::read(&ckpt_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .filter(|c: &Checkpoint| c.file_len == file_len && c.mtime_ms == mtime_ms)
    };
    let default_ts = previous
        .as_ref()
        .map_or_else(dmp_core::clock::now_ms, |c| c.default_ts);
    let skip = previous.as_ref().map_or(0, |c| c.lines_done);
    let tsv = match args.format.as_deref() {
        Some("tsv") => true,
        Some("jsonl") => false,
        Some(other) => bail!("--format must be jsonl or tsv, not {other:?}"),
        None => {
            let name = file.to_string_lossy();
            name.ends_with(".tsv") || name.ends_with(".tsv.gz")
        }
    };
    let read_bytes = Arc::new(AtomicU64::new(0));
    let mut reader = open_lines(file, read_bytes.clone())?;
    let mut header_lines = 0u64;
    let tsv_columns = if tsv {
        let mut header = String::new();
        reader.read_line(&mut header)?;
        header_lines = 1;
        Some(LineParser::tsv_header(&header)?)
    } else {
        None
    };
    let parser = LineParser {
        tsv_columns,
        source: args.source.clone(),
        default_ts,
        limits: EventLimits::default(),
    };
    let rejects_file = rejects_path(file);
    let mut rejects = Rejects {
        out: std::io::BufWriter::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(skip > 0)
                .write(true)
                .truncate(skip == 0)
                .open(&rejects_file)
                .with_context(|| format!("cannot write {}", rejects_file.display()))?,
        ),
        count: 0,
        first: Vec::new(),
    };
    if skip > 0 {
        eprintln!("{}: resuming after line {skip}", file.display());
    }

    // Reading and validating runs on a blocking thread, one batch ahead of the sender.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<anyhow::Result<Batch>>(4);
    let batch_size = args.batch;
    let reader_task = tokio::task::spawn_blocking(move || {
        let mut line_no = header_lines;
        let mut buf = Vec::with_capacity(4096);
        let mut batch = Batch {
            events: Vec::new(),
            lines: Vec::new(),
            lines_done: 0,
            bad: Vec::new(),
        };
        loop {
            buf.clear();
            let n = match reader.read_until(b'\n', &mut buf) {
                Ok(n) => n,
                Err(e) => {
                    let _ = tx.blocking_send(Err(anyhow::anyhow!(
                        "read error after line {line_no}: {e}"
                    )));
                    return;
                }
            };
            if n == 0 {
                break;
            }
            line_no += 1;
            if line_no <= skip || buf.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match parser.parse(&buf) {
                Ok(ev) => {
                    batch.events.push(ev);
                    batch.lines.push(line_no);
                }
                Err(reason) => {
                    let original = String::from_utf8_lossy(&buf).trim_end().to_string();
                    batch.bad.push((line_no, reason, original));
                }
            }
            if batch.events.len() >= batch_size {
                batch.lines_done = line_no;
                let full = std::mem::replace(
                    &mut batch,
                    Batch {
                        events: Vec::new(),
                        lines: Vec::new(),
                        lines_done: 0,
                        bad: Vec::new(),
                    },
                );
                if tx.blocking_send(Ok(full)).is_err() {
                    return;
                }
            }
        }
        batch.lines_done = line_no;
        let _ = tx.blocking_send(Ok(batch));
    });

    let progress = indicatif::ProgressBar::new(file_len);
    progress.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let mut imported = 0u64;
    while let Some(batch) = rx.recv().await {
        let batch = batch?;
        for (line, reason, original) in &batch.bad {
            rejects.add(*line, reason, original)?;
        }
        if !batch.events.is_empty() {
            let refused = sink.send(&batch.events).await?;
            for (i, reason) in &refused {
                let line = batch.lines.get(*i).copied().unwrap_or(0);
                let original = String::from_utf8_lossy(
                    &batch
                        .events
                        .get(*i)
                        .map(|e| e.to_json())
                        .unwrap_or_default(),
                )
                .into_owned();
                rejects.add(line, reason, &original)?;
            }
            imported += (batch.events.len() - refused.len()) as u64;
        }
        rejects.out.flush()?;
        let ckpt = Checkpoint {
            file_len,
            mtime_ms,
            lines_done: batch.lines_done,
            default_ts,
        };
        let tmp = ckpt_path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&ckpt)?)?;
        std::fs::rename(&tmp, &ckpt_path)?;
        progress.set_position(read_bytes.load(Ordering::Relaxed));
        progress.set_message(format!("{imported} imported, {} rejected", rejects.count));
    }
    reader_task.await?;
    progress.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let Rejects {
        count: rejected,
        first: first_rejects,
        ..
    } = rejects;
    crate::out(format_args!(
        "{}: {imported} events imported, {rejected} lines rejected in {secs:.1} s ({:.0} lines/s){}",
        file.display(),
        (imported + rejected) as f64 / secs.max(1e-9),
        if rejected > 0 { format!("; rejects in {}", rejects_file.display()) } else { String::new() }
    ))?;
    for r in &first_rejects {
        crate::out(format_args!("  {r}"))?;
    }
    if rejected as usize > first_rejects.len() {
        crate::out(format_args!(
            "  … and {} more",
            rejected as usize - first_rejects.len()
        ))?;
    }
    Ok(())
}
