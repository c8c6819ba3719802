//! Token verification through the real upgrade: HS256, and ES256 / RS256 keys generated here
//! and served as a JWKS over HTTP, including rotation and rate-limited refetches.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use atlas_client::{ClientError, ConnectOptions, connect};

use crate::helpers::*;

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

/// A signing key and its public JWK.
struct TestKey {
    alg: Algorithm,
    kid: String,
    encoding: EncodingKey,
    jwk: Value,
    /// The public key in PEM form (for the algorithm-confusion attack).
    public_pem: String,
}

fn es256(kid: &str) -> TestKey {
    let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
    let pkcs8 = pair.to_pkcs8v1().unwrap();
    let point = pair.public_key().as_ref().to_vec(); // 0x04 || x || y
    TestKey {
        alg: Algorithm::ES256,
        kid: kid.into(),
        encoding: EncodingKey::from_ec_pem(pem("PRIVATE KEY", pkcs8.as_ref()).as_bytes()).unwrap(),
        jwk: json!({"kty":"EC","crv":"P-256","alg":"ES256","use":"sig","kid":kid,
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..65])}),
        public_pem: String::new(),
    }
}

fn rs256(kid: &str) -> TestKey {
    let pair = aws_lc_rs::rsa::KeyPair::generate(KeySize::Rsa2048).unwrap();
    let pkcs8 = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&pair).unwrap();
    let public = pair.public_key();
    let spki = AsDer::<aws_lc_rs::encoding::PublicKeyX509Der>::as_der(public).unwrap();
    TestKey {
        alg: Algorithm::RS256,
        kid: kid.into(),
        encoding: EncodingKey::from_rsa_pem(pem("PRIVATE KEY", pkcs8.as_ref()).as_bytes()).unwrap(),
        jwk: json!({"kty":"RSA","alg":"RS256","use":"sig","kid":kid,
            "n": URL_SAFE_NO_PAD.encode(public.modulus().big_endian_without_leading_zero()),
            "e": URL_SAFE_NO_PAD.encode(public.exponent().big_endian_without_leading_zero())}),
        public_pem: pem("PUBLIC KEY", spki.as_ref()),
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(sub: &str) -> Value {
    json!({"sub": sub, "aud": "authenticated", "role": "authenticated", "iss": "https://auth.example/v1",
           "exp": now() + 600, "iat": now()})
}

fn sign(key: &TestKey, claims: &Value) -> String {
    let mut header = Header::new(key.alg);
    header.kid = Some(key.kid.clone());
    jsonwebtoken::encode(&header, claims, &key.encoding).unwrap()
}

/// A JWKS endpoint whose key set can be swapped, counting fetches.
struct JwksServer {
    addr: SocketAddr,
    keys: Arc<Mutex<Value>>,
    fetches: Arc<AtomicUsize>,
}

async fn jwks_server(initial: Vec<Value>) -> JwksServer {
    let keys = Arc::new(Mutex::new(json!({ "keys": initial })));
    let fetches = Arc::new(AtomicUsize::new(0));
    let (k, f) = (keys.clone(), fetches.clone());
    let router = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            let (k, f) = (k.clone(), f.clone());
            async move {
                f.fetch_add(1, Ordering::SeqCst);
                axum::Json(k.lock().unwrap().clone())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    JwksServer {
        addr,
        keys,
        fetches,
    }
}

async fn outcome(app: &TestApp, token: &str) -> Result<(), (u16, String)> {
    match connect(&ConnectOptions::new(app.url(), token)).await {
        Ok(_) => Ok(()),
        Err(ClientError::Refused { status, code, .. }) => Err((status, code)),
        Err(e) => panic!("{e}"),
    }
}

fn unauthorized() -> Result<(), (u16, String)> {
    Err((401, "unauthorized".into()))
}

#[tokio::test]
async fn asymmetric_tokens_every_failure_case_and_key_rotation() {
    let es = es256("es-1");
    let rs = rs256("rs-1");
    let jwks = jwks_server(vec![es.jwk.clone(), rs.jwk.clone()]).await;
    let app = spawn_app_with(fast_fakes(), |c| {
        c.jwks_url = Some(format!("http://{}/jwks.json", jwks.addr));
        c.jwt_issuer = Some("https://auth.example/v1".into());
        c.jwks_min_refetch_s = 2;
        c.max_sessions_per_user = 100;
        c.connect_burst = 1000;
    })
    .await;

    // Good ES256 and RS256 tokens; the HS256 secret still works alongside.
    assert_eq!(outcome(&app, &sign(&es, &claims("alice"))).await, Ok(()));
    assert_eq!(outcome(&app, &sign(&rs, &claims("bob"))).await, Ok(()));
    assert_eq!(outcome(&app, &app.token("carol")).await, Ok(()));
    assert_eq!(jwks.fetches.load(Ordering::SeqCst), 1, "keys are cached");

    let mut c = claims("u");
    c["exp"] = json!(now() - 120);
    assert_eq!(
        outcome(&app, &sign(&es, &c)).await,
        Err((401, "token_expired".into()))
    );
    let mut c = claims("u");
    c["nbf"] = json!(now() + 600);
    assert_eq!(outcome(&app, &sign(&es, &c)).await, unauthorized());
    let mut c = claims("u");
    c["aud"] = json!("somebody-else");
    assert_eq!(outcome(&app, &sign(&rs, &c)).await, unauthorized());
    let mut c = claims("u");
    c["iss"] = json!("https://evil.example");
    assert_eq!(outcome(&app, &sign(&rs, &c)).await, unauthorized());
    let mut c = claims("u");
    c["role"] = json!("anon");
    assert_eq!(
        outcome(&app, &sign(&es, &c)).await,
        Err((403, "forbidden".into()))
    );

    // alg: none.
    let none_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT","kid":"es-1"}"#);
    let body = URL_SAFE_NO_PAD.encode(claims("u").to_string());
    assert_eq!(
        outcome(&app, &format!("{none_header}.{body}.")).await,
        unauthorized()
    );
    // HS/RS confusion: an HS256 token "signed" with the RSA public key as the secret.
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("rs-1".into());
    let forged = jsonwebtoken::encode(
        &header,
        &claims("u"),
        &EncodingKey::from_secret(rs.public_pem.as_bytes()),
    )
    .unwrap();
    assert_eq!(outcome(&app, &forged).await, unauthorized());
    // A token whose header claims RS256 but names the EC key.
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("rs-1".into());
    let mismatched = jsonwebtoken::encode(&header, &claims("u"), &es.encoding).unwrap();
    assert_eq!(outcome(&app, &mismatched).await, unauthorized());
    // Tampered signature and tampered payload.
    let good = sign(&es, &claims("u"));
    let (head, sig) = good.rsplit_once('.').unwrap();
    let mut sig_bytes = URL_SAFE_NO_PAD.decode(sig).unwrap();
    sig_bytes[5] ^= 0x01;
    assert_eq!(
        outcome(
            &app,
            &format!("{head}.{}", URL_SAFE_NO_PAD.encode(sig_bytes))
        )
        .await,
        unauthorized()
    );
    let parts: Vec<&str> = good.split('.').collect();
    let evil_body = URL_SAFE_NO_PAD.encode(claims("admin").to_string());
    assert_eq!(
        outcome(&app, &format!("{}.{evil_body}.{}", parts[0], parts[2])).await,
        unauthorized()
    );

    // Unknown kids: refetches are rate-limited.
    let before = jwks.fetches.load(Ordering::SeqCst);
    let stranger = es256("never-published");
    for _ in 0..10 {
        assert_eq!(
            outcome(&app, &sign(&stranger, &claims("u"))).await,
            unauthorized()
        );
    }
    let after = jwks.fetches.load(Ordering::SeqCst);
    assert!(
        after - before <= 1,
        "{} refetches for 10 unknown-kid tokens",
        after - before
    );

    // Rotation: a new key is published; a token with its kid triggers a refetch and works,
    // and the retired key stops working.
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let es2 = es256("es-2");
    *jwks.keys.lock().unwrap() = json!({ "keys": [es2.jwk.clone(), rs.jwk.clone()] });
    assert_eq!(outcome(&app, &sign(&es2, &claims("dave"))).await, Ok(()));
    assert_eq!(
        outcome(&app, &sign(&es, &claims("erin"))).await,
        unauthorized()
    );
}

#[tokio::test]
async fn development_tokens_never_carry_the_production_secret() {
    // Dev mode on loopback with the project's real secret configured (developing against
    // real accounts): /dev/token still signs with the development-only key.
    let dev = spawn_app_with(fast_fakes(), |c| c.dev = true).await;
    let body: Value = dev.post_dev_token(None).await.json().await.unwrap();
    let token = body["token"].as_str().unwrap().to_owned();
    let mut validation = jsonwebtoken::Validation::new(Algorithm::HS256);
    validation.set_audience(&["authenticated"]);
    let with = |secret: &str| {
        jsonwebtoken::decode::<Value>(
            &token,
            &jsonwebtoken::DecodingKey::from_secret(secret.as_bytes()),
            &validation,
        )
    };
    assert!(
        with(SECRET).is_err(),
        "not signed with the production secret"
    );
    assert!(with(atlas_server::config::DEV_JWT_SECRET).is_ok());
    assert_eq!(outcome(&dev, &token).await, Ok(()), "dev mode accepts it");
    // A production server with the same secret refuses it.
    let prod = spawn_app().await;
    assert_eq!(outcome(&prod, &token).await, unauthorized());
    // And a production server with keys from a JWKS only, too.
    let jwks = jwks_server(vec![]).await;
    let jwks_only = spawn_app_with(fast_fakes(), |c| {
        c.jwt_secret = None;
        c.jwks_url = Some(format!("http://{}/jwks.json", jwks.addr));
    })
    .await;
    assert_eq!(outcome(&jwks_only, &token).await, unauthorized());
}

#[tokio::test]
async fn dev_mode_refuses_to_start_on_a_public_address() {
    let fakes = atlas_fakes::Fakes::start(fast_fakes(), SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = atlas_server::Config::default();
    config.use_provider_urls(
        fakes.deepgram_url(),
        fakes.anthropic_url(),
        fakes.openai_url(),
    );
    config.database_url = format!("sqlite://{}/atlas.db", dir.path().display());
    config.spool_dir = dir.path().join("spool");
    config.listen = SocketAddr::from(([0, 0, 0, 0], 0));
    let refused = atlas_server::Application::build(config.clone()).await;
    let e = refused.err().expect("refused").to_string();
    assert!(e.contains("ATLAS_DEV_ALLOW_PUBLIC"), "{e}");
    // Forced, it starts (and says so loudly in the log).
    config.dev_allow_public = true;
    let app = atlas_server::Application::build(config).await.unwrap();
    assert!(app.local_addr().ip().is_unspecified());
}

#[tokio::test]
async fn a_slow_key_fetch_is_shared_and_holds_up_no_other_token() {
    let old = es256("old");
    let new = es256("new");
    let keys = Arc::new(Mutex::new(json!({ "keys": [old.jwk.clone()] })));
    let fetches = Arc::new(AtomicUsize::new(0));
    // Each response waits for a permit: the test decides when the key server answers.
    let gate = Arc::new(tokio::sync::Semaphore::new(1));
    let router = {
        let (keys, fetches, gate) = (keys.clone(), fetches.clone(), gate.clone());
        axum::Router::new().route(
            "/jwks.json",
            axum::routing::get(move || {
                let (keys, fetches, gate) = (keys.clone(), fetches.clone(), gate.clone());
                async move {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    gate.acquire().await.unwrap().forget();
                    axum::Json(keys.lock().unwrap().clone())
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    let config = atlas_server::Config {
        jwks_url: Some(format!("http://{addr}/jwks.json")),
        jwt_issuer: Some("https://auth.example/v1".into()),
        jwks_min_refetch_s: 0,
        ..atlas_server::Config::default()
    };
    let auth = Arc::new(atlas_server::auth::Authenticator::new(&config));
    let old_token = sign(&old, &claims("old-user"));
    assert_eq!(
        auth.verify(&old_token).await.unwrap().user_id,
        "old-user",
        "first fetch"
    );

    // The key is rotated; the key server is now slow (no permit).
    *keys.lock().unwrap() = json!({ "keys": [old.jwk.clone(), new.jwk.clone()] });
    let new_token = sign(&new, &claims("new-user"));
    let waiting: Vec<_> = (0..20)
        .map(|_| {
            let (auth, token) = (auth.clone(), new_token.clone());
            tokio::spawn(async move { auth.verify(&token).await })
        })
        .collect();
    // Wait until the one fetch has reached the key server.
    while fetches.load(Ordering::SeqCst) < 2 {
        tokio::task::yield_now().await;
    }
    // Meanwhile a token whose key is cached is decided at once (no lock, no network).
    let quick = tokio::time::timeout(std::time::Duration::from_secs(1), auth.verify(&old_token))
        .await
        .expect("not held up by the fetch in flight");
    assert_eq!(quick.unwrap().user_id, "old-user");
    for w in &waiting {
        assert!(!w.is_finished(), "unknown-kid tokens wait for the fetch");
    }
    gate.add_permits(1);
    for w in waiting {
        assert_eq!(w.await.unwrap().unwrap().user_id, "new-user");
    }
    assert_eq!(
        fetches.load(Ordering::SeqCst),
        2,
        "one fetch for twenty tokens"
    );
}
