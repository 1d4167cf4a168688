//! Synthetic web traffic: a population of users with heavy-tailed activity, sessions of a few
//! pages within seconds, searches from Russian and English vocabularies, real browser user
//! agents, and bots (about 5% of users: many visits, crawler or spoofed user agents).
//!
//! Each user has fixed interests drawn from the population's mix, so the ground truth of
//! [`Generator::truth`] (who should be in which segment of `scenarios/demo-rules.toml`) is known.
//! This is the first part of the loadtest issue's generator: the partner bursts, the daily
//! curve and the scenario files are not built yet.

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

const INTERESTS: [Interest; 4] = [
    Interest::Cats,
    Interest::Mortgage,
    Interest::CarService,
    Interest::News,
];

impl Interest {
    fn host(self) -> &'static str {
        match self {
            Interest::Cats => "cats.example",
            Interest::Mortgage => "bank.example",
            Interest::CarService => "autoservice.example",
            Interest::News => "news.example",
        }
    }

    fn queries(self) -> &'static [&'static str] {
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

const USER_AGENTS: [&str; 5] = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.6 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_6) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.6 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
];

const BOT_AGENTS: [&str; 2] = [
    "Mozilla/5.0 (compatible; YandexBot/3.0; +http://yandex.com/bots)",
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
];

/// A small, fast, seedable generator (SplitMix64).
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Debug, Clone)]
struct User {
    uid: String,
    interests: Vec<Interest>,
    bot: bool,
    ua: &'static str,
    ip: String,
    /// Relative activity (heavy-tailed).
    weight: f64,
}

/// The traffic generator.
#[derive(Debug, Clone)]
pub struct Generator {
    rng: Rng,
    users: Vec<User>,
    /// Cumulative activity weights, to pick users.
    cumulative: Vec<f64>,
}

impl Generator {
    /// A population of `users` users from `seed`.
    pub fn new(seed: u64, users: usize) -> Generator {
        let mut rng = Rng(seed);
        let mut population = Vec::with_capacity(users);
        for i in 0..users {
            let bot = rng.below(100) < 5;
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
                50.0
            } else {
                1.0 / (1.0 - rng.unit()).powf(0.7)
            };
            population.push(User {
                uid: format!("demo-{seed:x}-{i}"),
                interests,
                bot,
                ua: if bot {
                    BOT_AGENTS[rng.below(2) as usize]
                } else {
                    USER_AGENTS[rng.below(5) as usize]
                },
                ip: format!("178.49.{}.{}", rng.below(256), 1 + rng.below(254)),
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
        }
    }

    fn pick(&mut self) -> usize {
        let total = *self.cumulative.last().unwrap_or(&1.0);
        let x = self.rng.unit() * total;
        self.cumulative
            .partition_point(|c| *c < x)
            .min(self.users.len() - 1)
    }

    /// About `n` events (whole sessions) ending at `now` (ms): each session is 1-5 pageviews or
    /// searches of one user within a few seconds.
    pub fn batch(&mut self, now: i64, n: usize) -> Vec<serde_json::Value> {
        let mut out = Vec::with_capacity(n + 5);
        while out.len() < n {
            let u = self.pick();
            let pages = 1 + self.rng.below(5) as i64;
            let start = now - self.rng.below(2_000) as i64 - pages * 1_500;
            for k in 0..pages {
                let user = &self.users[u];
                let interest = user.interests[self.rng.below(user.interests.len() as u64) as usize];
                let ts = start + k * (300 + self.rng.below(1_500) as i64);
                let search = !user.bot && interest != Interest::News && self.rng.below(3) == 0;
                let mut ev = serde_json::json!({
                    "uid": user.uid,
                    "ts": ts,
                    "ua": user.ua,
                    "ip": user.ip,
                    "src": "demo",
                });
                if search {
                    let qs = interest.queries();
                    ev["type"] = "search".into();
                    ev["q"] = qs[self.rng.below(qs.len() as u64) as usize].into();
                    ev["url"] = format!("https://search.example/?from={}", interest.host()).into();
                } else {
                    ev["type"] = "pageview".into();
                    ev["url"] =
                        format!("https://{}/p/{}", interest.host(), self.rng.below(500)).into();
                }
                out.push(ev);
            }
        }
        out
    }

    /// Ground truth: for each segment of the demo rules, the human users who can be in it.
    pub fn truth(&self) -> BTreeMap<&'static str, Vec<&str>> {
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

/// The rule file that matches the generator's interests.
pub const DEMO_RULES: &str = include_str!("../scenarios/demo-rules.toml");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_seed_when_generating_then_deterministic_sessions_with_bots_and_truth() {
        let mut a = Generator::new(7, 1_000);
        let mut b = Generator::new(7, 1_000);
        let (ea, eb) = (
            a.batch(1_795_341_600_000, 500),
            b.batch(1_795_341_600_000, 500),
        );
        assert_eq!(ea, eb, "same seed, same traffic");
        assert!(ea.len() >= 500);
        assert!((20..=90).contains(&a.bots()), "{} bots of 1000", a.bots());
        let searches = ea.iter().filter(|e| e["type"] == "search").count();
        assert!(searches > 20, "{searches}");
        assert!(
            ea.iter()
                .any(|e| e["q"].as_str().is_some_and(|q| !q.is_ascii())),
            "Russian queries"
        );
        // Bots are 5% of users but a large share of the traffic (as FACETz saw).
        let bot_events = ea
            .iter()
            .filter(|e| e["ua"].as_str().unwrap().contains("bot"))
            .count();
        assert!(
            (ea.len() * 3 / 10..ea.len() * 8 / 10).contains(&bot_events),
            "{bot_events} of {} events from bots",
            ea.len()
        );
        // Humans are heavy-tailed too: the busiest makes several times the median's events.
        let mut per: BTreeMap<&str, usize> = BTreeMap::new();
        for e in ea
            .iter()
            .filter(|e| !e["ua"].as_str().unwrap().contains("bot"))
        {
            *per.entry(e["uid"].as_str().unwrap()).or_default() += 1;
        }
        let mut counts: Vec<usize> = per.values().copied().collect();
        counts.sort_unstable();
        assert!(
            counts[counts.len() - 1] >= 3 * counts[counts.len() / 2],
            "{counts:?}"
        );
        let t = a.truth();
        assert_eq!(t.len(), 4, "{:?}", t.keys());
    }

    #[test]
    fn demo_rules_parse_and_name_the_generators_segments() {
        let (_, rules) = dmp_rules::file::parse_rules("demo-rules.toml", DEMO_RULES).unwrap();
        let ids: Vec<String> = rules.iter().map(|r| r.id().to_string()).collect();
        for i in INTERESTS {
            assert!(ids.contains(&i.segment().to_string()), "{ids:?}");
        }
    }
}
