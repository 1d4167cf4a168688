//! The report of a run: `report.json` (everything measured), `summary.md` (the headline table
//! docs/benchmarks.md keeps) and PNG charts: throughput and latency over time, the shares of
//! changes evaluated / skipped as duplicates / skipped as bots (the chart FACETz published), the
//! CPU of each role over time, and audience estimates against the truth.

use std::path::Path;

use anyhow::bail;
use plotters::prelude::*;

use crate::run::{Phase, Report};

/// Fonts tried for chart text (`DMP_LOADTEST_FONT` first). Debian: `fonts-dejavu-core`.
const FONTS: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

fn register_font() -> anyhow::Result<()> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let candidates: Vec<String> = std::env::var("DMP_LOADTEST_FONT")
            .into_iter()
            .chain(FONTS.iter().map(|s| s.to_string()))
            .collect();
        for path in &candidates {
            if let Ok(bytes) = std::fs::read(path) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                return plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                    .map_err(|_| format!("{path} is not a TrueType font"));
            }
        }
        Err(format!(
            "no font for the charts: install fonts-dejavu-core or set DMP_LOADTEST_FONT (tried {})",
            candidates.join(", ")
        ))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

type Res = anyhow::Result<()>;

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing a chart: {e}")
}

/// Writes `report.json`, `summary.md` and the charts of every phase into `dir`.
pub fn write(report: &Report, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(report)?)?;
    std::fs::write(dir.join("summary.md"), summary(report))?;
    register_font()?;
    for p in &report.phases {
        throughput_chart(p, &dir.join(format!("{}-throughput.png", p.label)))?;
        latency_chart(p, &dir.join(format!("{}-latency.png", p.label)))?;
        shares_chart(p, &dir.join(format!("{}-shares.png", p.label)))?;
        cpu_chart(p, &dir.join(format!("{}-cpu.png", p.label)))?;
        if p.samples.iter().any(|s| !s.cpu_wait.is_empty()) {
            cpu_wait_chart(p, &dir.join(format!("{}-cpu-wait.png", p.label)))?;
        }
        if !p.audience.is_empty() {
            audience_chart(p, &dir.join(format!("{}-audience.png", p.label)))?;
        }
    }
    Ok(())
}

/// Per-second rates from cumulative samples.
fn rates(p: &Phase, f: impl Fn(&crate::measure::Sample) -> f64) -> Vec<(f64, f64)> {
    p.samples
        .windows(2)
        .map(|w| {
            let dt = (w[1].t - w[0].t).max(1e-9);
            (w[1].t, (f(&w[1]) - f(&w[0])) / dt)
        })
        .collect()
}

