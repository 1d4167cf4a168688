//! The rule language, construct by construct, over rows shaped as the storage writer writes them.

use std::time::Duration;

use dmp_core::clock::DAY_MS;
use dmp_core::{Cell, Row};
use dmp_rules::file::parse_rules;
use dmp_rules::{RuleSet, RuleWatcher};

const NOW: i64 = 1_795_341_600_000;

/// A row from events: (days ago, [(qualifier, value)]).
fn row(uid: &str, events: &[(f64, &[(&str, &str)])]) -> Row {
    let mut r = Row {
        key: uid.into(),
        cells: Vec::new(),
    };
    let mut first = i64::MAX;
    for (days, cells) in events {
        let ts = NOW - (days * DAY_MS as f64) as i64;
        first = first.min(ts);
        for (q, v) in *cells {
            r.cells.push(Cell::new("e", *q, ts, v.as_bytes().to_vec()));
        }
    }
    if first != i64::MAX {
        r.cells.push(Cell::new(
            "m",
            "first_seen",
            i64::MAX - first,
            first.to_be_bytes().to_vec(),
        ));
    }
    r.sort();
    r
}

fn set(rules: &str) -> RuleSet {
    let text = format!("version = \"t1\"\n{rules}");
    let (version, rules) = parse_rules("test.toml", &text).unwrap_or_else(|e| panic!("{e:?}"));
    RuleSet::new(version, rules, "test.toml").unwrap()
}

fn segments(set: &RuleSet, row: &Row, now: i64) -> Vec<String> {
    set.evaluate(row, now).live.keys().cloned().collect()
}

fn one(rule: &str, row: &Row) -> bool {
    let s = set(&format!("[[segment]]\nid = \"s\"\nwhen = '''{rule}'''\n"));
    !segments(&s, row, NOW).is_empty()
}

fn errors(text: &str) -> Vec<String> {
    match parse_rules("bad.toml", text) {
        Ok((v, rules)) => match RuleSet::new(v, rules, "bad.toml") {
            Ok(_) => Vec::new(),
            Err(e) => e.iter().map(|e| e.to_string()).collect(),
        },
        Err(e) => e.iter().map(|e| e.to_string()).collect(),
    }
}

#[test]
fn given_event_fields_when_compared_then_equals_contains_regex_and_in_list_work() {
    let r = row(
        "u",
        &[(
            1.0,
            &[
                ("type", "search"),
                ("url", "https://Bank.Example:443/mortgage/calc?x=1"),
                ("ref", "https://www.google.com/search"),
                ("q", "Ипотека в Новосибирске"),
                ("src", "pixel"),
                ("geo", "RU/Novosibirsk Oblast/Novosibirsk"),
                ("ua.br", "Firefox 121.0"),
                ("ua.os", "Linux"),
                ("ua.dev", "pc"),
                ("a.gender", "f"),
            ],
        )],
    );
    let yes = [
        r#"any(type == "search")"#,
        r#"any(url.host == "bank.example")"#,
        r#"any(url.path == "/mortgage/calc")"#,
        r#"any(ref.host == "www.google.com")"#,
        r#"any(q contains "ипотека")"#,
        r#"any(q ~ "(?i)новосиб")"#,
        r#"any(src in ["partner", "pixel"])"#,
        r#"any(geo.country == "RU" and geo.city == "Novosibirsk")"#,
        r#"any(geo.region contains "novosibirsk")"#,
        r#"any(q contains "ИПОТЕКА")"#,
        r#"any(url contains "BANK.example")"#,
        r#"any(ua.browser ~ "^Firefox" and ua.os == "Linux" and ua.device == "pc")"#,
        r#"any(a.gender == "f")"#,
        r#"attr("gender") == "f""#,
        r#"any(attr("gender") == "f")"#,
        r#"not any(type == "purchase")"#,
        r#"any(type != "purchase")"#,
    ];
    for rule in yes {
        assert!(one(rule, &r), "{rule} should match");
    }
    let no = [
        r#"any(type == "Search")"#,
        r#"any(url.host == "cats.example")"#,
        r#"any(q ~ "^mortgage")"#,
        r#"any(src in ["partner"])"#,
        r#"attr("age") == "31""#,
        r#"attr("age") != "31""#,
        r#"any(a.missing != "x")"#,
    ];
    for rule in no {
        assert!(!one(rule, &r), "{rule} should not match");
    }
}

