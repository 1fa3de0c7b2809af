//! JWT verification of Webio's `x-webio-token` header.
//!
//! - Several secrets are tried in order (rotation window); which one verified is counted.
//! - The header's `alg` must be one of the configured HMAC algorithms (`none` never is).
//! - `exp` and `nbf` are checked only when present (Webio's tokens may carry no `exp`).
//! - When `organisation_id` is set, the organisation claim must equal it.
//!
//! Webio sends the same token for long stretches, so successful verifications are cached,
//! keyed on the whole token, and the cache still honours `exp`.

use crate::config::{Algorithm, Loaded};
use base64::engine::{general_purpose::URL_SAFE_NO_PAD, Engine};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value};
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

/// Why a token was refused. `reason()` is the bounded metric label; `Display` the client text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing token")]
    Missing,
    #[error("malformed token")]
    Malformed,
    #[error("invalid token signature")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("token algorithm not allowed")]
    Algorithm,
    #[error("wrong organisation")]
    Organisation,
}

/// Every [`AuthError::reason`], for metrics initialisation.
pub const REASONS: &[&str] =
    &["missing", "malformed", "bad_signature", "expired", "not_yet_valid", "algorithm", "organisation"];

impl AuthError {
    pub fn reason(self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed => "malformed",
            AuthError::BadSignature => "bad_signature",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::Algorithm => "algorithm",
            AuthError::Organisation => "organisation",
        }
    }
}

/// What a verified token tells us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub organisation_id: Option<String>,
    pub secret_index: usize,
}

#[derive(Clone)]
struct Cached {
    verified: Verified,
    exp: Option<u64>,
    nbf: Option<u64>,
}

const CACHE_CAPACITY: usize = 1024;

pub struct Verifier {
    disabled: bool,
    keys: Vec<DecodingKey>,
    algorithms: Vec<Algorithm>,
    validation: Validation,
    leeway: u64,
    organisation_id: Option<String>,
    organisation_claim: String,
    cache: Mutex<HashMap<String, Cached>>,
    /// The last token header's value as sent (bytes, before the UTF-8 check, the trims and the
    /// `Bearer ` prefix) and its result: Webio sends one token for long stretches, and comparing
    /// the bytes costs less than reading the value again and hashing it for the map.
    last: Mutex<Option<(Box<[u8]>, Cached)>>,
}

fn jwt_alg(a: Algorithm) -> jsonwebtoken::Algorithm {
    match a {
        Algorithm::HS256 => jsonwebtoken::Algorithm::HS256,
        Algorithm::HS384 => jsonwebtoken::Algorithm::HS384,
        Algorithm::HS512 => jsonwebtoken::Algorithm::HS512,
    }
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// A claim as text: organisation ids may be sent as strings or numbers.
fn claim_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// `exp` / `nbf` as jsonwebtoken reads them: an integer, or a float rounded (RFC 7519 allows
/// fractional NumericDates, and the cache must honour them as the first check did).
fn numeric_date(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| v.as_f64().filter(|f| f.is_finite() && *f >= 0.0).map(|f| f.round() as u64))
}

impl Verifier {
    pub fn new(loaded: &Loaded) -> Self {
        let auth = &loaded.config.auth;
        let mut validation = Validation::new(jwt_alg(auth.algorithms.first().copied().unwrap_or(Algorithm::HS256)));
        validation.algorithms = auth.algorithms.iter().copied().map(jwt_alg).collect();
        validation.required_spec_claims = HashSet::new();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.leeway = auth.leeway.as_secs();
        Verifier {
            disabled: auth.disabled,
            keys: loaded.secrets.iter().map(|s| DecodingKey::from_secret(s.expose())).collect(),
            algorithms: auth.algorithms.clone(),
            validation,
            leeway: auth.leeway.as_secs(),
            organisation_id: Some(auth.organisation_id.clone()).filter(|s| !s.is_empty()),
            organisation_claim: auth.organisation_claim.clone(),
            cache: Mutex::new(HashMap::new()),
            last: Mutex::new(None),
        }
    }

    pub fn is_disabled(&self) -> bool {
        self.disabled
    }