/// A named line of (seconds, value) points in a colour.
type Series = (&'static str, Vec<(f64, f64)>, RGBColor);

/// Lines over the run's seconds, with a legend. With `log`, values are drawn on a log10 axis
/// (labelled in the values themselves).
fn line_chart(
    p: &Phase,
    path: &Path,
    title: &str,
    y_desc: &str,
    series: Vec<Series>,
    log: bool,
) -> Res {
    let xmax = p.samples.last().map_or(1.0, |s| s.t).max(1.0);
    let y = |v: f64| if log { v.max(1.0).log10() } else { v };
    let ymax = series
        .iter()
        .flat_map(|(_, v, _)| v.iter().map(|x| y(x.1)))
        .fold(1.0, f64::max)
        * if log { 1.15 } else { 1.1 };
    let root = BitMapBackend::new(path, (1000, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{}: {title}", p.label), ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)
        .map_err(err)?;
    let label = |v: &f64| {
        if log {
            format!("{:.0}", 10f64.powf(*v))
        } else if ymax < 10.0 {
            format!("{v:.1}") // small quantities (cores) need their tenths
        } else {
            format!("{v:.0}")
        }
    };
    chart
        .configure_mesh()
        .x_desc("seconds since the traffic started")
        .y_desc(y_desc)
        .y_label_formatter(&label)
        .draw()
        .map_err(err)?;
    for (name, points, color) in series {
        let points: Vec<(f64, f64)> = points.into_iter().map(|(t, v)| (t, y(v))).collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(err)?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

fn throughput_chart(p: &Phase, path: &Path) -> Res {
    let series = vec![
        ("offered", rates(p, |s| s.offered as f64), BLUE),
        ("acknowledged", rates(p, |s| s.acked as f64), GREEN),
        ("stored", rates(p, |s| s.stored), RED),
        ("changes", rates(p, |s| s.changes), MAGENTA),
    ];
    line_chart(p, path, "events per second", "per second", series, false)
}

/// dmp's roles (`crate::process::role_of`) and their colours in the charts.
const ROLES: [(&str, RGBColor); 7] = [
    ("segmenter", RED),
    ("storage-writer", BLUE),
    ("api", GREEN),
    ("embedded-storage", MAGENTA),
    ("kafka-client", CYAN),
    ("counters", RGBColor(230, 140, 0)),
    ("other", RGBColor(128, 128, 128)),
];

/// One line per role of a per-role counter of the samples (`field`: the CPU, the waits), as a
/// rate per second; roles whose counter never moved are left out.
fn role_series(
    p: &Phase,
    field: impl Fn(&crate::measure::Sample) -> &std::collections::BTreeMap<&'static str, f64>,
) -> Vec<Series> {
    ROLES
        .iter()
        .filter(|(role, _)| {
            p.samples
                .iter()
                .any(|s| field(s).get(role).is_some_and(|v| *v > 0.0))
        })
        .map(|&(role, color)| {
            (
                role,
                rates(p, |s| field(s).get(role).copied().unwrap_or(0.0)),
                color,
            )
        })
        .collect()
}

/// Cores used per second by each of dmp's roles (`crate::process::role_of`) and by the loadtest
/// itself: which role took the CPU when the latency spiked (the embedded storage's bursts of
/// flushes and compactions showed this way).
fn cpu_chart(p: &Phase, path: &Path) -> Res {
    let mut series = role_series(p, |s| &s.cpu);
    series.push(("loadtest", rates(p, |s| s.loadtest_cpu), BLACK));
    line_chart(p, path, "CPU by role", "cores", series, false)
}

/// Seconds per second each role's threads were runnable but waiting for a CPU: when the machine
/// was full, and whose work waited for it.
fn cpu_wait_chart(p: &Phase, path: &Path) -> Res {
    line_chart(
        p,
        path,
        "waiting for a CPU while runnable, by role",
        "seconds per second",
        role_series(p, |s| &s.cpu_wait),
        false,
    )
}

fn latency_chart(p: &Phase, path: &Path) -> Res {
    // p50 and p99 per second of publication.
    let mut by_sec: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
    for (t, ms) in &p.latency_series {
        if *t >= 0.0 {
            by_sec.entry(*t as u64).or_default().push(*ms);
        }
    }
    let mut p50 = Vec::new();
    let mut p99 = Vec::new();
    for (s, mut v) in by_sec {
        v.sort_unstable();
        let q = |q: f64| v[((v.len() - 1) as f64 * q) as usize] as f64;
        p50.push((s as f64, q(0.5)));
        p99.push((s as f64, q(0.99)));
    }
    line_chart(
        p,
        path,
        "event → segment record latency (log scale)",
        "ms",
        vec![("p50", p50, BLUE), ("p99", p99, RED)],
        true,
    )
}

fn shares_chart(p: &Phase, path: &Path) -> Res {
    let ev = rates(p, |s| s.evaluated);
    let dup = rates(p, |s| s.duplicate);
    let bot = rates(p, |s| s.bot);
    let total = rates(p, |s| s.changes);
    // Shares of the changes received each second, stacked: evaluated, duplicate, bot.
    let share = |i: usize, parts: &[&Vec<(f64, f64)>]| -> f64 {
        let t = total[i].1;
        if t <= 0.0 {
            return 0.0;
        }
        (parts.iter().map(|v| v[i].1).sum::<f64>() / t).min(1.0)
    };
    let n = total.len();
    let top: Vec<(f64, f64)> = (0..n)
        .map(|i| (total[i].0, share(i, &[&ev, &dup, &bot])))
        .collect();
    let mid: Vec<(f64, f64)> = (0..n)
        .map(|i| (total[i].0, share(i, &[&ev, &dup])))
        .collect();
    let low: Vec<(f64, f64)> = (0..n).map(|i| (total[i].0, share(i, &[&ev]))).collect();
    let xmax = p.samples.last().map_or(1.0, |s| s.t).max(1.0);
    let root = BitMapBackend::new(path, (1000, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{}: changes evaluated / skipped as duplicates / skipped as bots",
                p.label
            ),
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..xmax, 0f64..1.05f64)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the traffic started")
        .y_desc("share of changes")
        .draw()
        .map_err(err)?;
    for (name, points, color) in [
        ("skipped: bot", top, RED),
        ("skipped: duplicate", mid, YELLOW),
        ("evaluated", low, GREEN),
    ] {
        chart
            .draw_series(AreaSeries::new(points, 0.0, color.mix(0.7).filled()))
            .map_err(err)?
            .label(name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

fn audience_chart(p: &Phase, path: &Path) -> Res {
    let n = p.audience.len();
    // Everything relative to the truth, in percent: the interval as a bar, the estimate on it.
    let rel = |x: u64, truth: u64| (x as f64 - truth as f64) / (truth.max(1) as f64) * 100.0;
    let span = p
        .audience
        .iter()
        .flat_map(|a| [rel(a.low, a.truth).abs(), rel(a.high, a.truth).abs()])
        .fold(1.0, f64::max)
        * 1.2;
    let root = BitMapBackend::new(path, (1000, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let labels: Vec<String> = p
        .audience
        .iter()
        .map(|a| format!("{} ({})", a.expr, a.truth))
        .collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{}: audience estimates, % off the true size (bar: stated interval)",
                p.label
            ),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), -span..span)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_labels(n)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 0.01 && i >= 0.0 {
                labels.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("% off the truth")
        .draw()
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new(
            vec![(-0.5, 0.0), (n as f64 - 0.5, 0.0)],
            RED.stroke_width(1),
        ))
        .map_err(err)?;
    chart
        .draw_series(p.audience.iter().enumerate().map(|(i, a)| {
            let color = if a.within { BLUE } else { RED };
            ErrorBar::new_vertical(
                i as f64,
                rel(a.low, a.truth),
                rel(a.estimate, a.truth),
                rel(a.high, a.truth),
                color.stroke_width(2),
                20,
            )
        }))
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// A line for the summary when the embedded database's memtables held more than they do while
/// flushes keep up (about 2 x 5 keyspaces x `embedded.memtable_mb`): flushes fell behind, or
/// stopped (as fjall's once did, with every user still right: nothing else in the report showed
/// it but the CPU chart and the peak memory).
pub fn memtables_warning(p: &Phase, memtable_mb: f64) -> Option<String> {
    let bound = 2.0 * 5.0 * memtable_mb;
    (p.memtables_peak_mib > bound).then(|| {
        format!(
            "\n**{}: the embedded database's memtables held up to {:.0} MiB, over the {bound:.0} MiB \
             (2 x 5 keyspaces x embedded.memtable_mb) they stay under while flushes keep up: \
             flushes fell behind or stopped (see the embedded storage's CPU in {}-cpu.png).**\n",
            p.label, p.memtables_peak_mib, p.label
        )
    })
}

/// The headline table, in Markdown.
pub fn summary(r: &Report) -> String {
    let mut s = String::new();
    let setup = |k: &str| r.setup.get(k).cloned().unwrap_or_default();
    s.push_str(&format!(
        "### loadtest `{}` ({})\n\nMachine: {} x {} ({}), {}; load before {}; dmp `{}`, working tree at {}.\nCommand: `{}`\n\n",
        r.scenario.name,
        setup("date"),
        setup("cpus"),
        setup("cpu_model").trim(),
        setup("memory"),
        setup("kernel"),
        setup("load_before"),
        setup("dmp"),
        setup("git").replace('\n', " "),
        setup("command"),
    ));
    s.push_str("| phase | offered ev/s | stored ev/s | p50 / p99 / p99.9 event→segment | topic wait p99 (events, changes) | evaluated / duplicate / bot | CPU s per 1K events (total; writer, segmenter, api, storage) | peak RSS | drain | wrong users | cold start |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|\n");
    for p in &r.phases {
        let offered = if p.driven.seconds > 0.0 {
            p.driven.offered as f64 / p.driven.seconds
        } else {
            0.0
        };
        let wait = |t: &str| {
            p.topic_wait_s.get(t).map_or("-".to_string(), |(_, p99)| {
                format!("{:.0} ms", p99 * 1000.0)
            })
        };
        let cpu = |k: &str| p.cpu_per_1k_events.get(k).copied().unwrap_or(0.0);
        let wrong = p.correctness.as_ref().map_or("-".to_string(), |c| {
            format!(
                "{} of {} ({} not evaluated)",
                c.wrong_total, c.users, c.not_evaluated
            )
        });
        s.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.0} / {:.0} / {:.0} ms | {}, {} | {:.0}% / {:.0}% / {:.0}% | {:.3}; {:.3}, {:.3}, {:.3}, {:.3} | {:.0} MiB | {} | {} | {:.0} ms |\n",
            p.label,
            offered,
            p.stored_rate,
            p.event_to_segment_ms.p50,
            p.event_to_segment_ms.p99,
            p.event_to_segment_ms.p999,
            wait("dmp.events"),
            wait("dmp.user-changes"),
            p.share_evaluated * 100.0,
            p.share_duplicate * 100.0,
            p.share_bot * 100.0,
            cpu("total"),
            cpu("storage-writer"),
            cpu("segmenter"),
            cpu("api"),
            cpu("embedded-storage"),
            p.peak_rss_mib,
            p.drain_seconds
                .map_or("not within 15 min".to_string(), |d| format!("{d:.0} s")),
            wrong,
            p.cold_start_ms,
        ));
    }
    let memtable_mb = r
        .scenario
        .dmp
        .config
        .get("embedded.memtable_mb")
        .and_then(|v| v.parse().ok())
        .unwrap_or(dmp_core::config::Config::defaults().embedded.memtable_mb as f64);
    for p in &r.phases {
        if let Some(w) = memtables_warning(p, memtable_mb) {
            s.push_str(&w);
        }
    }
    for p in &r.phases {
        if let Some(w) = cpu_wait_line(p) {
            s.push_str(&w);
        }
    }
    for p in &r.phases {
        if let Some(max) = p.max_sustained_rate {
            s.push_str(&format!(
                "\n{}: highest sustained rate {max:.0} events/s (steps: {}).\n",
                p.label,
                p.steps
                    .iter()
                    .map(|st| format!(
                        "{:.0}{}",
                        st.rate,
                        if st.sustained { "" } else { " not sustained" }
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if let Some(l) = &p.lookups {
            s.push_str(&format!(
                "\n{}: lookups {:.0} req/s asked, {:.0} answered; from the scheduled time p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms; from sending p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms; {} errors.\n",
                p.label,
                l.target_rate,
                l.achieved_rate,
                l.latency_ms.p50,
                l.latency_ms.p99,
                l.latency_ms.p999,
                l.service_ms.p50,
                l.service_ms.p99,
                l.service_ms.p999,
                l.errors
            ));
        }
        if !p.audience.is_empty() {
            s.push_str(&format!("\n{}: audience estimates vs truth:", p.label));
            for a in &p.audience {
                s.push_str(&format!(
                    " {} {} in [{}, {}] truth {}{}{};",
                    a.expr,
                    a.estimate,
                    a.low,
                    a.high,
                    a.truth,
                    if a.bots_never_counted > 0 {
                        format!(" ({} bots never evaluated left out)", a.bots_never_counted)
                    } else {
                        String::new()
                    },
                    if a.within { "" } else { " OUTSIDE" }
                ));
            }
            s.push('\n');
        }
    }
    if let Some(saving) = &r.dedupe_saving {
        s.push_str("\nCPU per event, without / with:");
        for (k, v) in saving {
            s.push_str(&format!(" {k} {v:.2}x;"));
        }
        s.push('\n');
    }
    s
}

/// Fails when the run's correctness checks failed (for CI): wrong users, users never
/// evaluated, lookup errors, audience estimates more than three standard errors off, or a dmp
/// that did not stop cleanly.
pub fn verdict(r: &Report) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    for p in &r.phases {
        if let Some(c) = &p.correctness {
            if c.wrong_total > 0 || c.not_evaluated > 0 || c.errors > 0 {
                problems.push(format!(
                    "{}: {} wrong users, {} not evaluated, {} failed lookups (first: {:?})",
                    p.label,
                    c.wrong_total,
                    c.not_evaluated,
                    c.errors,
                    c.wrong.first()
                ));
            }
        }
        // The intervals are two standard errors: about one estimate in twenty misses them by
        // design, so the verdict allows three before it calls a miss a failure.
        for a in p.audience.iter().filter(|a| {
            let half = (a.high - a.low) as f64 / 2.0;
            (a.truth as f64 - a.estimate as f64).abs() > 1.5 * half
        }) {
            problems.push(format!(
                "{}: audience {:?} estimated {} in [{}, {}], truth {} (beyond three standard errors)",
                p.label, a.expr, a.estimate, a.low, a.high, a.truth
            ));
        }
        if !p.graceful_stop {
            problems.push(format!("{}: dmp did not stop cleanly on SIGTERM", p.label));
        }
    }
    if !problems.is_empty() {
        bail!("the run's checks failed:\n{}", problems.join("\n"));
    }
    Ok(())
}

/// The seconds per second each role waited for a CPU while runnable, the most first (roles that
/// waited under 0.01 s per s left out), when the kernel keeps them.
fn cpu_wait_line(p: &Phase) -> Option<String> {
    if p.cpu_wait_per_s.is_empty() {
        return None;
    }
    let mut roles: Vec<(&String, &f64)> = p
        .cpu_wait_per_s
        .iter()
        .filter(|(_, w)| **w >= 0.01)
        .collect();
    roles.sort_by(|a, b| b.1.total_cmp(a.1));
    let list = if roles.is_empty() {
        "none".to_string()
    } else {
        roles
            .iter()
            .map(|(r, w)| format!("{r} {w:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    Some(format!(
        "\n{}: waiting for a CPU while runnable, seconds per second (a role above 0 could have used more CPU than it got; over time in {}-cpu-wait.png): {list}.\n",
        p.label, p.label
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_roles_waiting_for_a_cpu_then_the_summary_lists_them_the_most_first() {
        let mut p = Phase {
            label: "main".into(),
            ..Phase::default()
        };
        assert_eq!(cpu_wait_line(&p), None, "no scheduler times");
        p.cpu_wait_per_s = [
            ("segmenter".to_string(), 0.93),
            ("storage-writer".to_string(), 0.57),
            ("other".to_string(), 0.001),
            ("embedded-storage".to_string(), 1.39),
        ]
        .into();
        let w = cpu_wait_line(&p).unwrap();
        assert!(
            w.contains("main: waiting for a CPU")
                && w.contains("embedded-storage 1.39, segmenter 0.93, storage-writer 0.57."),
            "{w}"
        );
        assert!(
            !w.contains("other") && w.contains("main-cpu-wait.png"),
            "{w}"
        );
        p.cpu_wait_per_s = [("segmenter".to_string(), 0.0)].into();
        assert!(cpu_wait_line(&p).unwrap().contains(": none."));
    }

    #[test]
    fn given_memtables_over_their_bound_then_the_summary_says_so() {
        let mut p = Phase {
            label: "main".into(),
            memtables_peak_mib: 600.0,
            ..Phase::default()
        };
        assert_eq!(memtables_warning(&p, 64.0), None, "under 640 MiB");
        p.memtables_peak_mib = 1_950.0;
        let w = memtables_warning(&p, 64.0).expect("over 640 MiB");
        assert!(
            w.contains("1950 MiB") && w.contains("640 MiB") && w.contains("main-cpu.png"),
            "{w}"
        );
        assert_eq!(memtables_warning(&p, 256.0), None, "under 2560 MiB");
    }
}
