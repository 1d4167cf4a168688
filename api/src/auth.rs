//! API keys per caller role (`[api.keys]`): ingest, lookup, planner, admin.
//!
//! A key comes as `Authorization: Bearer <key>` or `x-api-key: <key>`. Keys are kept as BLAKE3
//! digests and a presented key is compared with every configured one in constant time (digests
//! of equal length, compared without early exit), so neither timing nor length tells a caller
//! how close a guess was. Keys are never logged. A role with no configured keys is open; admin
//! keys open every role. No key: 401; a key nobody configured: 401; a key of another role: 403.
//!
//! Rate limits (`api.rate_limit_per_second`, `api.rate_limit_burst`): a token bucket per caller
//! (its key, or its address when the role needs no key), checked after the key; over the limit
//! answers 429 with `Retry-After`.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::Response;

/// Caller roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Event ingest.
    Ingest,
    /// User lookups.
    Lookup,
    /// Audience estimates.
    Planner,
    /// Partners reading segment records.
    Partner,
    /// Everything.
    Admin,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Ingest => "ingest",
            Role::Lookup => "lookup",
            Role::Planner => "planner",
            Role::Partner => "partner",
            Role::Admin => "admin",
        }
    }
}

/// The configured keys, as digests with their role, and the rate limiter.
#[derive(Debug, Default)]
pub struct Auth {
    keys: Vec<([u8; 32], Role)>,
    limiter: Option<Limiter>,
}

/// Token buckets per caller.
#[derive(Debug)]
struct Limiter {
    rate: f64,
    burst: f64,
    buckets: parking_lot::Mutex<std::collections::HashMap<[u8; 32], (f64, std::time::Instant)>>,
}

impl Limiter {
    /// Takes a token for `caller`; Err(seconds to wait) when none is left.
    fn take(&self, caller: [u8; 32]) -> Result<(), f64> {
        let now = std::time::Instant::now();
        let mut b = self.buckets.lock();
        if b.len() > 100_000 {
            // Bounded memory: forget callers that are full again.
            let (rate, burst) = (self.rate, self.burst);
            b.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < burst
            });
        }
        let (tokens, at) = b.entry(caller).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err((1.0 - *tokens) / self.rate)
        }
    }
}

fn digest(key: &str) -> [u8; 32] {
    *blake3::hash(key.as_bytes()).as_bytes()
}

fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Auth {
    /// No keys: every role open.
    pub fn open() -> Auth {
        Auth::default()
    }

    /// From `[api]`: the keys and the rate limit.
    pub fn from_api_config(api: &dmp_core::config::ApiConfig) -> Auth {
        let mut a = Auth::from_config(&api.keys);
        if api.rate_limit_per_second > 0 {
            a.limiter = Some(Limiter {
                rate: api.rate_limit_per_second as f64,
                burst: api.rate_limit_burst.max(1) as f64,
                buckets: Default::default(),
            });
        }
        a
    }

    /// From `[api.keys]`.
    pub fn from_config(k: &dmp_core::config::ApiKeys) -> Auth {
        let mut keys = Vec::new();
        for (role, list) in [
            (Role::Ingest, &k.ingest),
            (Role::Lookup, &k.lookup),
            (Role::Planner, &k.planner),
            (Role::Partner, &k.partner),
            (Role::Admin, &k.admin),
        ] {
            keys.extend(list.iter().map(|s| (digest(s), role)));
        }
        Auth {
            keys,
            limiter: None,
        }
    }

    fn role_is_open(&self, role: Role) -> bool {
        !self
            .keys
            .iter()
            .any(|(_, r)| *r == role || *r == Role::Admin)
    }

    /// Whether `headers` may call an endpoint of `role`: Ok, or the refusal.
    pub fn check(&self, role: Role, headers: &HeaderMap) -> Result<(), (StatusCode, String)> {
        if self.role_is_open(role) {
            return Ok(());
        }
        let Some(key) = presented_key(headers) else {
            return Err((
                StatusCode::UNAUTHORIZED,
                format!(
                    "an API key of role {} is needed (Authorization: Bearer <key> or x-api-key)",
                    role.name()
                ),
            ));
        };
        let d = digest(key.trim());
        // Every configured key is compared, whatever matched first.
        let mut found: Option<Role> = None;
        for (k, r) in &self.keys {
            if same(k, &d) {
                found = Some(*r);
            }
        }
        match found {
            None => Err((StatusCode::UNAUTHORIZED, "unknown API key".into())),
            Some(r) if r == role || r == Role::Admin => Ok(()),
            Some(r) => Err((
                StatusCode::FORBIDDEN,
                format!("a {} key cannot call a {} endpoint", r.name(), role.name()),
            )),
        }
    }
}

