//! Validator tests with keys made here and a JWKS file. The same validator is
//! tested against a real OIDC provider in tests/tests/oidc.rs.

use super::*;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::json;

const ISS: &str = "https://idp.test/realms/h";

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

struct EcKey {
    pair: EcdsaKeyPair,
    kid: String,
}

impl EcKey {
    fn new(kid: &str) -> EcKey {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        EcKey {
            pair,
            kid: kid.into(),
        }
    }

    fn jwk(&self) -> Value {
        let p = self.pair.public_key().as_ref();
        json!({"kty": "EC", "crv": "P-256", "kid": self.kid, "use": "sig", "alg": "ES256",
               "x": b64(&p[1..33]), "y": b64(&p[33..65])})
    }

    fn sign(&self, header: Value, claims: Value) -> String {
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig = self
            .pair
            .sign(&SystemRandom::new(), input.as_bytes())
            .unwrap();
        format!("{input}.{}", b64(sig.as_ref()))
    }

    /// A token whose claims are the usual ones changed by `f`.
    fn token_with(&self, f: &dyn Fn(&mut Value)) -> String {
        let mut c = claims();
        f(&mut c);
        self.token(c)
    }

    fn token(&self, claims: Value) -> String {
        self.sign(
            json!({"alg": "ES256", "typ": "JWT", "kid": self.kid}),
            claims,
        )
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn claims() -> Value {
    json!({"iss": ISS, "sub": "dr-alice", "aud": ["patients-api", "other"], "exp": now() + 300,
           "iat": now(), "groups": ["fhir-clinicians", "staff"], "client_id": "ehr",
           "email": "alice@hospital.test",
           "realm_access": {"roles": ["auditor"]}})
}

fn issuer_cfg(jwks: &std::path::Path) -> OidcIssuer {
    OidcIssuer {
        issuer: ISS.into(),
        audiences: vec!["patients-api".into()],
        jwks_file: Some(jwks.to_owned()),
        algorithms: vec!["ES256".into(), "RS256".into()],
        groups_claims: vec!["groups".into(), "realm_access.roles".into()],
        group_map: [("fhir-clinicians".to_owned(), "clinicians".to_owned())].into(),
        claims: vec!["client_id".into()],
        person_claim: Some("email".into()),
        clock_skew: Duration::from_secs(5),
        ca_file: None,
        jwks_refresh_min: Duration::ZERO,
    }
}

fn write_jwks(path: &std::path::Path, keys: &[&EcKey]) {
    let doc = json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()});
    std::fs::write(path, doc.to_string()).unwrap();
}

/// An issuer publishing one key ("k1") in a JWKS file, and a validator trusting it
/// (the directory lives as long as the first element).
fn one_key_issuer() -> (tempfile::TempDir, EcKey, TokenValidator) {
    let d = tempfile::tempdir().unwrap();
    let k = EcKey::new("k1");
    write_jwks(&d.path().join("jwks.json"), &[&k]);
    let v = validator(issuer_cfg(&d.path().join("jwks.json")));
    (d, k, v)
}

fn validator(cfg: OidcIssuer) -> TokenValidator {
    TokenValidator::new(
        &OidcSection { issuers: vec![cfg] },
        &crate::sockets::SocketFactory::new(0, None),
    )
    .unwrap()
}

#[tokio::test]
async fn valid_token_yields_identity_with_mapped_groups() {
    let (_d, k, v) = one_key_issuer();
    let id = v.validate(&k.token(claims())).await.unwrap();
    assert_eq!(id.issuer, ISS);
    assert_eq!(id.subject, "dr-alice");
    assert_eq!(id.groups, ["clinicians", "staff", "auditor"]);
    assert_eq!(id.claims.get("client_id").map(String::as_str), Some("ehr"));
    assert_eq!(id.person.as_deref(), Some("alice@hospital.test"));
    assert!(id.expires_at > now());

    let mut h = HeaderMap::new();
    assert_eq!(v.validate_headers(&h).await, Err(TokenError::Missing));
    h.insert(header::AUTHORIZATION, "Basic YTpi".parse().unwrap());
    assert_eq!(v.validate_headers(&h).await, Err(TokenError::Missing));
    h.insert(
        header::AUTHORIZATION,
        format!("Bearer {}", k.token(claims())).parse().unwrap(),
    );
    assert_eq!(v.validate_headers(&h).await.unwrap().subject, "dr-alice");
}

