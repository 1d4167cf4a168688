//! What a run measures while it runs: dmp's own metrics (scraped every second from `/metrics`),
//! CPU per role and memory (from `/proc`), the event → segment latency of every segment record
//! (read from the partner stream, as a partner would), and lookups.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde::Serialize;

/// One scrape of Prometheus text: metric name -> (labels, value) lines.
#[derive(Debug, Default, Clone)]
pub struct Scrape {
    lines: HashMap<String, Vec<(String, f64)>>,
}

impl Scrape {
    /// Parses the Prometheus text format (comments skipped).
    pub fn parse(text: &str) -> Scrape {
        let mut lines: HashMap<String, Vec<(String, f64)>> = HashMap::new();
        for l in text.lines() {
            if l.starts_with('#') || l.trim().is_empty() {
                continue;
            }
            let Some((series, value)) = l.rsplit_once(' ') else {
                continue;
            };
            let Ok(v) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.find('{') {
                Some(i) => (&series[..i], &series[i..]),
                None => (series, ""),
            };
            lines
                .entry(name.to_string())
                .or_default()
                .push((labels.to_string(), v));
        }
        Scrape { lines }
    }

    /// The sum of every series of `name` (0 when absent).
    pub fn sum(&self, name: &str) -> f64 {
        self.lines
            .get(name)
            .map_or(0.0, |v| v.iter().map(|(_, x)| x).sum())
    }

    /// The sum of the series of `name` whose labels contain `label` (like `trigger="change"`).
    pub fn sum_with(&self, name: &str, label: &str) -> f64 {
        self.lines.get(name).map_or(0.0, |v| {
            v.iter()
                .filter(|(l, _)| l.contains(label))
                .map(|(_, x)| x)
                .sum()
        })
    }

    /// Cumulative bucket counts of histogram `name` (summed over label sets), by upper bound.
    pub fn buckets(&self, name: &str) -> Vec<(f64, f64)> {
        let mut by_le: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
        for (labels, v) in self
            .lines
            .get(&format!("{name}_bucket"))
            .into_iter()
            .flatten()
        {
            let Some(i) = labels.find("le=\"") else {
                continue;
            };
            let rest = &labels[i + 4..];
            let le = rest[..rest.find('"').unwrap_or(rest.len())].to_string();
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or(f64::INFINITY)
            };
            let e = by_le.entry(le.to_bits()).or_insert((le, 0.0));
            e.1 += v;
        }
        let mut out: Vec<(f64, f64)> = by_le.into_values().collect();
        out.sort_by(|a, b| a.0.total_cmp(&b.0));
        out
    }
}

/// The `q` quantile of the observations between two scrapes of a bucketed histogram (linear
/// within the bucket; None without observations).
pub fn quantile_between(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let counts: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, c)| {
            let b = before
                .iter()
                .find(|(l, _)| l == le)
                .map_or(0.0, |(_, c)| *c);
            (*le, c - b)
        })
        .collect();
    let total = counts.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let want = q * total;
    let mut prev = (0.0, 0.0);
    for (le, c) in counts {
        if c >= want {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let frac = if c > prev.1 {
                (want - prev.1) / (c - prev.1)
            } else {
                1.0
            };
            return Some(prev.0 + (le - prev.0) * frac);
        }
        prev = (le, c);
    }
    Some(prev.0)
}

/// Counters of one second of a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sample {
    /// Seconds since the traffic started.
    pub t: f64,
    /// Events the driver had made due by then.
    pub offered: u64,
    /// Events dmp had acknowledged.
    pub acked: u64,
    /// Events the storage writer had written.
    pub stored: f64,
    /// Changes the segmenter had received.
    pub changes: f64,
    /// ... skipped as already seen.
    pub duplicate: f64,
    /// ... skipped as bots.
    pub bot: f64,
    /// Users evaluated because of a change.
    pub evaluated: f64,
    /// Segment records published.
    pub published: f64,
    /// CPU seconds per role so far.
    pub cpu: BTreeMap<&'static str, f64>,
    /// Seconds per role so far runnable but waiting for a CPU (empty where the kernel keeps no
    /// scheduler times).
    pub cpu_wait: BTreeMap<&'static str, f64>,
    /// The loadtest's own CPU seconds so far (it shares the machine with dmp).
    pub loadtest_cpu: f64,
    /// Resident memory peak so far, bytes.
    pub peak_rss: u64,
    /// Bytes in the embedded database's memtables now (`dmp_store_write_buffer_bytes`; 0 when
    /// nothing is embedded).
    pub memtable_bytes: f64,
}