/// Middleware: refuses requests without a key of `role` (see [`Auth::check`]).
pub async fn require(
    State((auth, role)): State<(std::sync::Arc<Auth>, Role)>,
    req: Request,
    next: Next,
) -> Response {
    match auth.check(role, req.headers()) {
        Ok(()) => {
            if let Some(l) = &auth.limiter {
                let caller = caller_of(&req);
                if let Err(wait) = l.take(caller) {
                    let mut r = crate::refuse(
                        role.name(),
                        StatusCode::TOO_MANY_REQUESTS,
                        "rate limit exceeded (api.rate_limit_per_second)",
                    );
                    r.headers_mut().insert(
                        axum::http::header::RETRY_AFTER,
                        axum::http::HeaderValue::from((wait.ceil() as u64).max(1)),
                    );
                    return r;
                }
            }
            next.run(req).await
        }
        Err((status, reason)) => crate::refuse(role.name(), status, reason),
    }
}

/// The key a request presents: `x-api-key`, else `Authorization: Bearer`.
fn presented_key(h: &HeaderMap) -> Option<&str> {
    h.get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .or_else(|| {
            h.get(axum::http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
        })
}

/// Who is calling: the key's digest, else the client address.
fn caller_of(req: &Request) -> [u8; 32] {
    match presented_key(req.headers()) {
        Some(k) => digest(k.trim()),
        None => {
            let ip = req
                .extensions()
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|c| c.0.ip().to_string())
                .unwrap_or_default();
            digest(&format!("ip:{ip}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(key: Option<&str>, bearer: bool) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(k) = key {
            if bearer {
                h.insert("authorization", format!("Bearer {k}").parse().unwrap());
            } else {
                h.insert("x-api-key", k.parse().unwrap());
            }
        }
        h
    }

    #[test]
    fn given_keys_when_checked_then_roles_are_enforced() {
        let auth = Auth::from_config(&dmp_core::config::ApiKeys {
            ingest: vec![],
            lookup: vec!["lookup-key-0123456789".into()],
            partner: vec![],
            planner: vec!["planner-key-0123456789".into()],
            admin: vec!["admin-key-0123456789ab".into()],
        });
        let code = |role, key, bearer| {
            auth.check(role, &headers(key, bearer))
                .map_err(|e| e.0.as_u16())
        };
        // Ingest has no keys of its own, but admin keys exist: it is not open.
        assert_eq!(code(Role::Ingest, None, true), Err(401));
        assert_eq!(
            code(Role::Ingest, Some("admin-key-0123456789ab"), true),
            Ok(())
        );
        assert_eq!(
            code(Role::Lookup, Some("lookup-key-0123456789"), true),
            Ok(())
        );
        assert_eq!(
            code(Role::Lookup, Some("lookup-key-0123456789"), false),
            Ok(())
        );
        assert_eq!(
            code(Role::Lookup, Some("planner-key-0123456789"), true),
            Err(403)
        );
        assert_eq!(
            code(Role::Lookup, Some("lookup-key-012345678"), true),
            Err(401)
        );
        assert_eq!(code(Role::Lookup, None, false), Err(401));
        assert_eq!(
            code(Role::Admin, Some("lookup-key-0123456789"), true),
            Err(403)
        );
        assert_eq!(
            code(Role::Planner, Some("admin-key-0123456789ab"), false),
            Ok(())
        );
    }

    #[test]
    fn given_rate_limit_when_a_caller_bursts_then_refused_until_tokens_refill() {
        let l = Limiter {
            rate: 10.0,
            burst: 5.0,
            buckets: Default::default(),
        };
        let (a, b) = (digest("a"), digest("b"));
        for _ in 0..5 {
            assert!(l.take(a).is_ok());
        }
        let wait = l.take(a).unwrap_err();
        assert!(wait > 0.0 && wait <= 0.1, "{wait}");
        assert!(l.take(b).is_ok(), "another caller has its own bucket");
        std::thread::sleep(std::time::Duration::from_millis(120));
        assert!(l.take(a).is_ok(), "refilled at 10/s");
    }

    #[test]
    fn given_no_keys_when_checked_then_every_role_is_open() {
        let auth = Auth::open();
        for role in [
            Role::Ingest,
            Role::Lookup,
            Role::Planner,
            Role::Partner,
            Role::Admin,
        ] {
            assert!(auth.check(role, &HeaderMap::new()).is_ok());
        }
    }
}
