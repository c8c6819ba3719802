//! Access-token verification (Supabase-compatible JWTs) and credential extraction.
//!
//! Tokens arrive in the `Authorization: Bearer` header, a `bearer.<jwt>` WebSocket subprotocol
//! entry or the `access_token` query parameter. They are never logged: only the user id and
//! the failure kind are.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::http::HeaderMap;
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::config::{Config, DEV_JWT_SECRET};

/// Leeway for `exp` / `nbf`, in seconds.
pub const LEEWAY_S: u64 = 30;

/// Claims the server reads. Supabase tokens carry more; they are ignored.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Claims {
    /// User id.
    pub sub: String,
    /// Expiry (Unix seconds).
    pub exp: u64,
    /// Not before (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Issued at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Audience.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<serde_json::Value>,
    /// Issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Supabase role (`authenticated`, `anon`, `service_role`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

/// An authenticated user.
#[derive(Clone, Debug)]
pub struct Identity {
    /// User id (`sub`).
    pub user_id: String,
    /// Token expiry (Unix seconds).
    pub expires_at: u64,
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credentials were presented.
    #[error("missing access token")]
    Missing,
    /// Signature, format, audience, issuer or algorithm wrong.
    #[error("invalid access token")]
    Invalid,
    /// Past `exp`.
    #[error("access token expired")]
    Expired,
    /// Before `nbf`.
    #[error("access token not yet valid")]
    NotYetValid,
    /// Valid, but the role may not use the voice service.
    #[error("this token's role may not open voice sessions")]
    Forbidden,
}

impl AuthError {
    /// Bounded label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Invalid => "invalid",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::Forbidden => "forbidden",
        }
    }
}

/// Verifies access tokens: HS256 with the configured secret, and asymmetric tokens (RS256,
/// ES256 …) with keys from the JWKS endpoint.
pub struct Authenticator {
    /// HS256 key, when configured.
    hs256: Option<DecodingKey>,
    /// The development-only HS256 key, in dev mode only.
    dev_hs256: Option<DecodingKey>,
    /// Expected audience.
    audience: String,
    /// Expected issuer, when configured.
    issuer: Option<String>,
    /// Key set for asymmetric tokens, when configured.
    jwks: Option<Arc<Jwks>>,
}

/// How long fetched keys are trusted before a refetch.
pub const JWKS_TTL: Duration = Duration::from_secs(600);

/// A remote key set with caching and rate-limited refetches.
///
/// Tokens whose key is cached never wait: a stale set is refreshed in the background while
/// its keys keep serving. Only a token with an unknown `kid` waits, for the one fetch in
/// flight (single-flight, run as its own task so a caller that gives up does not cancel it);
/// no lock is held across the network call.
struct Jwks {
    url: String,
    client: reqwest::Client,
    /// Unknown `kid`s trigger a refetch at most this often.
    min_refetch: Duration,
    cache: RwLock<JwksCache>,
    /// The fetch in flight, which every caller that needs it awaits.
    inflight: Mutex<Option<Shared<BoxFuture<'static, ()>>>>,
}

#[derive(Default)]
struct JwksCache {
    keys: HashMap<String, (DecodingKey, Algorithm)>,
    fetched_at: Option<Instant>,
    /// When the last fetch started.
    last_attempt: Option<Instant>,
}

impl Jwks {
    fn lookup(&self, kid: &str) -> (Option<(DecodingKey, Algorithm)>, bool) {
        let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
        let fresh = cache.fetched_at.is_some_and(|t| t.elapsed() < JWKS_TTL);
        (cache.keys.get(kid).cloned(), fresh)
    }

    /// The key for `kid`: from the cache (refreshing a stale set in the background), else
    /// after the fetch in flight or a new one (rate-limited).
    async fn key(self: &Arc<Self>, kid: &str) -> Option<(DecodingKey, Algorithm)> {
        let (key, fresh) = self.lookup(kid);
        if let Some(key) = key {
            if !fresh {
                // Not awaited: the cached key serves while the set is refetched.
                drop(self.fetch_shared());
            }
            return Some(key);
        }
        let fetch = self.fetch_shared()?;
        fetch.await;
        self.lookup(kid).0
    }

