//! Access-token verification (Supabase-compatible JWTs) and credential extraction.
//!
//! Tokens arrive in the `Authorization: Bearer` header, a `bearer.<jwt>` WebSocket subprotocol
//! entry or the `access_token` query parameter. They are never logged: only the user id and
//! the failure kind are.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::HeaderMap;
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

/// Verifies access tokens.
pub struct Authenticator {
    /// HS256 key, when configured.
    hs256: Option<DecodingKey>,
    /// Checks shared by every algorithm.
    validation: Validation,
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Authenticator {
    /// Builds the verifier from the configuration.
    pub fn new(config: &Config) -> Self {
        let secret = config
            .jwt_secret
            .as_ref()
            .map(|s| s.expose_secret().to_owned())
            .or_else(|| config.dev.then(|| DEV_JWT_SECRET.to_owned()));
        let hs256 = secret.map(|s| DecodingKey::from_secret(s.as_bytes()));
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_S;
        validation.validate_nbf = true;
        validation.set_audience(&[config.jwt_audience.as_str()]);
        validation.set_required_spec_claims(&["exp", "sub", "aud"]);
        if let Some(iss) = &config.jwt_issuer {
            validation.set_issuer(&[iss.as_str()]);
        }
        Authenticator { hs256, validation }
    }

    /// Verifies `token` and returns who it belongs to.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Invalid)?;
        let key = match header.alg {
            Algorithm::HS256 => self.hs256.as_ref().ok_or(AuthError::Invalid)?,
            _ => return Err(AuthError::Invalid),
        };
        let data = jsonwebtoken::decode::<Claims>(token, key, &self.validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                _ => AuthError::Invalid,
            }
        })?;
        let claims = data.claims;
        if claims.sub.trim().is_empty() || claims.sub.len() > 256 {
            return Err(AuthError::Invalid);
        }
        match claims.role.as_deref() {
            Some("anon") => return Err(AuthError::Forbidden),
            Some("authenticated") | Some("service_role") | None => {}
            Some(_) => return Err(AuthError::Forbidden),
        }
        Ok(Identity {
            user_id: claims.sub,
            expires_at: claims.exp,
        })
    }
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

    #[test]
    fn accepts_a_good_token_and_reads_sub() {
        let c = config();
        let a = Authenticator::new(&c);
        let t = mint_token(
            c.jwt_secret.as_ref().unwrap(),
            "user-1",
            "authenticated",
            "authenticated",
            60,
        )
        .unwrap();
        assert_eq!(a.verify(&t).unwrap().user_id, "user-1");
    }

    #[test]
    fn refuses_bad_tokens() {
        let c = config();
        let a = Authenticator::new(&c);
        let secret = c.jwt_secret.as_ref().unwrap();
        let anon = mint_token(secret, "u", "authenticated", "anon", 60).unwrap();
        assert_eq!(a.verify(&anon).unwrap_err(), AuthError::Forbidden);
        let wrong_aud = mint_token(secret, "u", "other", "authenticated", 60).unwrap();
        assert_eq!(a.verify(&wrong_aud).unwrap_err(), AuthError::Invalid);
        let other_key = mint_token(
            &SecretString::from("another-secret"),
            "u",
            "authenticated",
            "authenticated",
            60,
        )
        .unwrap();
        assert_eq!(a.verify(&other_key).unwrap_err(), AuthError::Invalid);
        assert_eq!(a.verify("not.a.jwt").unwrap_err(), AuthError::Invalid);
        let mut tampered = mint_token(secret, "u", "authenticated", "authenticated", 60).unwrap();
        tampered.pop();
        tampered.push('A');
        assert!(a.verify(&tampered).is_err());
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