/// A row with one event a day ago whose user agent is one `ua` cell: its 8-byte dictionary id,
/// then browser, OS and device class, each ended by a 0 byte (as the storage writer writes it).
fn row_with_ua_cell(parts: &str) -> Row {
    let mut r = row("u", &[(1.0, &[("type", "pageview")])]);
    let ts = r.latest("e", "type").unwrap().ts;
    let mut value = 0x0102_0304_0506_0708u64.to_be_bytes().to_vec();
    value.extend_from_slice(parts.as_bytes());
    r.cells.push(Cell::new("e", "ua", ts, value));
    r.sort();
    r
}

#[test]
fn given_the_user_agent_in_one_cell_or_in_cells_of_its_own_when_rules_read_its_parts_then_both_answer_alike(
) {
    let one_cell = row_with_ua_cell("Firefox 121.0\0Linux\0pc\0");
    // Rows written before the parts moved into the `ua` cell: an 8-byte id and a cell per part.
    let mut own_cells = row(
        "u",
        &[(
            1.0,
            &[
                ("type", "pageview"),
                ("ua.br", "Firefox 121.0"),
                ("ua.os", "Linux"),
                ("ua.dev", "pc"),
            ],
        )],
    );
    let ts = own_cells.latest("e", "type").unwrap().ts;
    own_cells
        .cells
        .push(Cell::new("e", "ua", ts, 7u64.to_be_bytes().to_vec()));
    own_cells.sort();
    let yes = [
        r#"any(ua.browser ~ "^Firefox" and ua.os == "Linux" and ua.device == "pc")"#,
        r#"any(ua.browser == "Firefox 121.0")"#,
        r#"any(ua.device in ["smartphone", "pc"])"#,
        r#"any(ua.os contains "LINUX")"#,
        r#"any(ua.browser contains "firefox")"#,
        r#"count(ua.device == "pc", 30d) >= 1"#,
        r#"any(ua.os != "Windows")"#,
    ];
    let no = [
        r#"any(ua.device == "smartphone")"#,
        r#"any(ua.os == "Firefox 121.0")"#,
        r#"any(ua.device == "Linux")"#,
        r#"any(ua.browser == "")"#,
        r#"any(ua.os ~ "^Win")"#,
    ];
    for r in [&one_cell, &own_cells] {
        for rule in yes {
            assert!(one(rule, r), "{rule} should match {r:?}");
        }
        for rule in no {
            assert!(!one(rule, r), "{rule} should not match {r:?}");
        }
    }
    // An agent the parser did not know: empty browser and OS.
    let unknown = row_with_ua_cell("\0\0UNKNOWN\0");
    assert!(one(r#"any(ua.browser == "" and ua.os == "")"#, &unknown));
    assert!(one(r#"any(ua.device == "UNKNOWN")"#, &unknown));
    assert!(!one(r#"any(ua.device == "pc")"#, &unknown));
    // Evidence shows the id in hex and the parts by name.
    let s = set("[[segment]]\nid = \"s\"\nwhen = '''any(ua.device == \"pc\")'''\n");
    let ev = s.explain(&one_cell, NOW);
    let cells = &ev.live["s"].evidence[0].cells;
    for (q, v) in [
        ("ua", "0102030405060708"),
        ("ua.br", "Firefox 121.0"),
        ("ua.os", "Linux"),
        ("ua.dev", "pc"),
        ("type", "pageview"),
    ] {
        assert!(
            cells.iter().any(|(cq, cv)| cq == q && cv == v),
            "{q} = {v} in {cells:?}"
        );
    }
}

#[test]
fn given_searches_over_time_when_counting_in_a_window_then_only_the_window_counts() {
    let mortgage = [("type", "search"), ("q", "mortgage rates")];
    let r = row(
        "u",
        &[
            (1.0, &mortgage),
            (5.0, &mortgage),
            (29.0, &mortgage),
            (40.0, &mortgage),
        ],
    );
    assert!(one(
        r#"count(type == "search" and q contains "mortgage", 30d) >= 3"#,
        &r
    ));
    assert!(!one(
        r#"count(type == "search" and q contains "mortgage", 30d) >= 4"#,
        &r
    ));
    assert!(
        one(r#"count(q contains "mortgage") == 4"#, &r),
        "no window: all history"
    );
    assert!(one(r#"count(q contains "mortgage", 6d) == 2"#, &r));
    assert!(one(r#"count(q contains "mortgage", 2w) < 3"#, &r));
}

#[test]
fn given_recency_and_first_seen_when_checked_then_durations_compare() {
    let r = row(
        "u",
        &[
            (3.0, &[("type", "pageview")]),
            (100.0, &[("type", "pageview")]),
        ],
    );
    assert!(one(r#"since(type == "pageview") <= 7d"#, &r));
    assert!(!one(r#"since(type == "pageview") <= 2d"#, &r));
    assert!(
        !one(r#"since(type == "purchase") <= 365d"#, &r),
        "never happened: no match"
    );
    assert!(one(r#"first_seen >= 90d"#, &r));
    assert!(!one(r#"first_seen <= 30d"#, &r));
    let newcomer = row("n", &[(2.0, &[("type", "pageview")])]);
    assert!(one(r#"first_seen <= 30d"#, &newcomer));
}

#[test]
fn given_boolean_logic_and_numbers_when_evaluated_then_and_or_not_precedence_holds() {
    let r = row("u", &[(1.0, &[("type", "click"), ("a.car_year", "2019")])]);
    assert!(
        one(
            r#"any(type == "click") or any(type == "nope") and false"#,
            &r
        ),
        "and binds tighter"
    );
    assert!(!one(
        r#"(any(type == "click") or any(type == "nope")) and false"#,
        &r
    ));
    assert!(one(r#"not (any(type == "nope") or false)"#, &r));
    assert!(one(r#"num(attr("car_year")) <= 2023"#, &r));
    assert!(!one(r#"num(attr("car_year")) > 2023"#, &r));
    assert!(
        !one(r#"num(attr("gender")) > 0"#, &r),
        "missing or non-numbers never compare"
    );
}

/// The classic DMP example: women who like cats and search for a car service, with a car older
/// than three years.
#[test]
fn given_the_classic_example_when_evaluated_then_only_the_right_user_is_in() {
    let rules = r#"
[[segment]]
id = "women"
when = '''attr("gender") == "f"'''

[[segment]]
id = "cat_lovers"
when = '''count(url.host in ["cats.example", "koshki.ru"] or q contains "кошк", 90d) >= 2'''

[[segment]]
id = "car_service_seekers"
when = '''
any(type == "search" and (q contains "car service" or q ~ "(?i)автосервис|шиномонтаж"), 30d)
and num(attr("car_year")) <= 2023   # a car older than three years
'''

[[segment]]
id = "women_cats_old_car_service"
when = '''segment("women") and segment("cat_lovers") and segment("car_service_seekers")'''
"#;
    let s = set(rules);
    let anna = row(
        "anna",
        &[
            (
                2.0,
                &[
                    ("type", "search"),
                    ("q", "Автосервис Ленинский"),
                    ("a.gender", "f"),
                    ("a.car_year", "2018"),
                ],
            ),
            (
                10.0,
                &[("type", "pageview"), ("url", "https://koshki.ru/breeds")],
            ),
            (20.0, &[("type", "search"), ("q", "корм для кошки")]),
        ],
    );
    let mut ivan = anna.clone();
    ivan.key = "ivan".into();
    for c in &mut ivan.cells {
        if c.qualifier == "a.gender" {
            c.value = b"m".to_vec().into();
        }
    }
    let mut new_car = anna.clone();
    new_car.key = "olga".into();
    for c in &mut new_car.cells {
        if c.qualifier == "a.car_year" {
            c.value = b"2025".to_vec().into();
        }
    }
    assert_eq!(
        segments(&s, &anna, NOW),
        vec![
            "car_service_seekers",
            "cat_lovers",
            "women",
            "women_cats_old_car_service"
        ]
    );
    assert!(!segments(&s, &ivan, NOW).contains(&"women_cats_old_car_service".to_string()));
    assert!(!segments(&s, &new_car, NOW).contains(&"women_cats_old_car_service".to_string()));
    // Evidence names the events that matched (asked for: the segmenter's path skips it).
    assert!(s.evaluate(&anna, NOW).live["cat_lovers"]
        .evidence
        .is_empty());
    let ev = s.explain(&anna, NOW);
    let cats = &ev.live["cat_lovers"];
    assert_eq!(cats.evidence.len(), 2);
    assert!(cats.evidence.iter().any(|e| e
        .cells
        .iter()
        .any(|(q, v)| q == "url" && v.contains("koshki"))));
}

#[test]
fn given_window_rule_when_time_passes_then_recheck_time_is_when_the_user_leaves() {
    // Three searches within 7 days; the oldest was 5 days ago: on day 2 from now it leaves.
    let s = set(r#"
[[segment]]
id = "three_searches"
when = '''count(type == "search", 7d) >= 3'''
"#);
    let search = [("type", "search")];
    let r = row("u", &[(1.0, &search), (3.0, &search), (5.0, &search)]);
    let now = s.evaluate(&r, NOW);
    assert!(now.live.contains_key("three_searches"));
    let oldest = NOW - 5 * DAY_MS;
    assert_eq!(now.recheck_at, Some(oldest + 7 * DAY_MS + 1));
    assert!(
        s.evaluate(&r, oldest + 7 * DAY_MS)
            .live
            .contains_key("three_searches"),
        "the window includes its edge"
    );
    let later = s.evaluate(&r, now.recheck_at.unwrap());
    assert!(
        !later.live.contains_key("three_searches"),
        "the user leaves at the recheck time, without a new event"
    );
    // Recency rules recheck when the bound passes.
    let s = set("[[segment]]\nid = \"recent\"\nwhen = '''since(type == \"search\") <= 7d'''\n");
    let e = s.evaluate(&r, NOW);
    assert_eq!(e.recheck_at, Some(NOW - DAY_MS + 7 * DAY_MS + 1));
    assert!(!s
        .evaluate(&r, NOW - DAY_MS + 7 * DAY_MS + 1)
        .live
        .contains_key("recent"));
    // any() holds until its newest match leaves the window (not its oldest), explained or not.
    let s = set("[[segment]]\nid = \"searched\"\nwhen = '''any(type == \"search\", 7d)'''\n");
    let newest_leaves = NOW - DAY_MS + 7 * DAY_MS + 1;
    assert_eq!(s.evaluate(&r, NOW).recheck_at, Some(newest_leaves));
    let explained = s.explain(&r, NOW);
    assert_eq!(explained.recheck_at, Some(newest_leaves));
    assert_eq!(
        explained.live["searched"].evidence.len(),
        3,
        "explain walks every match"
    );
    assert!(s
        .evaluate(&r, newest_leaves - 1)
        .live
        .contains_key("searched"));
    assert!(!s.evaluate(&r, newest_leaves).live.contains_key("searched"));
}

#[test]
fn given_more_matches_than_a_count_needs_when_evaluated_then_the_recheck_is_when_the_count_falls_short(
) {
    // Five searches, 1 to 5 days ago; two are enough. The user stays in until the second newest
    // (2 days ago) leaves the 7-day window, not when the oldest does (as it did before).
    let search = [("type", "search")];
    let r = row(
        "u",
        &[
            (1.0, &search),
            (2.0, &search),
            (3.0, &search),
            (4.0, &search),
            (5.0, &search),
        ],
    );
    let rule = |when: &str| set(&format!("[[segment]]\nid = \"s\"\nwhen = '''{when}'''\n"));
    let s = rule(r#"count(type == "search", 7d) >= 2"#);
    let second_leaves = NOW - 2 * DAY_MS + 7 * DAY_MS + 1;
    let now = s.evaluate(&r, NOW);
    assert!(now.live.contains_key("s"));
    assert_eq!(now.recheck_at, Some(second_leaves));
    assert!(s.evaluate(&r, second_leaves - 1).live.contains_key("s"));
    assert!(!s.evaluate(&r, second_leaves).live.contains_key("s"));
    // Explained: every match is evidence, the recheck time is the same.
    let explained = s.explain(&r, NOW);
    assert_eq!(explained.recheck_at, Some(second_leaves));
    assert_eq!(explained.live["s"].evidence.len(), 5);
    // Short of the count: time can only take matches away, so there is nothing to recheck.
    let e = rule(r#"count(type == "search", 7d) >= 6"#).evaluate(&r, NOW);
    assert!(e.live.is_empty());
    assert_eq!(e.recheck_at, None);
    // Every comparison with a literal, either side, whole or not.
    for (when, member) in [
        (r#"count(type == "search", 7d) > 4"#, true),
        (r#"count(type == "search", 7d) > 4.5"#, true),
        (r#"count(type == "search", 7d) > 5"#, false),
        (r#"count(type == "search", 7d) >= 4.5"#, true),
        (r#"count(type == "search", 7d) < 5"#, false),
        (r#"count(type == "search", 7d) < 5.5"#, true),
        (r#"count(type == "search", 7d) <= 4.9"#, false),
        (r#"count(type == "search", 7d) <= 5"#, true),
        (r#"count(type == "search", 7d) >= 0"#, true),
        (r#"count(type == "search", 7d) < 0"#, false),
        (r#"3 <= count(type == "search", 7d)"#, true),
        (r#"6 <= count(type == "search", 7d)"#, false),
        (r#"5 > count(type == "search", 7d)"#, false),
        (r#"count(type == "search", 7d) >= 99999999999"#, false),
        (r#"count(type == "search", 7d) == 5"#, true),
        (r#"count(type == "search", 7d) != 5"#, false),
    ] {
        assert_eq!(one(when, &r), member, "{when}");
    }
}

#[test]
fn given_shadow_rule_when_evaluated_then_results_go_to_shadow_for_a_stable_sample() {
    let s = set(r#"
[[segment]]
id = "trial"
mode = "shadow"
sample = 0.3
when = '''any(type == "pageview")'''
"#);
    let mut sampled = 0;
    for i in 0..2000 {
        let r = row(&format!("user-{i}"), &[(1.0, &[("type", "pageview")])]);
        let e = s.evaluate(&r, NOW);
        assert!(e.live.is_empty(), "shadow results never reach live");
        if e.shadow.contains_key("trial") {
            sampled += 1;
            assert!(
                s.evaluate(&r, NOW).shadow.contains_key("trial"),
                "the sample is stable"
            );
        }
    }
    assert!(
        (450..750).contains(&sampled),
        "{sampled} of 2000 sampled at 0.3"
    );
}

#[test]
fn given_builtin_crawler_rule_when_row_has_the_flag_then_segment_and_usable_as_input() {
    let (v, mut rules) = parse_rules(
        "t.toml",
        "version = \"1\"\n[[segment]]\nid = \"humans\"\nwhen = '''not segment(\"known_crawler\")'''\n",
    )
    .unwrap();
    rules.extend(dmp_rules::builtin::builtin_rules());
    let s = RuleSet::new(v, rules, "t.toml").unwrap();
    let mut bot = row("b", &[(1.0, &[("type", "pageview")])]);
    bot.cells
        .push(Cell::new("m", "crawler", NOW, b"1".to_vec()));
    bot.sort();
    assert_eq!(segments(&s, &bot, NOW), vec!["known_crawler"]);
    assert_eq!(
        segments(&s, &row("h", &[(1.0, &[("type", "pageview")])]), NOW),
        vec!["humans"]
    );
}

#[test]
fn given_bad_rule_files_when_loaded_then_errors_give_file_line_column_and_reason() {
    let cases: &[(&str, &str)] = &[
        (
            "version = \"1\"\n[[segment]]\nid = \"a\"\nwhen = '''\ncount(type == \"search\", 30d) >=\n'''\n",
            "bad.toml:6:1: segment a: expected a value, found the end of the rule",
        ),
        (
            "version = \"1\"\n[[segment]]\nid = \"a\"\nwhen = '''any(colour == \"red\")'''\n",
            "bad.toml:4:15: segment a: unknown name \"colour\"",
        ),
        (
            "version = \"1\"\n[[segment]]\nid = \"a\"\nwhen = '''url == \"x\"'''\n",
            "bad.toml:4:11: segment a: field url is a property of an event",
        ),
        (
            "version = \"1\"\n[[segment]]\nid = \"a\"\nwhen = '''count(type == \"x\") >= \"3\"'''\n",
            "cannot compare a number with text",
        ),
        ("version = \"1\"\n[[segment]]\nid = \"a\"\nwhen = '''avg(type)'''\n", "unknown function avg()"),
        ("version = \"1\"\n[[segment]]\nid = \"a\"\nwhen = '''any(q ~ \"(\")'''\n", "bad regular expression"),
        ("version = \"1\"\n[[segment]]\nid = \"a\"\nwhen = '''any(type = \"x\")'''\n", "use == to compare"),
        ("version = \"1\"\n[[segment]]\nid = \"a\"\nwhen = '''count(type == \"x\", 30y) > 1'''\n", "unknown duration unit"),
        ("version = \"1\"\n[[segment]]\nid = \"a\"\nwhen = '''any(any(type == \"x\"))'''\n", "cannot be nested"),
        ("version = \"1\"\n[[segment]]\nid = \"a\"\nmode = \"dark\"\nwhen = '''true'''\n", "bad.toml:4:8: segment a: mode must be"),
        ("version = \"1\"\n[[segment]]\nid = \"a\"\nsample = 0.5\nwhen = '''true'''\n", "`sample` applies to mode = \"shadow\" only"),
        ("version = \"1\"\n[[segment]]\nid = \"a\"\nmode = \"shadow\"\nsample = 1.5\nwhen = '''true'''\n", "sample must be in (0, 1]"),
        ("version = \"1\"\n[[segment]]\nid = \"Bad-Id\"\nwhen = '''true'''\n", "bad.toml:3:6: segment id \"Bad-Id\""),
        ("version = \"1\"\n[[segment]]\nid = \"a\"\nwhen = '''true'''\ncolour = 1\n", "bad.toml:5:1: unknown field `colour`"),
        ("version = \"1\"\n[[segment]]\nid = \"a\"\n", "missing field `when`"),
        ("[[segment]]\nid = \"a\"\nwhen = '''true'''\n", "missing field `version`"),
        ("version = \"1\"\n[[segment]\n", "bad.toml:2:"),
        (
            "version = \"1\"\n[[segment]]\nid = \"a\"\nwhen = '''true'''\n[[segment]]\nid = \"a\"\nwhen = '''false'''\n",
            "segment id \"a\" is defined twice",
        ),
        ("version = \"1\"\n[[segment]]\nid = \"a\"\nwhen = '''segment(\"nope\")'''\n", "reads unknown segment \"nope\""),
        (
            "version = \"1\"\n[[segment]]\nid = \"a\"\nwhen = '''segment(\"b\")'''\n[[segment]]\nid = \"b\"\nwhen = '''segment(\"a\")'''\n",
            "cycle: a -> b -> a",
        ),
        ("version = \"1\"\n[[segment]]\nid = \"a\"\nwhen = '''count(type == \"x\")'''\n", "a rule must be a condition"),
    ];
    for (text, want) in cases {
        let errs = errors(text);
        assert!(
            errs.iter().any(|e| e.contains(want)),
            "for {text:?}\nwant {want:?}\ngot {errs:?}"
        );
    }
    // Every error of a file is reported, not just the first.
    let two = errors("version = \"1\"\n[[segment]]\nid = \"a\"\nwhen = '''any(x == 1)'''\n[[segment]]\nid = \"b\"\nwhen = '''avg()'''\n");
    assert_eq!(two.len(), 2, "{two:?}");
}

#[test]
fn given_rule_file_when_changed_then_reloaded_and_a_bad_file_never_replaces_a_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.toml");
    let good = |v: &str, cond: &str| {
        format!("version = \"{v}\"\n[[segment]]\nid = \"s\"\nwhen = '''{cond}'''\n")
    };
    std::fs::write(&path, good("v1", "any(type == \"a\")")).unwrap();
    let w = RuleWatcher::start(path.clone(), Duration::from_millis(20)).unwrap();
    assert_eq!(w.current().version(), "v1");
    let wait_for = |want: &str| {
        for _ in 0..200 {
            if w.current().version() == want {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!(
            "version {want} never loaded; have {}",
            w.current().version()
        );
    };
    std::fs::write(&path, good("v2", "any(type == \"b\")")).unwrap();
    wait_for("v2");
    std::fs::write(
        &path,
        "version = \"v3\"\n[[segment]]\nid = \"s\"\nwhen = '''any(type == )'''\n",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        w.current().version(),
        "v2",
        "a bad file must not replace the good rules"
    );
    std::fs::write(&path, good("v4", "true")).unwrap();
    wait_for("v4");
    // A bad file at start is an error naming the problem.
    std::fs::write(
        &path,
        "version = \"x\"\n[[segment]]\nid = \"s\"\nwhen = '''nope'''\n",
    )
    .unwrap();
    let e = RuleWatcher::start(path.clone(), Duration::from_millis(20))
        .err()
        .unwrap();
    assert!(e[0].to_string().contains("rules.toml:4:"), "{}", e[0]);
}

proptest::proptest! {
    /// A count compared with a literal: the same answer as counting every match, and the recheck
    /// time is exactly when that answer first changes with no new event (none when it never does).
    #[test]
    fn given_any_events_and_threshold_when_a_count_is_compared_then_answer_and_recheck_are_exact(
        events in proptest::collection::vec((0u32..20 * 24, proptest::bool::ANY), 0..12),
        n in 0u32..14,
        op in proptest::sample::select(vec![">=", ">", "<", "<=", "==", "!="]),
        literal_first in proptest::bool::ANY,
    ) {
        let (search, view) = ([("type", "search")], [("type", "view")]);
        let mut hours: Vec<(u32, bool)> = events;
        hours.sort_by_key(|(h, _)| *h);
        hours.dedup_by_key(|(h, _)| *h); // one event per time
        let evs: Vec<(f64, &[(&str, &str)])> = hours
            .iter()
            .map(|(h, m)| (f64::from(*h) / 24.0, if *m { &search[..] } else { &view[..] }))
            .collect();
        let r = row("u", &evs);
        let lit = f64::from(n) / 2.0; // whole and half numbers
        let count = r#"count(type == "search", 7d)"#;
        let when = if literal_first {
            let mirrored = match op { ">=" => "<=", ">" => "<", "<" => ">", "<=" => ">=", o => o };
            format!("{lit} {mirrored} {count}")
        } else {
            format!("{count} {op} {lit}")
        };
        let s = set(&format!("[[segment]]\nid = \"s\"\nwhen = '''{when}'''\n"));
        let member = |at: i64| s.evaluate(&r, at).live.contains_key("s");
        let naive = |at: i64| {
            let c = hours
                .iter()
                .filter(|(h, m)| *m && NOW - i64::from(*h) * 3_600_000 >= at - 7 * DAY_MS)
                .count() as f64;
            match op {
                ">=" => c >= lit, ">" => c > lit, "<" => c < lit,
                "<=" => c <= lit, "==" => c == lit, _ => c != lit,
            }
        };
        proptest::prop_assert_eq!(member(NOW), naive(NOW), "{}", when);
        match s.evaluate(&r, NOW).recheck_at {
            Some(t) => {
                proptest::prop_assert!(t > NOW);
                proptest::prop_assert_eq!(member(t), naive(t), "{}", when);
                if op != "==" && op != "!=" {
                    // Exact for thresholds: unchanged until then, changed at it.
                    proptest::prop_assert_eq!(member(t - 1), member(NOW), "{}", when);
                    proptest::prop_assert_ne!(member(t), member(NOW), "{}", when);
                }
            }
            None => {
                for later in [1, 3, 8, 30] {
                    let at = NOW + later * DAY_MS;
                    proptest::prop_assert_eq!(member(at), member(NOW), "{} at +{}d", when, later);
                }
            }
        }
    }
}