    /// The fetch in flight, or a new one if the last began at least `min_refetch` ago.
    fn fetch_shared(self: &Arc<Self>) -> Option<Shared<BoxFuture<'static, ()>>> {
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(fetch) = inflight.as_ref() {
            return Some(fetch.clone());
        }
        {
            let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
            if cache
                .last_attempt
                .is_some_and(|t| t.elapsed() < self.min_refetch)
            {
                return None;
            }
            cache.last_attempt = Some(Instant::now());
        }
        let jwks = self.clone();
        let task = tokio::spawn(async move {
            jwks.fetch().await;
            jwks.inflight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
        });
        let fetch = task.map(|_| ()).boxed().shared();
        *inflight = Some(fetch.clone());
        Some(fetch)
    }

    async fn fetch(&self) {
        let started = Instant::now();
        let result = async {
            let response = self
                .client
                .get(&self.url)
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if !response.status().is_success() {
                return Err(format!("HTTP {}", response.status()));
            }
            let bytes = response.bytes().await.map_err(|e| e.to_string())?;
            if bytes.len() > 256 * 1024 {
                return Err("key set larger than 256 KiB".into());
            }
            serde_json::from_slice::<JwkSet>(&bytes).map_err(|e| e.to_string())
        }
        .await;
        match result {
            Ok(set) => {
                let keys: HashMap<_, _> = set
                    .keys
                    .iter()
                    .filter_map(|jwk| {
                        let kid = jwk.common.key_id.clone()?;
                        let alg = jwk_algorithm(jwk)?;
                        let key = DecodingKey::from_jwk(jwk).ok()?;
                        Some((kid, (key, alg)))
                    })
                    .collect();
                tracing::info!(keys = keys.len(), "fetched JWKS");
                let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
                cache.keys = keys;
                cache.fetched_at = Some(started);
            }
            // Keep serving the keys we have: an outage of the key server must not log
            // everybody out.
            Err(e) => tracing::warn!(error = %e, "JWKS fetch failed"),
        }
    }
}

/// The algorithm a JWK is for: its `alg`, or the default for its key type.
fn jwk_algorithm(jwk: &Jwk) -> Option<Algorithm> {
    use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, KeyAlgorithm};
    if let Some(alg) = jwk.common.key_algorithm {
        return match alg {
            KeyAlgorithm::RS256 => Some(Algorithm::RS256),
            KeyAlgorithm::RS384 => Some(Algorithm::RS384),
            KeyAlgorithm::RS512 => Some(Algorithm::RS512),
            KeyAlgorithm::PS256 => Some(Algorithm::PS256),
            KeyAlgorithm::ES256 => Some(Algorithm::ES256),
            KeyAlgorithm::ES384 => Some(Algorithm::ES384),
            KeyAlgorithm::EdDSA => Some(Algorithm::EdDSA),
            _ => None, // symmetric keys are never taken from a JWKS
        };
    }
    match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Some(Algorithm::RS256),
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => Some(Algorithm::ES256),
            EllipticCurve::P384 => Some(Algorithm::ES384),
            _ => None,
        },
        AlgorithmParameters::OctetKeyPair(_) => Some(Algorithm::EdDSA),
        _ => None,
    }
}

