//! Enrichment of an event before it is stored: the client IP as an integer (after the privacy
//! setting), its country / region / city from a GeoLite2-City database, and the user agent as a
//! dictionary id with its browser, OS and device class and a known-crawler flag.
//!
//! Geo lookup happens on the address as received, in memory; only the privacy-transformed address
//! is stored. User-agent results are cached per distinct user agent (an LRU), since few distinct
//! strings make up most traffic.

use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::path::Path;

use serde::Deserialize;

use dmp_core::config::StorageWriterConfig;

/// The crawler list shipped inside dmp (npm `crawler-user-agents` 1.60.0, MIT).
pub const SHIPPED_CRAWLER_LIST: &str = include_str!("../data/crawler-user-agents.json");

/// Why the enricher could not be built.
#[derive(Debug, thiserror::Error)]
pub enum EnrichError {
    /// A GeoIP database could not be opened.
    #[error("cannot open GeoIP database {path}: {reason}")]
    Geo {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The crawler list could not be read or parsed.
    #[error("cannot load crawler list {path}: {reason}")]
    Crawlers {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

/// How IP addresses are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpMode {
    /// As received.
    Full,
    /// IPv4 /24, IPv6 /48.
    Truncate,
    /// Keyed hash; 8 bytes stored.
    Hash([u8; 32]),
}

/// What enrichment adds to an event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Enrichment {
    /// The IP to store: 4 bytes (IPv4), 16 bytes (IPv6) or 8 bytes (hashed), big-endian.
    pub ip: Option<Vec<u8>>,
    /// `country/region/city` when a GeoIP database knows the address.
    pub geo: Option<String>,
    /// The user agent's dictionary id and what it says.
    pub ua: Option<UserAgent>,
    /// The `ip` field was present but not an IP address.
    pub bad_ip: bool,
}

/// A parsed user agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserAgent {
    /// Dictionary id: the first 8 bytes of the BLAKE3 hash of the string.
    pub id: u64,
    /// Browser name and version, for example `Chrome 120.0.0.0` (shared, not copied per event).
    pub browser: bytes::Bytes,
    /// Operating system and version.
    pub os: bytes::Bytes,
    /// Device class: `pc`, `smartphone`, `mobilephone`, `appliance`, `crawler`, `misc` or `UNKNOWN`.
    pub device: bytes::Bytes,
    /// The string matches a known crawler pattern.
    pub crawler: bool,
    /// The value of the event's `e:ua` cell: [`ua_cell`] of the above (shared, not copied per
    /// event).
    pub cell: bytes::Bytes,
}

/// The value of an event's `e:ua` cell: the agent's dictionary id (8 bytes, big-endian), then
/// its browser, OS and device class, each ended by a 0 byte. A part's own 0 bytes (an agent
/// string may carry `\u0000`, which the parser can copy into a version) are left out, so the
/// parts always split where they were joined; UTF-8 stays UTF-8, since no other character's
/// encoding holds a 0 byte. One cell instead of four: a user's row has about a quarter fewer
/// cells to store, merge and walk at every read. Rules read the parts as `ua.browser`, `ua.os`
/// and `ua.device`.
pub fn ua_cell(id: u64, browser: &[u8], os: &[u8], device: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + browser.len() + os.len() + device.len() + 3);
    v.extend_from_slice(&id.to_be_bytes());
    for part in [browser, os, device] {
        v.extend(part.iter().copied().filter(|b| *b != 0));
        v.push(0);
    }
    v
}