#[tokio::test]
async fn each_failure_has_its_reason() {
    let (_d, k, v) = one_key_issuer();
    let with = |f: &dyn Fn(&mut Value)| k.token_with(f);
    let valid = k.token(claims());
    let (h, p, s) = {
        let mut it = valid.split('.');
        (
            it.next().unwrap().to_owned(),
            it.next().unwrap().to_owned(),
            it.next().unwrap().to_owned(),
        )
    };
    let mut tampered_claims = claims();
    tampered_claims["sub"] = json!("mallory");
    let tampered = format!("{h}.{}.{s}", b64(tampered_claims.to_string().as_bytes()));
    let none = format!(
        "{}.{p}.",
        b64(json!({"alg": "none", "typ": "JWT"}).to_string().as_bytes())
    );
    // HS256 "signed" with the public key as the secret: the classic confusion attack.
    let hs = {
        use ring::hmac;
        let header = b64(json!({"alg": "HS256", "kid": "k1"}).to_string().as_bytes());
        let key = hmac::Key::new(hmac::HMAC_SHA256, k.jwk().to_string().as_bytes());
        let sig = hmac::sign(&key, format!("{header}.{p}").as_bytes());
        format!("{header}.{p}.{}", b64(sig.as_ref()))
    };
    let ed = {
        let rng = SystemRandom::new();
        let pk = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let pair = Ed25519KeyPair::from_pkcs8(pk.as_ref()).unwrap();
        let header = b64(json!({"alg": "EdDSA", "kid": "k1"}).to_string().as_bytes());
        let sig = pair.sign(format!("{header}.{p}").as_bytes());
        format!("{header}.{p}.{}", b64(sig.as_ref()))
    };
    let cases: Vec<(&str, String, TokenError)> = vec![
        (
            "expired",
            with(&|c| c["exp"] = json!(now() - 60)),
            TokenError::Expired,
        ),
        (
            "not yet valid",
            with(&|c| c["nbf"] = json!(now() + 120)),
            TokenError::NotYetValid,
        ),
        (
            "wrong audience",
            with(&|c| c["aud"] = json!("billing-api")),
            TokenError::WrongAudience,
        ),
        (
            "no audience",
            with(&|c| {
                c.as_object_mut().unwrap().remove("aud");
            }),
            TokenError::WrongAudience,
        ),
        (
            "wrong issuer",
            with(&|c| c["iss"] = json!("https://evil.test")),
            TokenError::WrongIssuer,
        ),
        ("tampered", tampered, TokenError::BadSignature),
        ("alg none", none, TokenError::AlgNotAllowed),
        ("hmac with the public key", hs, TokenError::AlgNotAllowed),
        ("alg not configured", ed, TokenError::AlgNotAllowed),
        (
            "unknown kid",
            EcKey::new("k9").token(claims()),
            TokenError::UnknownKey,
        ),
        ("garbage", "abc".into(), TokenError::Malformed),
        ("bad base64", "a.b.c".into(), TokenError::Malformed),
    ];
    for (what, token, want) in cases {
        assert_eq!(v.validate(&token).await, Err(want), "{what}");
    }
    // Within the clock skew, an expired token still passes.
    assert!(v
        .validate(&with(&|c| c["exp"] = json!(now() - 2)))
        .await
        .is_ok());
}