impl Authenticator {
    /// Builds the verifier from the configuration.
    pub fn new(config: &Config) -> Self {
        let hs256 = config
            .jwt_secret
            .as_ref()
            .filter(|s| s.expose_secret() != DEV_JWT_SECRET)
            .map(|s| DecodingKey::from_secret(s.expose_secret().as_bytes()));
        let dev_hs256 = config
            .dev
            .then(|| DecodingKey::from_secret(DEV_JWT_SECRET.as_bytes()));
        let jwks = config.jwks_url.as_ref().map(|url| {
            Arc::new(Jwks {
                url: url.clone(),
                client: reqwest::Client::new(),
                min_refetch: Duration::from_secs(config.jwks_min_refetch_s),
                cache: RwLock::new(JwksCache::default()),
                inflight: Mutex::new(None),
            })
        });
        Authenticator {
            hs256,
            dev_hs256,
            audience: config.jwt_audience.clone(),
            issuer: config.jwt_issuer.clone(),
            jwks,
        }
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut validation = Validation::new(alg);
        validation.leeway = LEEWAY_S;
        validation.validate_nbf = true;
        validation.set_audience(&[self.audience.as_str()]);
        validation.set_required_spec_claims(&["exp", "sub", "aud"]);
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss.as_str()]);
        }
        validation
    }

    /// Verifies `token` and returns who it belongs to. Holds no lock while it waits: only a
    /// token signed with a key not yet fetched waits, for the single fetch of the key set in
    /// flight (at most 5 s); every other token is decided at once. A caller that must not wait
    /// even then (a session loop refreshing its token) can run it as a task of its own:
    /// [`AppState`](crate::app::AppState) is `'static`.
    pub async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.len() > 16 * 1024 {
            return Err(AuthError::Invalid);
        }
        // `alg: none` and unknown algorithms fail here.
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Invalid)?;
        let validation = self.validation(header.alg);
        let decode = |key: &DecodingKey| {
            jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|e| {
                use jsonwebtoken::errors::ErrorKind;
                match e.kind() {
                    ErrorKind::ExpiredSignature => AuthError::Expired,
                    ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                    _ => AuthError::Invalid,
                }
            })
        };
        let data = match header.alg {
            // The HS256 secrets are the only keys for HS256: a public key from the JWKS can never
            // be used as an HMAC secret (algorithm confusion). The development key is one of
            // them in dev mode only.
            Algorithm::HS256 => {
                let mut keys = self.hs256.iter().chain(self.dev_hs256.iter());
                let first = keys.next().ok_or(AuthError::Invalid)?;
                match (decode(first), keys.next()) {
                    (Err(AuthError::Invalid), Some(second)) => decode(second),
                    (result, _) => result,
                }?
            }
            Algorithm::HS384 | Algorithm::HS512 => return Err(AuthError::Invalid),
            alg => {
                let jwks = self.jwks.as_ref().ok_or(AuthError::Invalid)?;
                let kid = header.kid.as_deref().ok_or(AuthError::Invalid)?;
                let (key, key_alg) = jwks.key(kid).await.ok_or(AuthError::Invalid)?;
                if key_alg != alg {
                    return Err(AuthError::Invalid);
                }
                decode(&key)?
            }
        };
        let claims = data.claims;
        // `sub` is recorded as the owner of every session row: no control characters.
        if claims.sub.trim().is_empty()
            || claims.sub.len() > 256
            || !atlas_protocol::is_clean_text(&claims.sub)
        {
            return Err(AuthError::Invalid);
        }
        match claims.role.as_deref() {
            Some("authenticated") | Some("service_role") | None => {}
            Some(_) => return Err(AuthError::Forbidden),
        }
        Ok(Identity {
            user_id: claims.sub,
            expires_at: claims.exp,
        })
    }
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Seconds from now until the Unix time `at` (zero if past).
pub fn seconds_until(at: u64) -> u64 {
    at.saturating_sub(now_s())
}

/// Mints an HS256 token for `user_id` valid for `ttl_s` seconds (development and tests).
pub fn mint_token(
    secret: &SecretString,
    user_id: &str,
    audience: &str,
    role: &str,
    ttl_s: u64,
) -> Result<String, jsonwebtoken::errors::Error> {
    let now = now_s();
    let claims = Claims {
        sub: user_id.to_owned(),
        exp: now + ttl_s,
        nbf: None,
        iat: Some(now),
        aud: Some(serde_json::Value::String(audience.to_owned())),
        iss: None,
        role: Some(role.to_owned()),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.expose_secret().as_bytes()),
    )
}