#[derive(Deserialize)]
struct CrawlerEntry {
    pattern: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Named {
    Plain(String),
    Names {
        names: std::collections::BTreeMap<String, String>,
    },
}

impl Named {
    fn english(self) -> Option<String> {
        match self {
            Named::Plain(s) => Some(s),
            Named::Names { mut names } => names.remove("en"),
        }
    }
}

/// Both layouts: ip-location-db (`country_code`, `state1`, `city` as strings) and MaxMind's
/// (`country.iso_code`, `subdivisions[0].names.en`, `city.names.en`).
#[derive(Deserialize)]
struct GeoRecord {
    country_code: Option<String>,
    state1: Option<String>,
    country: Option<MmCountry>,
    subdivisions: Option<Vec<Named>>,
    city: Option<Named>,
}

#[derive(Deserialize)]
struct MmCountry {
    iso_code: Option<String>,
}

/// The enricher. Not shared between threads: each writer owns one (its caches are its own).
pub struct Enricher {
    ip_mode: IpMode,
    geo: Vec<maxminddb::Reader<Vec<u8>>>,
    crawlers: regex::RegexSet,
    parser: woothee::parser::Parser,
    /// Parsed user agents by their text, hashed with a fast non-cryptographic hash (the
    /// dictionary id, a cryptographic hash, is only computed on a miss).
    ua_cache: lru::LruCache<Box<str>, UserAgent, foldhash::fast::RandomState>,
}

impl Enricher {
    /// Builds the enricher from the storage writer's config.
    pub fn from_config(cfg: &StorageWriterConfig) -> Result<Enricher, EnrichError> {
        let ip_mode = match cfg.ip_mode.as_str() {
            "truncate" => IpMode::Truncate,
            "hash" => IpMode::Hash(blake3::derive_key(
                "dmp ip hash v1",
                cfg.ip_hash_key.as_bytes(),
            )),
            _ => IpMode::Full,
        };
        let list = if cfg.crawler_list.is_empty() {
            SHIPPED_CRAWLER_LIST.to_string()
        } else {
            std::fs::read_to_string(&cfg.crawler_list).map_err(|e| EnrichError::Crawlers {
                path: cfg.crawler_list.clone(),
                reason: e.to_string(),
            })?
        };
        let geo = cfg
            .geoip
            .iter()
            .map(|p| open_geo(p))
            .collect::<Result<Vec<_>, _>>()?;
        Enricher::new(ip_mode, geo, &list)
    }

    /// Builds an enricher from its parts; `crawler_json` is a crawler-user-agents.json document.
    pub fn new(
        ip_mode: IpMode,
        geo: Vec<maxminddb::Reader<Vec<u8>>>,
        crawler_json: &str,
    ) -> Result<Enricher, EnrichError> {
        let entries: Vec<CrawlerEntry> =
            serde_json::from_str(crawler_json).map_err(|e| EnrichError::Crawlers {
                path: "crawler list".into(),
                reason: e.to_string(),
            })?;
        // Patterns are written for RE2/JS; keep the ones Rust's regex accepts (nearly all).
        let mut patterns = Vec::with_capacity(entries.len());
        for e in entries {
            if regex::Regex::new(&e.pattern).is_ok() {
                patterns.push(e.pattern);
            } else {
                tracing::warn!(pattern = %e.pattern, "crawler pattern not supported; skipped");
            }
        }
        let crawlers = regex::RegexSetBuilder::new(&patterns)
            .size_limit(64 << 20)
            .build()
            .map_err(|e| EnrichError::Crawlers {
                path: "crawler list".into(),
                reason: e.to_string(),
            })?;
        Ok(Enricher {
            ip_mode,
            geo,
            crawlers,
            parser: woothee::parser::Parser::new(),
            ua_cache: lru::LruCache::with_hasher(
                NonZeroUsize::new(50_000).expect("non-zero"),
                foldhash::fast::RandomState::default(),
            ),
        })
    }

    /// Number of crawler patterns in force.
    pub fn crawler_patterns(&self) -> usize {
        self.crawlers.len()
    }

    /// Enriches the `ip` and `ua` fields of an event.
    pub fn enrich(&mut self, ip: Option<&str>, ua: Option<&str>) -> Enrichment {
        let mut out = Enrichment::default();
        if let Some(ip) = ip.filter(|s| !s.is_empty()) {
            match ip.trim().parse::<IpAddr>() {
                Ok(addr) => {
                    out.geo = self.geo(addr);
                    out.ip = Some(self.store_ip(addr));
                }
                Err(_) => out.bad_ip = true,
            }
        }
        if let Some(ua) = ua.filter(|s| !s.is_empty()) {
            out.ua = Some(self.user_agent(ua));
        }
        out
    }