/// Hostile shapes: a key of one type under another's algorithm, oversized and deeply
/// nested headers, claims of the wrong types. Each is refused with a reason, none
/// panics, none is accepted.
#[tokio::test]
async fn hostile_tokens_are_refused_with_a_reason() {
    let (_d, k, v) = one_key_issuer();
    let with = |f: &dyn Fn(&mut Value)| k.token_with(f);
    let payload = b64(claims().to_string().as_bytes());
    let raw = |header: String| {
        let h = b64(header.as_bytes());
        let input = format!("{h}.{payload}");
        let sig = k.pair.sign(&SystemRandom::new(), input.as_bytes()).unwrap();
        format!("{input}.{}", b64(sig.as_ref()))
    };
    let cases: Vec<(&str, String, TokenError)> = vec![
        (
            "an EC key's signature claimed as RS256",
            k.sign(json!({"alg": "RS256", "kid": "k1"}), claims()),
            TokenError::AlgNotAllowed,
        ),
        (
            "a 64 KiB kid",
            k.sign(json!({"alg": "ES256", "kid": "k".repeat(65536)}), claims()),
            TokenError::UnknownKey,
        ),
        (
            "a header nested 10,000 deep",
            raw(format!(
                "{{\"alg\":\"ES256\",\"kid\":\"k1\",\"x\":{}{}}}",
                "[".repeat(10_000),
                "]".repeat(10_000)
            )),
            TokenError::Malformed,
        ),
        (
            "a header that is not an object",
            raw("[\"ES256\"]".into()),
            TokenError::Malformed,
        ),
        (
            "jku pointing elsewhere is not followed",
            k.sign(
                json!({"alg": "ES256", "kid": "k9", "jku": "https://evil.test/jwks"}),
                claims(),
            ),
            TokenError::UnknownKey,
        ),
        (
            "exp as a string",
            with(&|c| c["exp"] = json!("tomorrow")),
            TokenError::Malformed,
        ),
        (
            "exp far beyond any date",
            with(&|c| c["exp"] = json!(1e300)),
            TokenError::Malformed,
        ),
        (
            "aud as a number",
            with(&|c| c["aud"] = json!(7)),
            TokenError::WrongAudience,
        ),
        (
            "four segments",
            format!("{}.x", k.token(claims())),
            TokenError::Malformed,
        ),
    ];
    for (what, token, want) in cases {
        assert_eq!(v.validate(&token).await, Err(want), "{what}");
    }
}

#[tokio::test]
async fn unknown_kid_refreshes_keys_with_a_rate_limit() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("jwks.json");
    let k1 = EcKey::new("k1");
    let k2 = EcKey::new("k2");
    write_jwks(&path, &[&k1]);
    let mut cfg = issuer_cfg(&path);
    cfg.jwks_refresh_min = Duration::from_secs(3600);
    let slow = validator(cfg.clone());
    cfg.jwks_refresh_min = Duration::ZERO;
    let fast = validator(cfg);
    // First use: keys are fresh from the file; k2 is not published yet.
    assert!(fast.validate(&k1.token(claims())).await.is_ok());
    assert!(slow.validate(&k1.token(claims())).await.is_ok());
    assert_eq!(
        fast.validate(&k2.token(claims())).await,
        Err(TokenError::UnknownKey)
    );
    // The issuer rotates: k2 published, k1 withdrawn.
    write_jwks(&path, &[&k2]);
    assert!(fast.validate(&k2.token(claims())).await.is_ok());
    // The rate-limited validator has not refreshed yet: its first refresh is allowed.
    assert!(slow.validate(&k2.token(claims())).await.is_ok());
    // A further rotation within the interval is not picked up by it.
    let k3 = EcKey::new("k3");
    write_jwks(&path, &[&k3]);
    assert_eq!(
        slow.validate(&k3.token(claims())).await,
        Err(TokenError::UnknownKey)
    );
    assert!(fast.validate(&k3.token(claims())).await.is_ok());
    // k1 was withdrawn from the file and fast has re-read it.
    assert_eq!(
        fast.validate(&k1.token(claims())).await,
        Err(TokenError::UnknownKey)
    );
}

#[test]
fn jwks_without_signing_keys_is_rejected() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("jwks.json");
    std::fs::write(
        &path,
        r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"h"}]}"#,
    )
    .unwrap();
    let e = TokenValidator::new(
        &OidcSection {
            issuers: vec![issuer_cfg(&path)],
        },
        &crate::sockets::SocketFactory::new(0, None),
    )
    .err()
    .expect("rejected");
    assert!(e.to_string().contains("no usable signing key"), "{e}");
}
