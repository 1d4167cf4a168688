//! API keys per caller role (`[api.keys]`): ingest, lookup, planner, admin.
//!
//! A key comes as `Authorization: Bearer <key>` or `x-api-key: <key>`. Keys are kept as BLAKE3
//! digests and a presented key is compared with every configured one in constant time (digests
//! of equal length, compared without early exit), so neither timing nor length tells a caller
//! how close a guess was. Keys are never logged. A role with no configured keys is open; admin
//! keys open every role. No key: 401; a key nobody configured: 401; a key of another role: 403.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;

/// Caller roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Event ingest.
    Ingest,
    /// User lookups.
    Lookup,
    /// Audience estimates.
    Planner,
    /// Everything.
    Admin,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Ingest => "ingest",
            Role::Lookup => "lookup",
            Role::Planner => "planner",
            Role::Admin => "admin",
        }
    }
}

/// The configured keys, as digests with their role.
#[derive(Debug, Default)]
pub struct Auth {
    keys: Vec<([u8; 32], Role)>,
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

    /// From `[api.keys]`.
    pub fn from_config(k: &dmp_core::config::ApiKeys) -> Auth {
        let mut keys = Vec::new();
        for (role, list) in [
            (Role::Ingest, &k.ingest),
            (Role::Lookup, &k.lookup),
            (Role::Planner, &k.planner),
            (Role::Admin, &k.admin),
        ] {
            keys.extend(list.iter().map(|s| (digest(s), role)));
        }
        Auth { keys }
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
        let presented = headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .or_else(|| {
                headers
                    .get(axum::http::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
            });
        let Some(key) = presented else {
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
        Ok(()) => next.run(req).await,
        Err((status, reason)) => {
            metrics::counter!("dmp_api_requests_refused_total", "endpoint" => role.name(), "status" => status.as_u16().to_string())
                .increment(1);
            (status, Json(serde_json::json!({ "error": reason }))).into_response()
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
    fn given_no_keys_when_checked_then_every_role_is_open() {
        let auth = Auth::open();
        for role in [Role::Ingest, Role::Lookup, Role::Planner, Role::Admin] {
            assert!(auth.check(role, &HeaderMap::new()).is_ok());
        }
    }
}
