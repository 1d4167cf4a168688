//! Scenario files (`loadtest/scenarios/*.toml`): the population, the traffic, the driver, the
//! backends and the checks of one loadtest run. Unknown keys are errors naming the key; string
//! values may name environment variables as `${VAR}` (for broker addresses).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// A scenario.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name, used in the run directory.
    pub name: String,
    /// What the scenario shows.
    #[serde(default)]
    pub description: String,
    /// Seed of the population and the traffic.
    #[serde(default = "one")]
    pub seed: u64,
    /// Users in the population.
    pub users: usize,
    /// Share of bots.
    #[serde(default = "bot_share")]
    pub bot_share: f64,
    /// The traffic.
    pub traffic: Traffic,
    /// How events reach dmp.
    #[serde(default)]
    pub driver: Driver,
    /// The dmp under test.
    #[serde(default)]
    pub dmp: Dmp,
    /// What is checked and measured besides throughput and latency.
    #[serde(default)]
    pub checks: Checks,
}

fn one() -> u64 {
    1
}
fn bot_share() -> f64 {
    0.05
}

/// Open loop at a fixed rate, or a ramp that finds the highest sustainable rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Events are due on a fixed schedule whatever dmp does (no coordinated omission).
    Open,
    /// Steps of rising rate; the highest step dmp sustains is the answer.
    FindMax,
}

/// `[traffic]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Traffic {
    /// `open` or `find_max`.
    pub mode: Mode,
    /// Events per second (open: the target; find_max: the first step).
    pub rate: f64,
    /// Seconds of traffic (open), or per step (find_max).
    pub seconds: u64,
    /// Seconds at the start left out of the figures.
    #[serde(default)]
    pub warmup_seconds: u64,
    /// find_max: each step multiplies the rate by this.
    #[serde(default = "step_factor")]
    pub step_factor: f64,
    /// find_max: at most this many steps.
    #[serde(default = "max_steps")]
    pub max_steps: u32,
    /// find_max: seconds of traffic at `rate` before the first step, not a step itself, so the
    /// steps measure a store that has grown (its row cache full, its first compactions done)
    /// rather than a young one.
    #[serde(default)]
    pub prefill_seconds: u64,
    /// Scale the rate by a day's curve (night low, day peak) compressed into `day_seconds`.
    #[serde(default)]
    pub daily_curve: bool,
    /// Length of the compressed day.
    #[serde(default = "day_seconds")]
    pub day_seconds: u64,
    /// A partner's file dump of this many events every `partner_every_seconds` (0: none).
    #[serde(default)]
    pub partner_dump_events: usize,
    /// Seconds between partner dumps.
    #[serde(default = "partner_every")]
    pub partner_every_seconds: u64,
}

fn step_factor() -> f64 {
    1.25
}
fn max_steps() -> u32 {
    8
}
fn day_seconds() -> u64 {
    60
}
fn partner_every() -> u64 {
    20
}

/// How events reach dmp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DriverKind {
    /// `POST /v1/events` (NDJSON batches).
    #[default]
    Http,
    /// Produced straight to `dmp.events` (needs a Kafka bus).
    Bus,
    /// NDJSON files handed to `dmp import`.
    Files,
}

/// `[driver]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Driver {
    /// `http`, `bus` or `files`.
    #[serde(default)]
    pub kind: DriverKind,
    /// Concurrent requests in flight (http).
    #[serde(default = "connections")]
    pub connections: usize,
    /// Events per request or produce, at most.
    #[serde(default = "batch_max")]
    pub batch_max: usize,
    /// How often due events are sent, ms.
    #[serde(default = "tick_ms")]
    pub tick_ms: u64,
    /// Make every batch of a drive (sessions, NDJSON bodies, partner dumps) before its clock
    /// starts, so that while the traffic runs the driver only sends them (moving their times to
    /// the clock) instead of taking its share of the cores dmp is measured on. Memory: about
    /// 400 bytes per event of the drive ([`PRERENDER_BYTES_PER_EVENT`]); a scenario whose largest
    /// drive would need over half the machine's memory is refused.
    #[serde(default)]
    pub prerender: bool,
}

fn connections() -> usize {
    8
}
fn batch_max() -> usize {
    2000
}
fn tick_ms() -> u64 {
    10
}

impl Default for Driver {
    fn default() -> Self {
        Driver {
            kind: DriverKind::Http,
            connections: connections(),
            batch_max: batch_max(),
            tick_ms: tick_ms(),
            prerender: false,
        }
    }
}

/// `[dmp]`: the process under test.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Dmp {
    /// `embedded` or `kafka://host:port`.
    #[serde(default = "embedded")]
    pub bus: String,
    /// `embedded` or `redis://host:port`.
    #[serde(default = "embedded")]
    pub stats: String,
    /// Configuration keys for dmp (`segmenter.workers = "2"`), as `DMP__…` variables.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