    /// Verifies the header value (`None` = header absent).
    pub fn verify(&self, header: Option<&[u8]>) -> Result<Verified, AuthError> {
        if self.disabled {
            return Ok(Verified { organisation_id: self.organisation_id.clone(), secret_index: 0 });
        }
        let raw = header.ok_or(AuthError::Missing)?;
        let last = {
            let last = self.last.lock().expect("auth cache lock");
            last.as_ref().filter(|(r, _)| **r == *raw).map(|(_, hit)| hit.clone())
        };
        if let Some(hit) = last {
            return self.still_valid(hit);
        }
        let token = std::str::from_utf8(raw).map_err(|_| AuthError::Malformed)?.trim();
        // Tolerate a `Bearer ` prefix: some proxies add one.
        let token = token.strip_prefix("Bearer ").unwrap_or(token).trim();
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let known = self.cache.lock().expect("auth cache lock").get(token).cloned();
        let hit = match known {
            Some(hit) => hit,
            None => {
                let fresh = self.verify_uncached(token)?;
                let mut cache = self.cache.lock().expect("auth cache lock");
                if cache.len() >= CACHE_CAPACITY {
                    cache.clear();
                }
                cache.insert(token.to_owned(), fresh.clone());
                drop(cache);
                *self.last.lock().expect("auth cache lock") = Some((raw.into(), fresh.clone()));
                return Ok(fresh.verified);
            }
        };
        *self.last.lock().expect("auth cache lock") = Some((raw.into(), hit.clone()));
        self.still_valid(hit)
    }

    /// A cached result, checked against the clock: `exp` and `nbf` still apply to it.
    fn still_valid(&self, hit: Cached) -> Result<Verified, AuthError> {
        if hit.exp.is_none() && hit.nbf.is_none() {
            return Ok(hit.verified);
        }
        let now = now();
        if hit.exp.is_some_and(|exp| exp.saturating_add(self.leeway) < now) {
            return Err(AuthError::Expired);
        }
        if hit.nbf.is_some_and(|nbf| nbf > now + self.leeway) {
            return Err(AuthError::NotYetValid);
        }
        Ok(hit.verified)
    }

    fn verify_uncached(&self, token: &str) -> Result<Cached, AuthError> {
        // Read the header ourselves first: an `alg` we don't allow (`none` included) is its
        // own refusal class, not a parse error.
        let header_b64 = token.split('.').next().ok_or(AuthError::Malformed)?;
        if token.split('.').count() != 3 {
            return Err(AuthError::Malformed);
        }
        let header: Map<String, Value> = URL_SAFE_NO_PAD
            .decode(header_b64.trim_end_matches('='))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(AuthError::Malformed)?;
        let alg = header.get("alg").and_then(Value::as_str).ok_or(AuthError::Malformed)?;
        if !self.algorithms.iter().any(|a| a.as_str() == alg) {
            return Err(AuthError::Algorithm);
        }
        let mut last = AuthError::BadSignature;
        for (index, key) in self.keys.iter().enumerate() {
            match jsonwebtoken::decode::<Map<String, Value>>(token, key, &self.validation) {
                Ok(data) => {
                    let claims = data.claims;
                    let organisation_id = claims.get(&self.organisation_claim).and_then(claim_text);
                    if let Some(want) = &self.organisation_id {
                        if organisation_id.as_deref() != Some(want.as_str()) {
                            return Err(AuthError::Organisation);
                        }
                    }
                    return Ok(Cached {
                        verified: Verified { organisation_id, secret_index: index },
                        exp: claims.get("exp").and_then(numeric_date),
                        nbf: claims.get("nbf").and_then(numeric_date),
                    });
                }
                Err(e) => match e.kind() {
                    ErrorKind::InvalidSignature => last = AuthError::BadSignature,
                    ErrorKind::ExpiredSignature => return Err(AuthError::Expired),
                    ErrorKind::ImmatureSignature => return Err(AuthError::NotYetValid),
                    ErrorKind::InvalidAlgorithm => return Err(AuthError::Algorithm),
                    _ => return Err(AuthError::Malformed),
                },
            }
        }
        Err(last)
    }
}

/// Signs a token the way Webio would (for `webio-router token` and tests).
pub fn sign(
    secret: &[u8],
    alg: Algorithm,
    organisation_id: Option<&str>,
    org_claim: &str,
    ttl: Option<Duration>,
) -> String {
    let mut claims = Map::new();
    let now = now();
    claims.insert("iat".into(), now.into());
    if let Some(ttl) = ttl {
        claims.insert("exp".into(), (now + ttl.as_secs()).into());
    }
    if let Some(org) = organisation_id {
        claims.insert(org_claim.into(), org.into());
    }
    jsonwebtoken::encode(&Header::new(jwt_alg(alg)), &claims, &EncodingKey::from_secret(secret))
        .expect("HMAC signing of a JSON map cannot fail")
}

#[cfg(test)]
mod tests;