/// Fills a [`Sample`] from a scrape.
pub fn sample_from(s: &Scrape, t: f64, offered: u64, acked: u64, pid: u32) -> Sample {
    let (cpu, cpu_wait) = crate::process::role_times(pid);
    Sample {
        t,
        offered,
        acked,
        stored: s.sum("dmp_storage_writer_events_total"),
        changes: s.sum("dmp_segmenter_changes_received_total"),
        duplicate: s.sum("dmp_segmenter_changes_skipped_duplicate_total"),
        bot: s.sum("dmp_segmenter_changes_skipped_bot_total"),
        evaluated: s.sum_with("dmp_segmenter_users_evaluated_total", "trigger=\"change\""),
        published: s.sum("dmp_segmenter_records_published_total"),
        cpu,
        cpu_wait,
        loadtest_cpu: crate::process::own_cpu(),
        peak_rss: crate::process::peak_rss(pid).unwrap_or(0),
        memtable_bytes: s.sum("dmp_store_write_buffer_bytes"),
    }
}

/// Scrapes `/metrics`.
pub async fn scrape(http: &reqwest::Client, base: &str) -> anyhow::Result<Scrape> {
    let text = http
        .get(format!("{base}/metrics"))
        .timeout(Duration::from_secs(5))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    Ok(Scrape::parse(&text))
}

/// Event → segment latencies, from segment records as a partner reads them.
pub struct Latencies {
    /// Every record after the warmup: publish time − newest event time the evaluation saw, ms.
    pub all: Histogram<u64>,
    /// (seconds since start of traffic at publication, latency ms) of every record.
    pub series: Vec<(f64, u64)>,
    /// Records read.
    pub records: u64,
    /// Records left out because a partner dump (old events) may have caused them.
    pub skipped_dump: u64,
}

impl Default for Latencies {
    fn default() -> Self {
        Latencies {
            all: Histogram::new_with_bounds(1, 3_600_000, 3).expect("valid bounds"),
            series: Vec::new(),
            records: 0,
            skipped_dump: 0,
        }
    }
}

/// When partner dumps reached dmp, per uid (a record for such a user may be the dump's doing,
/// and its event times are hours old, so it says nothing about latency).
pub type DumpArrivals = Arc<Mutex<HashMap<String, i64>>>;

/// Reads the partner stream of `base` as group `group` until `stop`, recording latencies.
pub async fn read_segments(
    base: String,
    group: String,
    start_ms: i64,
    warmup_ms: i64,
    dumps: DumpArrivals,
    out: Arc<Mutex<Latencies>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let mut ack = String::new();
    let mut next: BTreeMap<u64, u64> = BTreeMap::new();
    while !*stop.borrow() {
        let url = format!("{base}/v1/stream/segments?group={group}{ack}");
        let mut resp = match http.get(&url).send().await {
            Ok(r) if r.status().is_success() => r,
            Ok(r) => anyhow::bail!("the partner stream answered {}", r.status()),
            Err(e) => {
                tracing::warn!(error = %e, "partner stream: reconnecting");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let mut buf: Vec<u8> = Vec::new();
        loop {
            let chunk = tokio::select! {
                c = resp.chunk() => c,
                _ = stop.changed() => return Ok(()),
            };
            let Ok(Some(chunk)) = chunk else { break };
            buf.extend_from_slice(&chunk);
            let mut lat = out.lock().expect("not poisoned");
            // Lines are parsed in place and the buffer shifted once per chunk (shifting it per
            // line moved the rest of the chunk for every line).
            let mut from = 0;
            while let Some(i) = buf[from..].iter().position(|b| *b == b'\n') {
                let line = &buf[from..from + i];
                from += i + 1;
                let Ok(v) = serde_json::from_slice::<StreamLine>(line) else {
                    continue;
                };
                if let (Some(p), Some(o)) = (v.partition, v.offset) {
                    next.insert(p, o + 1);
                }
                lat.records += 1;
                let published = v.timestamp.unwrap_or(0);
                let record = v.record.unwrap_or_default();
                let last_event = record.last_event_ts.unwrap_or(0);
                if last_event <= 0 {
                    continue;
                }
                let uid = record.uid.as_deref().unwrap_or("");
                let dumped = dumps
                    .lock()
                    .expect("not poisoned")
                    .get(uid)
                    .is_some_and(|arrived| *arrived >= last_event && *arrived <= published);
                if dumped {
                    lat.skipped_dump += 1;
                    continue;
                }
                let ms = (published - last_event).max(1) as u64;
                let t = (published - start_ms) as f64 / 1000.0;
                lat.series.push((t, ms));
                if published - start_ms >= warmup_ms {
                    let _ = lat.all.record(ms.min(3_600_000));
                }
            }
            buf.drain(..from);
        }
        // Reconnect where this connection stopped.
        ack = if next.is_empty() {
            String::new()
        } else {
            let parts: Vec<String> = next.iter().map(|(p, o)| format!("{p}:{o}")).collect();
            format!("&ack={}", parts.join(","))
        };
    }
    Ok(())
}

/// A line of the partner stream (`GET /v1/stream/segments`): the fields the latency needs.
#[derive(serde::Deserialize)]
struct StreamLine<'a> {
    partition: Option<u64>,
    offset: Option<u64>,
    /// When the record was published, epoch ms.
    timestamp: Option<i64>,
    #[serde(borrow)]
    record: Option<StreamRecord<'a>>,
}

/// The segment update inside a stream line.
#[derive(Default, serde::Deserialize)]
struct StreamRecord<'a> {
    #[serde(borrow)]
    uid: Option<std::borrow::Cow<'a, str>>,
    last_event_ts: Option<i64>,
}