fn embedded() -> String {
    "embedded".into()
}

impl Default for Dmp {
    fn default() -> Self {
        Dmp {
            bus: embedded(),
            stats: embedded(),
            config: BTreeMap::new(),
        }
    }
}

/// `[checks]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Checks {
    /// After the traffic, wait for every user's newest event to be evaluated and compare every
    /// user's segments with the ground truth.
    #[serde(default = "yes")]
    pub correctness: bool,
    /// Compare audience estimates with the true segment sizes.
    #[serde(default = "yes")]
    pub audience: bool,
    /// Run the same traffic again with the segmenter's dedupe and bot blacklist off, and compare
    /// CPU per event.
    #[serde(default)]
    pub compare_dedupe: bool,
    /// Then look users up at this rate (requests/s; 0: no lookup phase).
    #[serde(default)]
    pub lookup_rate: f64,
    /// Seconds of the lookup phase.
    #[serde(default = "lookup_seconds")]
    pub lookup_seconds: u64,
    /// Concurrent lookups in flight at most.
    #[serde(default = "lookup_connections")]
    pub lookup_connections: usize,
}

fn yes() -> bool {
    true
}
fn lookup_seconds() -> u64 {
    10
}
fn lookup_connections() -> usize {
    64
}

impl Default for Checks {
    fn default() -> Self {
        Checks {
            correctness: true,
            audience: true,
            compare_dedupe: false,
            lookup_rate: 0.0,
            lookup_seconds: lookup_seconds(),
            lookup_connections: lookup_connections(),
        }
    }
}