    fn store_ip(&self, addr: IpAddr) -> Vec<u8> {
        match (&self.ip_mode, addr) {
            (IpMode::Full, IpAddr::V4(v4)) => v4.octets().to_vec(),
            (IpMode::Full, IpAddr::V6(v6)) => v6.octets().to_vec(),
            (IpMode::Truncate, IpAddr::V4(v4)) => {
                (u32::from(v4) & 0xffff_ff00).to_be_bytes().to_vec()
            }
            (IpMode::Truncate, IpAddr::V6(v6)) => {
                let mask: u128 = !0u128 << 80;
                (u128::from(v6) & mask).to_be_bytes().to_vec()
            }
            (IpMode::Hash(key), addr) => {
                let bytes = match addr {
                    IpAddr::V4(v4) => v4.octets().to_vec(),
                    IpAddr::V6(v6) => v6.octets().to_vec(),
                };
                blake3::keyed_hash(key, &bytes).as_bytes()[..8].to_vec()
            }
        }
    }

    /// `country/region/city` for an address, from the first database that knows it.
    pub fn geo(&self, addr: IpAddr) -> Option<String> {
        for db in &self.geo {
            let Ok(result) = db.lookup(addr) else {
                continue;
            };
            let Ok(Some(rec)) = result.decode::<GeoRecord>() else {
                continue;
            };
            let country = rec
                .country_code
                .or_else(|| rec.country.and_then(|c| c.iso_code))
                .unwrap_or_default();
            let region = rec
                .state1
                .or_else(|| {
                    rec.subdivisions
                        .and_then(|s| s.into_iter().next())
                        .and_then(Named::english)
                })
                .unwrap_or_default();
            let city = rec.city.and_then(Named::english).unwrap_or_default();
            if !country.is_empty() {
                return Some(format!("{country}/{region}/{city}"));
            }
        }
        None
    }