/// Latency figures of a histogram, ms.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    /// Observations.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
}

impl Percentiles {
    /// From a histogram of values in `unit_ms` milliseconds each.
    pub fn of(h: &Histogram<u64>, unit_ms: f64) -> Percentiles {
        Percentiles {
            count: h.len(),
            p50: h.value_at_quantile(0.5) as f64 * unit_ms,
            p95: h.value_at_quantile(0.95) as f64 * unit_ms,
            p99: h.value_at_quantile(0.99) as f64 * unit_ms,
            p999: h.value_at_quantile(0.999) as f64 * unit_ms,
            max: h.max() as f64 * unit_ms,
        }
    }
}

/// What the open-loop lookup phase measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LookupFigures {
    /// Requests per second asked for.
    pub target_rate: f64,
    /// Requests per second answered.
    pub achieved_rate: f64,
    /// Latency from each request's scheduled time to its answer, ms (coordinated omission
    /// corrected: a late start counts, including the client timer's 1 ms granularity).
    pub latency_ms: Percentiles,
    /// From sending each request to its answer, ms (the server's time plus loopback and the
    /// client's own work).
    pub service_ms: Percentiles,
    /// Answers other than 200.
    pub errors: u64,
}

/// A keep-alive HTTP/1.1 connection that sends `GET`s and reads whole answers: a few
/// microseconds of client work per request, where a general client (reqwest) costs about as much
/// CPU as the server's answer. The client shares the two cores with dmp, so its cost is part of
/// what the figure would otherwise measure.
struct Conn {
    addr: String,
    stream: Option<tokio::io::BufReader<tokio::net::TcpStream>>,
    request: Vec<u8>,
    line: String,
    body: Vec<u8>,
}

impl Conn {
    fn new(base: &str) -> Conn {
        Conn {
            addr: base.trim_start_matches("http://").to_string(),
            stream: None,
            request: Vec::with_capacity(256),
            line: String::with_capacity(256),
            body: Vec::with_capacity(4096),
        }
    }

    /// `GET path`; returns the status, or an error (the connection is then dropped).
    async fn get(&mut self, path: &str) -> std::io::Result<u16> {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
        if self.stream.is_none() {
            let s = tokio::net::TcpStream::connect(&self.addr).await?;
            s.set_nodelay(true)?;
            self.stream = Some(tokio::io::BufReader::new(s));
        }
        let r = async {
            let stream = self.stream.as_mut().expect("connected");
            self.request.clear();
            self.request.extend_from_slice(b"GET ");
            self.request.extend_from_slice(path.as_bytes());
            self.request
                .extend_from_slice(b" HTTP/1.1\r\nhost: dmp\r\n\r\n");
            stream.get_mut().write_all(&self.request).await?;
            let bad =
                |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
            self.line.clear();
            stream.read_line(&mut self.line).await?;
            let status: u16 = self
                .line
                .split(' ')
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| bad("no status line"))?;
            let mut length = None;
            loop {
                self.line.clear();
                if stream.read_line(&mut self.line).await? == 0 {
                    return Err(bad("closed in the headers"));
                }
                let l = self.line.trim_end();
                if l.is_empty() {
                    break;
                }
                if let Some((k, v)) = l.split_once(':') {
                    if k.eq_ignore_ascii_case("content-length") {
                        length = v.trim().parse::<usize>().ok();
                    }
                }
            }
            let length = length.ok_or_else(|| bad("no content-length"))?;
            self.body.resize(length, 0);
            stream.read_exact(&mut self.body).await?;
            Ok(status)
        }
        .await;
        if r.is_err() {
            self.stream = None;
        }
        r
    }
}