/// Finds the access token in the header, the subprotocol list or the query string.
pub fn extract_token<'a>(headers: &'a HeaderMap, query: Option<&'a str>) -> Option<String> {
    if let Some(v) = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let v = v.trim();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer ") {
            return Some(v[7..].trim().to_owned());
        }
    }
    for v in headers.get_all(axum::http::header::SEC_WEBSOCKET_PROTOCOL) {
        if let Ok(v) = v.to_str() {
            for p in v.split(',') {
                if let Some(t) = p
                    .trim()
                    .strip_prefix(atlas_protocol::BEARER_SUBPROTOCOL_PREFIX)
                {
                    return Some(t.to_owned());
                }
            }
        }
    }
    query.and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "access_token")
            .map(|(_, v)| v.into_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config {
            jwt_secret: Some(SecretString::from("test-secret-test-secret-test-secret")),
            ..Config::default()
        }
    }

    #[tokio::test]
    async fn accepts_a_good_token_and_reads_sub() {
        let c = config();
        let a = Authenticator::new(&c);
        let t = user_token(c.jwt_secret.as_ref().unwrap(), "user-1");
        assert_eq!(a.verify(&t).await.unwrap().user_id, "user-1");
    }

    #[tokio::test]
    async fn refuses_bad_tokens() {
        let c = config();
        let a = Authenticator::new(&c);
        let secret = c.jwt_secret.as_ref().unwrap();
        let anon = mint_token(secret, "u", "authenticated", "anon", 60).unwrap();
        assert_eq!(a.verify(&anon).await.unwrap_err(), AuthError::Forbidden);
        let wrong_aud = mint_token(secret, "u", "other", "authenticated", 60).unwrap();
        assert_eq!(a.verify(&wrong_aud).await.unwrap_err(), AuthError::Invalid);
        let other_key = user_token(&SecretString::from("another-secret"), "u");
        assert_eq!(a.verify(&other_key).await.unwrap_err(), AuthError::Invalid);
        assert_eq!(a.verify("not.a.jwt").await.unwrap_err(), AuthError::Invalid);
        let nul_sub = user_token(secret, "u\0v");
        assert_eq!(a.verify(&nul_sub).await.unwrap_err(), AuthError::Invalid);
        let mut tampered = user_token(secret, "u");
        // The last character carries signature bits; replace it with a different one (it
        // may already be an 'A').
        let last = tampered.pop();
        tampered.push(if last == Some('A') { 'E' } else { 'A' });
        assert!(a.verify(&tampered).await.is_err());
    }

    /// An authenticated user's token for `user`, valid for a minute, signed with `secret`.
    fn user_token(secret: &SecretString, user: &str) -> String {
        mint_token(secret, user, "authenticated", "authenticated", 60).unwrap()
    }

    fn dev_token(user: &str) -> String {
        user_token(&SecretString::from(DEV_JWT_SECRET), user)
    }

    #[tokio::test]
    async fn the_development_key_is_accepted_in_dev_mode_only() {
        // A JWKS-only production server: HS256 tokens, the development key's included, fail.
        let jwks_only = Config {
            jwks_url: Some("http://127.0.0.1:9/jwks.json".into()),
            ..Config::default()
        };
        let a = Authenticator::new(&jwks_only);
        assert_eq!(
            a.verify(&dev_token("anyone")).await.unwrap_err(),
            AuthError::Invalid
        );
        // With a production secret, still only that secret.
        let a = Authenticator::new(&config());
        assert_eq!(
            a.verify(&dev_token("anyone")).await.unwrap_err(),
            AuthError::Invalid
        );
        // Dev mode accepts both the development key and the configured secret.
        let dev = Config {
            dev: true,
            ..config()
        };
        let a = Authenticator::new(&dev);
        assert_eq!(a.verify(&dev_token("d")).await.unwrap().user_id, "d");
        let real = user_token(dev.jwt_secret.as_ref().unwrap(), "r");
        assert_eq!(a.verify(&real).await.unwrap().user_id, "r");
        // An expired development token is reported as expired, not as invalid.
        let expired = {
            let claims = Claims {
                sub: "e".into(),
                exp: now_s() - 3600,
                nbf: None,
                iat: None,
                aud: Some(serde_json::Value::String("authenticated".into())),
                iss: None,
                role: None,
            };
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(DEV_JWT_SECRET.as_bytes()),
            )
            .unwrap()
        };
        assert_eq!(a.verify(&expired).await.unwrap_err(), AuthError::Expired);
    }

    #[test]
    fn extracts_from_every_carrier() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(extract_token(&h, None).as_deref(), Some("abc"));
        let mut h = HeaderMap::new();
        h.insert(
            "sec-websocket-protocol",
            "atlas-voice.v1, bearer.xyz".parse().unwrap(),
        );
        assert_eq!(extract_token(&h, None).as_deref(), Some("xyz"));
        let h = HeaderMap::new();
        assert_eq!(
            extract_token(&h, Some("resume=1&access_token=q%2Ev")).as_deref(),
            Some("q.v")
        );
        assert_eq!(extract_token(&h, Some("resume=1")), None);
    }
}