    /// The dictionary id and parse of a user agent (cached).
    pub fn user_agent(&mut self, ua: &str) -> UserAgent {
        if let Some(hit) = self.ua_cache.get(ua) {
            return hit.clone();
        }
        let id = ua_id(ua);
        let parsed = self.parser.parse(ua);
        let crawler = self.crawlers.is_match(ua);
        let (browser, os, device): (bytes::Bytes, bytes::Bytes, bytes::Bytes) = match &parsed {
            Some(r) => (
                format!("{} {}", r.name, r.version)
                    .trim()
                    .to_string()
                    .into(),
                format!("{} {}", r.os, r.os_version)
                    .trim()
                    .to_string()
                    .into(),
                if crawler {
                    "crawler".into()
                } else {
                    r.category.to_string().into()
                },
            ),
            None => (
                bytes::Bytes::new(),
                bytes::Bytes::new(),
                if crawler { "crawler" } else { "UNKNOWN" }.into(),
            ),
        };
        let info = UserAgent {
            id,
            cell: ua_cell(id, &browser, &os, &device).into(),
            browser,
            os,
            device,
            crawler: crawler || parsed.is_some_and(|r| r.category == "crawler"),
        };
        self.ua_cache.put(ua.into(), info.clone());
        info
    }
}

/// The dictionary id of a user agent string.
pub fn ua_id(ua: &str) -> u64 {
    let h = blake3::hash(ua.as_bytes());
    u64::from_be_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

fn open_geo(path: &Path) -> Result<maxminddb::Reader<Vec<u8>>, EnrichError> {
    maxminddb::Reader::open_readfile(path).map_err(|e| EnrichError::Geo {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enricher(mode: IpMode) -> Enricher {
        Enricher::new(mode, Vec::new(), SHIPPED_CRAWLER_LIST).unwrap()
    }

    #[test]
    fn given_ipv4_and_ipv6_when_enriched_then_stored_as_integers_per_privacy_mode() {
        let mut full = enricher(IpMode::Full);
        assert_eq!(
            full.enrich(Some("203.0.113.77"), None).ip,
            Some(vec![203, 0, 113, 77])
        );
        let v6 = full.enrich(Some("2001:db8:1:2::5"), None).ip.unwrap();
        assert_eq!(v6.len(), 16);
        let mut trunc = enricher(IpMode::Truncate);
        assert_eq!(
            trunc.enrich(Some("203.0.113.77"), None).ip,
            Some(vec![203, 0, 113, 0])
        );
        let t6 = trunc.enrich(Some("2001:db8:1:2::5"), None).ip.unwrap();
        assert_eq!(&t6[..6], &[0x20, 0x01, 0x0d, 0xb8, 0, 1]);
        assert!(t6[6..].iter().all(|b| *b == 0), "bits past /48 are cleared");
        let mut hashed = enricher(IpMode::Hash([7; 32]));
        let h = hashed.enrich(Some("203.0.113.77"), None).ip.unwrap();
        assert_eq!(h.len(), 8);
        assert_ne!(&h[..4], &[203, 0, 113, 77]);
        let mut other_key = enricher(IpMode::Hash([8; 32]));
        assert_ne!(other_key.enrich(Some("203.0.113.77"), None).ip.unwrap(), h);
        let bad = full.enrich(Some("not-an-ip"), None);
        assert!(bad.bad_ip && bad.ip.is_none());
    }

    #[test]
    fn given_real_crawler_list_when_matching_then_its_own_instances_are_crawlers_and_browsers_are_not(
    ) {
        let mut e = enricher(IpMode::Full);
        assert!(
            e.crawler_patterns() > 1000,
            "{} patterns",
            e.crawler_patterns()
        );
        #[derive(Deserialize)]
        struct Entry {
            instances: Vec<String>,
        }
        let entries: Vec<Entry> = serde_json::from_str(SHIPPED_CRAWLER_LIST).unwrap();
        let instances: Vec<String> = entries.into_iter().flat_map(|e| e.instances).collect();
        let missed: Vec<&String> = instances
            .iter()
            .filter(|ua| !e.user_agent(ua).crawler)
            .collect();
        // A handful of list instances rely on regex features Rust's engine lacks.
        assert!(
            missed.len() * 100 <= instances.len(),
            "{} of {} crawler instances not flagged, e.g. {:?}",
            missed.len(),
            instances.len(),
            &missed[..missed.len().min(3)]
        );
        let browsers = [
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
            "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1",
            "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0",
            "Mozilla/5.0 (Linux; Android 14; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.6099.144 Mobile Safari/537.36 YaBrowser/24.1.0.0",
        ];
        for ua in browsers {
            let info = e.user_agent(ua);
            assert!(!info.crawler, "{ua} flagged as crawler");
            assert_ne!(info.device, "UNKNOWN", "{ua}");
        }
        let chrome = e.user_agent(browsers[0]);
        assert!(
            chrome.browser.starts_with(b"Chrome"),
            "{:?}",
            chrome.browser
        );
        assert!(chrome.os.starts_with(b"Windows"), "{:?}", chrome.os);
        assert_eq!(chrome.device, "pc");
        // The `e:ua` cell: the id, then the parts, each ended by a 0 byte.
        let mut cell = chrome.id.to_be_bytes().to_vec();
        for part in [&chrome.browser, &chrome.os, &chrome.device] {
            cell.extend_from_slice(part);
            cell.push(0);
        }
        assert_eq!(chrome.cell, cell);
        // A part's own 0 bytes are left out: the parts split where they were joined.
        let mut odd = 7u64.to_be_bytes().to_vec();
        odd.extend_from_slice("Bröwser 1\0OS\0pc\0".as_bytes());
        assert_eq!(ua_cell(7, "Brö\0wser 1".as_bytes(), b"OS", b"\0pc"), odd);
        assert_eq!(e.user_agent(browsers[1]).device, "smartphone");
        let bot = e.user_agent("Mozilla/5.0 (compatible; YandexBot/3.0; +http://yandex.com/bots)");
        assert!(bot.crawler);
        assert_eq!(
            bot.id,
            ua_id("Mozilla/5.0 (compatible; YandexBot/3.0; +http://yandex.com/bots)")
        );
    }
}
