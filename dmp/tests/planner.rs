//! The planner page in a real browser: headless Chromium opens `/` on `dmp run` with an
//! expression in the URL; the rendered DOM holds the estimate, its interval and method and one
//! chart line per segment, and the screenshot shows the lines in their colours.
//! Needs `DMP_TEST_CHROMIUM` (the browser binary; scripts/test.sh installs Debian's chromium).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{post_events, sigterm, start_with_rules};

const RULES: &str = r#"
version = "planner-1"

[[segment]]
id = "cats"
when = '''any(url.host == "cats.example")'''

[[segment]]
id = "dogs"
when = '''any(url.host == "dogs.example")'''
"#;

fn chromium() -> String {
    std::env::var("DMP_TEST_CHROMIUM")
        .expect("DMP_TEST_CHROMIUM is not set (run scripts/test.sh, which installs chromium)")
}

fn browser(args: &[&str], url: &str) -> std::process::Output {
    let out = Command::new(chromium())
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=8000",
        ])
        .args(args)
        .arg(url)
        .output()
        .expect("chromium runs");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs chromium: run scripts/test.sh"]
async fn given_counted_segments_when_page_opened_in_chromium_then_numbers_and_chart_render() {
    let _ = chromium();
    let dir = tempfile::tempdir().unwrap();
    let (mut child, url) = start_with_rules(dir.path(), RULES);
    let now = dmp_core::clock::now_ms();
    let events: Vec<serde_json::Value> = (0..600)
        .map(|u| {
            let host = if u < 400 { "cats.example" } else { "dogs.example" };
            serde_json::json!({"uid": format!("u{u}"), "ts": now - 1000, "url": format!("https://{host}/")})
        })
        .collect();
    let http = reqwest::Client::new();
    post_events(&url, &events).await;
    let started = Instant::now();
    loop {
        let v: serde_json::Value =
            common::get_json(&http, format!("{url}/v1/audience?expr=all")).await;
        if v["estimate"].as_u64() == Some(600) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "not counted: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let page = format!("{url}/?expr=cats%20or%20dogs");

    let dom = String::from_utf8(browser(&["--dump-dom"], &page).stdout).unwrap();
    // The rendered elements (not the script's templates, which hold `${…}`).
    let estimate = dom
        .split("<span id=\"estimate\">")
        .nth(1)
        .and_then(|s| s.split('<').next())
        .unwrap_or_default();
    // 600 users: the theta sketches still hold all of them, so the answer is a count.
    assert_eq!(estimate, "600", "estimate in the page");
    assert!(dom.contains("<b id=\"method\">exact</b>"), "method missing");
    assert!(dom.contains("<span id=\"interval\">("), "interval missing");
    let chart = dom
        .split("<svg id=\"chart\"")
        .nth(1)
        .and_then(|s| s.split("</svg>").next())
        .unwrap_or_default();
    assert_eq!(
        chart.matches("<polyline class=\"series\"").count(),
        2,
        "one chart line per segment"
    );
    assert!(dom.contains("<button>cats</button>") && dom.contains("<button>dogs</button>"));

    let shot = dir.path().join("planner.png");
    browser(
        &[
            "--window-size=1024,800",
            &format!("--screenshot={}", shot.display()),
        ],
        &page,
    );
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&shot).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let bpp = info.line_size / info.width as usize;
    let near = |p: &[u8], c: [u8; 3]| p.iter().zip(c).all(|(a, b)| a.abs_diff(b) < 40);
    // Only the chart's rows (below the estimate; the Estimate button is blue too).
    let (mut blue, mut red) = (0, 0);
    let rows = 360..(info.height as usize).min(760);
    for px in buf[rows.start * info.line_size..rows.end * info.line_size].chunks(bpp) {
        if near(px, [0x24, 0x58, 0xc6]) {
            blue += 1;
        }
        if near(px, [0xd1, 0x49, 0x5b]) {
            red += 1;
        }
    }
    eprintln!("chart pixels: {blue} blue, {red} red");
    assert!(
        blue > 300 && red > 300,
        "chart colours: {blue} blue, {red} red pixels"
    );
    assert!(sigterm(&mut child).success());
}
