//! The files in `deploy/` stay consistent with the code: every metric a dashboard panel or an
//! alert uses is one dmp exports, the dashboard is valid JSON, and the compose file's
//! configuration passes `dmp config check`. (The compose file itself cannot run here: no Docker.)

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn rust_sources(dir: &Path, out: &mut String) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if p.is_dir() {
            if name != "target" && !name.starts_with('.') {
                rust_sources(&p, out);
            }
        } else if name.ends_with(".rs") {
            out.push_str(&std::fs::read_to_string(&p).unwrap());
        }
    }
}

/// `dmp_…` names in a text, without Prometheus's histogram suffixes.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("dmp_") {
        let start = i + at;
        let mut end = start;
        while end < b.len()
            && (b[end].is_ascii_lowercase() || b[end].is_ascii_digit() || b[end] == b'_')
        {
            end += 1;
        }
        let preceded = start > 0 && (b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
        if !preceded {
            let mut name = &text[start..end];
            for suffix in ["_bucket", "_sum", "_count"] {
                if let Some(n) = name.strip_suffix(suffix) {
                    if n.ends_with("_seconds")
                        || n.ends_with("_bytes")
                        || n.ends_with("_events")
                        || n.ends_with("_cells")
                    {
                        name = n;
                    }
                }
            }
            out.insert(name.to_string());
        }
        i = end.max(start + 4);
    }
    out
}

#[test]
fn given_deploy_files_when_checked_then_every_metric_exists_in_the_code() {
    let mut code = String::new();
    for dir in [
        "core",
        "bus",
        "store",
        "api",
        "storage-writer",
        "rules",
        "segmenter",
        "stats",
        "dmp",
    ] {
        rust_sources(&root().join(dir).join("src"), &mut code);
    }
    let deploy = root().join("deploy");
    let mut checked = 0;
    for file in ["prometheus/alerts.yml", "grafana/dmp-dashboard.json"] {
        let text = std::fs::read_to_string(deploy.join(file)).unwrap();
        let names = metric_names(&text);
        assert!(names.len() >= 8, "{file}: only {names:?}");
        for n in names {
            assert!(
                code.contains(&format!("\"{n}\"")),
                "{file} uses {n}, which no dmp code exports"
            );
            checked += 1;
        }
    }
    assert!(checked > 20, "{checked}");
}

#[test]
fn given_dashboard_when_parsed_then_every_panel_has_queries() {
    let text = std::fs::read_to_string(root().join("deploy/grafana/dmp-dashboard.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let panels = v["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    for p in panels {
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{}", p["title"]);
        for t in targets {
            assert!(
                t["expr"].as_str().unwrap().contains("dmp_"),
                "{}",
                p["title"]
            );
        }
    }
}

#[test]
fn given_compose_file_when_its_configuration_is_checked_then_dmp_accepts_it() {
    let text = std::fs::read_to_string(root().join("deploy/docker-compose.yml")).unwrap();
    let mut cmd = common::dmp();
    cmd.args(["config", "check"]);
    let mut n = 0;
    for line in text.lines() {
        let l = line.trim();
        if let Some((k, v)) = l.split_once(": ") {
            if k.starts_with("DMP__") {
                cmd.env(k, v.trim_matches('"'));
                n += 1;
            }
        }
    }
    assert!(n >= 3, "{n} settings found");
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let effective = String::from_utf8_lossy(&out.stdout);
    assert!(effective.contains("kafka://kafka:9092") && effective.contains("redis://redis:6379"));
}