/// Replaces `${VAR}` with the variable's value; a variable that is not set is an error.
fn expand(key: &str, s: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let Some(j) = rest[i..].find('}') else {
            bail!("{key}: unclosed ${{ in {s:?}");
        };
        let var = &rest[i + 2..i + j];
        let val = std::env::var(var)
            .with_context(|| format!("{key}: environment variable {var} is not set"))?;
        out.push_str(&val);
        rest = &rest[i + j + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

impl Scenario {
    /// Reads and checks a scenario file.
    pub fn load(path: &Path) -> anyhow::Result<Scenario> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read scenario {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("scenario {}", path.display()))
    }

    /// Parses and checks a scenario.
    pub fn parse(text: &str) -> anyhow::Result<Scenario> {
        let de = toml::Deserializer::new(text);
        let mut s: Scenario = serde_path_to_error::deserialize(de)
            .map_err(|e| anyhow::anyhow!("{}: {}", e.path(), e.inner().message()))?;
        s.dmp.bus = expand("dmp.bus", &s.dmp.bus)?;
        s.dmp.stats = expand("dmp.stats", &s.dmp.stats)?;
        for (k, v) in s.dmp.config.iter_mut() {
            *v = expand(&format!("dmp.config.{k}"), v)?;
        }
        s.check()?;
        Ok(s)
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.users == 0 || self.users > 100_000_000 {
            bail!("users: 1 to 100000000, not {}", self.users);
        }
        if !(0.0..=0.5).contains(&self.bot_share) {
            bail!("bot_share: 0 to 0.5, not {}", self.bot_share);
        }
        if !(self.traffic.rate > 0.0 && self.traffic.rate <= 10_000_000.0) {
            bail!("traffic.rate: above 0 and at most 10000000 events/s");
        }
        if self.traffic.seconds == 0 || self.traffic.warmup_seconds >= self.traffic.seconds {
            bail!("traffic.seconds: above 0 and above traffic.warmup_seconds");
        }
        if self.traffic.mode == Mode::FindMax && self.traffic.step_factor <= 1.0 {
            bail!("traffic.step_factor: above 1");
        }
        if self.traffic.prefill_seconds > 0 && self.traffic.mode != Mode::FindMax {
            bail!("traffic.prefill_seconds: only for mode = \"find_max\" (open runs leave their start out with warmup_seconds)");
        }
        if self.driver.kind == DriverKind::Bus && !self.dmp.bus.starts_with("kafka://") {
            bail!("driver.kind = \"bus\" needs dmp.bus = \"kafka://…\" (the embedded bus belongs to the dmp process)");
        }
        if self.driver.connections == 0 || self.driver.batch_max == 0 || self.driver.tick_ms == 0 {
            bail!("driver.connections, driver.batch_max and driver.tick_ms are at least 1");
        }
        if self.driver.prerender {
            let bytes = self.prerender_bytes();
            if let Some(total) = dmp_core::machine::memory_mb().map(|mb| mb << 20) {
                if bytes > total / 2 {
                    bail!(
                        "driver.prerender: the largest drive would hold about {:.1} GiB of events made \
                         ahead, over half of the {:.1} GiB this process may use; shorten traffic.seconds or \
                         leave prerender off",
                        bytes as f64 / GIB,
                        total as f64 / GIB
                    );
                }
            }
        }
        for k in self.dmp.config.keys() {
            if k.is_empty()
                || !k
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_' || c == '.')
            {
                bail!("dmp.config: {k:?} is not a configuration key like segmenter.workers");
            }
        }
        Ok(())
    }
}

const GIB: f64 = (1u64 << 30) as f64;

/// Memory a batch made ahead holds per event: the event, its NDJSON line and where its time is.
pub const PRERENDER_BYTES_PER_EVENT: u64 = 400;

impl Scenario {
    /// About the memory the largest drive holds with `driver.prerender`: its events at the
    /// highest rate it runs at (the last step of `find_max`), with the partner dumps.
    pub fn prerender_bytes(&self) -> u64 {
        let t = &self.traffic;
        let (rate, seconds) = match t.mode {
            Mode::Open => (t.rate, t.seconds),
            Mode::FindMax => (
                t.rate * t.step_factor.powi(t.max_steps.saturating_sub(1) as i32),
                t.seconds.max(t.prefill_seconds),
            ),
        };
        let dumps = match t.partner_every_seconds {
            0 => 0,
            every => seconds / every * t.partner_dump_events as u64,
        };
        ((rate * seconds as f64) as u64 + dumps).saturating_mul(PRERENDER_BYTES_PER_EVENT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_prerender_when_the_drive_would_not_fit_then_the_key_is_named() {
        let sc = |rate: &str, seconds: u64| {
            format!(
                "name = \"t\"\nusers = 1000\n[traffic]\nmode = \"open\"\nrate = {rate}\nseconds = {seconds}\n\
                 warmup_seconds = 0\n[driver]\nprerender = true\n"
            )
        };
        let peak = Scenario::parse(&sc("100000.0", 60)).unwrap();
        assert!(peak.prerender_bytes() >= 6_000_000 * PRERENDER_BYTES_PER_EVENT);
        if let Some(total) = dmp_core::machine::memory_mb().map(|mb| mb << 20) {
            // Ten times the machine's memory in events at 10M events/s.
            let seconds = total * 10 / PRERENDER_BYTES_PER_EVENT / 10_000_000 + 1;
            let e = Scenario::parse(&sc("10000000.0", seconds)).unwrap_err();
            assert!(format!("{e:#}").contains("driver.prerender"), "{e:#}");
            let off = sc("10000000.0", seconds).replace("prerender = true", "prerender = false");
            Scenario::parse(&off).unwrap();
        }
    }

    #[test]
    fn every_shipped_scenario_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if name.ends_with(".toml") && name != "demo-rules.toml" {
                // Kafka scenarios name the broker by variable.
                std::env::set_var("DMP_TEST_KAFKA", "127.0.0.1:9092");
                std::env::set_var("DMP_TEST_REDIS", "redis://127.0.0.1:6379");
                Scenario::load(&path).unwrap_or_else(|e| panic!("{name}: {e:#}"));
                n += 1;
            }
        }
        assert!(n >= 4, "{n} scenarios");
    }

    #[test]
    fn bad_scenarios_name_the_key() {
        let base =
            "name = \"x\"\nusers = 10\n[traffic]\nmode = \"open\"\nrate = 10.0\nseconds = 5\n";
        assert!(Scenario::parse(base).is_ok());
        let e = Scenario::parse(&format!("{base}typo = 1\n")).unwrap_err();
        assert!(format!("{e:#}").contains("typo"), "{e:#}");
        let e = Scenario::parse(&base.replace("rate = 10.0", "rate = -1.0")).unwrap_err();
        assert!(format!("{e:#}").contains("traffic.rate"), "{e:#}");
        let e = Scenario::parse(&format!("{base}[driver]\nkind = \"bus\"\n")).unwrap_err();
        assert!(format!("{e:#}").contains("kafka"), "{e:#}");
        let e =
            Scenario::parse(&format!("{base}[dmp]\nbus = \"${{NO_SUCH_VAR_X}}\"\n")).unwrap_err();
        assert!(format!("{e:#}").contains("NO_SUCH_VAR_X"), "{e:#}");
        let e = Scenario::parse(&base.replace("seconds = 5", "seconds = 5\nprefill_seconds = 30"))
            .unwrap_err();
        assert!(
            format!("{e:#}").contains("traffic.prefill_seconds"),
            "{e:#}"
        );
        let ramp = base.replace("\"open\"", "\"find_max\"");
        let s = Scenario::parse(&ramp.replace("seconds = 5", "seconds = 5\nprefill_seconds = 30"))
            .unwrap();
        assert_eq!(s.traffic.prefill_seconds, 30);
    }
}