/// Looks up random users of `uids` at `rate` per second for `seconds`, open loop: request `k` is
/// due at `k / rate`; `connections` workers (keep-alive connections) each take every
/// `connections`-th request, wait until it is due and send it, so a slow answer delays the
/// worker's next request and that delay counts in the next request's latency (measured from when
/// it was due).
pub async fn lookups(
    base: &str,
    uids: Arc<Vec<String>>,
    rate: f64,
    seconds: u64,
    connections: usize,
    seed: u64,
) -> LookupFigures {
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let total = (rate * seconds as f64) as u64;
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..connections as u64 {
        let (uids, base) = (uids.clone(), base.to_string());
        workers.spawn(async move {
            let mut conn = Conn::new(&base);
            let mut hist =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
            let mut service =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
            let mut errors = 0u64;
            let mut rng = crate::generator::Rng::new(seed ^ (w + 1).wrapping_mul(0x9e37_79b9));
            let mut path = String::with_capacity(96);
            let mut k = w;
            while k < total {
                let due = start + Duration::from_secs_f64(k as f64 / rate);
                tokio::time::sleep_until(due).await;
                path.clear();
                path.push_str("/v1/users/");
                path.push_str(&uids[rng.below(uids.len() as u64) as usize]);
                path.push_str("/segments");
                let sent = tokio::time::Instant::now();
                let ok = matches!(conn.get(&path).await, Ok(200));
                if ok {
                    let _ = hist.record((due.elapsed().as_micros() as u64).max(1));
                    let _ = service.record((sent.elapsed().as_micros() as u64).max(1));
                } else {
                    errors += 1;
                }
                k += connections as u64;
            }
            (hist, service, errors)
        });
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
    let mut service = hist.clone();
    let mut errors = 0;
    while let Some(Ok((h, sv, e))) = workers.join_next().await {
        let _ = hist.add(&h);
        let _ = service.add(&sv);
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    LookupFigures {
        target_rate: rate,
        achieved_rate: hist.len() as f64 / elapsed,
        latency_ms: Percentiles::of(&hist, 0.001),
        service_ms: Percentiles::of(&service, 0.001),
        errors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# TYPE x counter\nx{a=\"1\"} 3\nx{a=\"2\"} 4\ny 2.5\n\
        h_bucket{le=\"0.1\"} 5\nh_bucket{le=\"1\"} 9\nh_bucket{le=\"+Inf\"} 10\nh_sum 3\nh_count 10\n";

    #[test]
    fn given_partner_stream_lines_then_the_latency_fields_are_read() {
        // As api/src/stream.rs writes them: a segment update, and a tombstone of the current topic.
        let line = br#"{"partition":3,"offset":41,"timestamp":1700000000500,"key":"lt-\u0031","record":{"uid":"lt-\u0031","segments":["a"],"added":["a"],"removed":[],"evaluated_at":1700000000400,"last_event_ts":1700000000100,"rules_version":"v1"}}"#;
        let v: StreamLine = serde_json::from_slice(line).unwrap();
        assert_eq!(
            (v.partition, v.offset, v.timestamp),
            (Some(3), Some(41), Some(1700000000500))
        );
        let r = v.record.unwrap();
        assert_eq!(r.uid.as_deref(), Some("lt-1"), "escapes are decoded");
        assert_eq!(r.last_event_ts, Some(1700000000100));
        let tomb: StreamLine = serde_json::from_slice(
            br#"{"partition":0,"offset":7,"timestamp":5,"key":"u","record":null}"#,
        )
        .unwrap();
        assert!(tomb.record.is_none());
        assert_eq!(tomb.offset, Some(7));
    }

    #[test]
    fn prometheus_text_sums_and_buckets() {
        let s = Scrape::parse(TEXT);
        assert_eq!(s.sum("x"), 7.0);
        assert_eq!(s.sum_with("x", "a=\"2\""), 4.0);
        assert_eq!(s.sum("y"), 2.5);
        assert_eq!(s.sum("nope"), 0.0);
        let b = s.buckets("h");
        assert_eq!(b.len(), 3);
        let none: Vec<(f64, f64)> = Vec::new();
        assert!((quantile_between(&none, &b, 0.5).unwrap() - 0.1).abs() < 1e-9);
        let q9 = quantile_between(&none, &b, 0.9).unwrap();
        assert!((q9 - 1.0).abs() < 1e-9, "{q9}");
        // Only what happened between two scrapes counts.
        let before = vec![(0.1, 5.0), (1.0, 5.0), (f64::INFINITY, 5.0)];
        let q = quantile_between(&before, &b, 0.5).unwrap();
        assert!(q > 0.1 && q <= 1.0, "{q}");
        assert_eq!(quantile_between(&b, &b, 0.5), None);
    }
}
