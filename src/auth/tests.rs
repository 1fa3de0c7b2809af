//! Every refusal class of README "HTTP answers", rotation, the organisation claim and the cache.

use super::*;
use crate::config::{AuthConfig, Config, Secret};
use crate::event::NormaliseOptions;
use serde_json::json;

const S1: &str = "first-secret-0123456789abcdef-0123456789";
const S2: &str = "second-secret-0123456789abcdef-012345678";
const OTHER: &str = "not-a-configured-secret-0123456789abcdef";

fn loaded(secrets: &[&str], tweak: impl FnOnce(&mut AuthConfig)) -> Loaded {
    let mut config = Config::default();
    config.auth.secrets = secrets.iter().map(|s| Secret::new(*s)).collect();
    tweak(&mut config.auth);
    Loaded { secrets: config.auth.secrets.clone(), config, file: None, normalise: NormaliseOptions::default() }
}

fn verifier(tweak: impl FnOnce(&mut AuthConfig)) -> Verifier {
    Verifier::new(&loaded(&[S1], tweak))
}

fn default_verifier() -> Verifier {
    verifier(|_| {})
}

fn check(v: &Verifier, token: &str) -> Result<Verified, AuthError> {
    v.verify(Some(token.as_bytes()))
}

/// A token with these claims, signed with jsonwebtoken directly.
fn token(secret: &str, alg: jsonwebtoken::Algorithm, claims: Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
}

fn hs256(claims: Value) -> String {
    token(S1, jsonwebtoken::Algorithm::HS256, claims)
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

fn t() -> i64 {
    now() as i64
}

// ---------------------------------------------------------------------------------------------
// Accepted

#[test]
fn a_token_signed_by_sign_verifies() {
    let v = default_verifier();
    for ttl in [None, Some(Duration::from_secs(3600))] {
        let tok = sign(S1.as_bytes(), Algorithm::HS256, None, "organisationId", ttl);
        assert_eq!(check(&v, &tok), Ok(Verified { organisation_id: None, secret_index: 0 }), "ttl {ttl:?}");
    }
}

#[test]
fn a_token_without_exp_or_any_claim_verifies() {
    let v = default_verifier();
    assert!(check(&v, &hs256(json!({}))).is_ok());
    assert!(check(&v, &hs256(json!({"iat": t()}))).is_ok());
    assert!(check(&v, &hs256(json!({"sub": "webio", "aud": "someone", "iss": "webio"}))).is_ok());
}

#[test]
fn sign_produces_the_requested_algorithm_and_claims() {
    let tok = sign(S1.as_bytes(), Algorithm::HS384, Some("42"), "org", Some(Duration::from_secs(60)));
    let header = jsonwebtoken::decode_header(&tok).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::HS384);
    let claims: Map<String, Value> =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(tok.split('.').nth(1).unwrap()).unwrap()).unwrap();
    assert_eq!(claims["org"], json!("42"));
    let exp = claims["exp"].as_u64().unwrap();
    assert!((now() + 59..=now() + 61).contains(&exp), "{exp}");
}

#[test]
fn a_bearer_prefix_and_surrounding_spaces_are_tolerated() {
    let v = default_verifier();
    let tok = hs256(json!({}));
    for header in [format!("Bearer {tok}"), format!("  {tok} "), format!("Bearer  {tok}")] {
        assert!(check(&v, &header).is_ok(), "{header:?}");
    }
}

#[test]
fn every_configured_hmac_algorithm_is_accepted() {
    use jsonwebtoken::Algorithm as J;
    let v = verifier(|a| a.algorithms = vec![Algorithm::HS256, Algorithm::HS384, Algorithm::HS512]);
    for alg in [J::HS256, J::HS384, J::HS512] {
        assert!(check(&v, &token(S1, alg, json!({}))).is_ok(), "{alg:?}");
    }
    let only512 = verifier(|a| a.algorithms = vec![Algorithm::HS512]);
    assert!(check(&only512, &token(S1, J::HS512, json!({}))).is_ok());
    assert_eq!(check(&only512, &token(S1, J::HS256, json!({}))), Err(AuthError::Algorithm));
}

// ---------------------------------------------------------------------------------------------
// Refused

#[test]
fn a_missing_or_empty_header_is_missing() {
    let v = default_verifier();
    assert_eq!(v.verify(None), Err(AuthError::Missing));
    for empty in ["", "   ", "\t"] {
        assert_eq!(check(&v, empty), Err(AuthError::Missing), "{empty:?}");
    }
    // A prefix with nothing after it is refused too (as missing or malformed).
    for bare in ["Bearer ", "Bearer    "] {
        assert!(matches!(check(&v, bare), Err(AuthError::Missing | AuthError::Malformed)), "{bare:?}");
    }
}

#[test]
fn garbage_is_malformed() {
    let v = default_verifier();
    let good = hs256(json!({}));
    let parts: Vec<&str> = good.split('.').collect();
    let cases: Vec<(&str, String)> = vec![
        ("one word", "garbage".into()),
        ("two parts", "abc.def".into()),
        ("four parts", format!("{good}.x")),
        ("three dots only", "...".into()),
        ("empty parts", "..".into()),
        ("header not base64", format!("%%%.{}.{}", parts[1], parts[2])),
        ("header not json", format!("{}.{}.{}", URL_SAFE_NO_PAD.encode("nope"), parts[1], parts[2])),
        ("header without alg", format!("{}.{}.{}", b64(&json!({"typ": "JWT"})), parts[1], parts[2])),
        ("alg not a string", format!("{}.{}.{}", b64(&json!({"alg": 256})), parts[1], parts[2])),
        ("header a json array", format!("{}.{}.{}", b64(&json!(["HS256"])), parts[1], parts[2])),
    ];
    for (name, tok) in cases {
        assert_eq!(check(&v, &tok), Err(AuthError::Malformed), "{name}: {tok}");
    }
    assert_eq!(v.verify(Some(b"\xff\xfe.a.b")), Err(AuthError::Malformed), "not utf-8");
}

#[test]
fn a_correctly_signed_token_whose_claims_are_not_json_is_refused() {
    let v = default_verifier();
    let header = b64(&json!({"alg": "HS256", "typ": "JWT"}));
    let payload = URL_SAFE_NO_PAD.encode("not json");
    let message = format!("{header}.{payload}");
    let sig = jsonwebtoken::crypto::sign(
        message.as_bytes(),
        &EncodingKey::from_secret(S1.as_bytes()),
        jsonwebtoken::Algorithm::HS256,
    )
    .unwrap();
    assert_eq!(check(&v, &format!("{message}.{sig}")), Err(AuthError::Malformed));
}

#[test]
fn a_token_signed_with_another_secret_has_a_bad_signature() {
    let v = default_verifier();
    let tok = token(OTHER, jsonwebtoken::Algorithm::HS256, json!({}));
    assert_eq!(check(&v, &tok), Err(AuthError::BadSignature));
    // A signature cut short, or claims changed after signing.
    let good = hs256(json!({"organisationId": "1"}));
    let (rest, sig) = good.rsplit_once('.').unwrap();
    assert_eq!(check(&v, &format!("{rest}.{}", &sig[..sig.len() - 4])), Err(AuthError::BadSignature));
    let header = good.split('.').next().unwrap();
    let forged = format!("{header}.{}.{sig}", b64(&json!({"organisationId": "2"})));
    assert_eq!(check(&v, &forged), Err(AuthError::BadSignature));
    assert_eq!(check(&v, &format!("{rest}.")), Err(AuthError::BadSignature));
}

#[test]
fn exp_is_checked_with_leeway() {
    // (exp relative to now, leeway in seconds, expected)
    let cases: &[(i64, u64, Result<(), AuthError>)] = &[
        (3600, 60, Ok(())),
        (-3600, 60, Err(AuthError::Expired)),
        (-61 - 5, 60, Err(AuthError::Expired)),
        (-30, 60, Ok(())),
        (-5, 0, Err(AuthError::Expired)),
        (5, 0, Ok(())),
        (-86_400, 172_800, Ok(())),
    ];
    for (rel, leeway, want) in cases {
        let v = verifier(|a| a.leeway = Duration::from_secs(*leeway));
        let got = check(&v, &hs256(json!({"exp": t() + rel}))).map(|_| ());
        assert_eq!(got, *want, "exp now{rel:+} leeway {leeway}");
    }
}

#[test]
fn nbf_is_checked_with_leeway() {
    let cases: &[(i64, u64, Result<(), AuthError>)] = &[
        (-3600, 60, Ok(())),
        (3600, 60, Err(AuthError::NotYetValid)),
        (30, 60, Ok(())),
        (5, 0, Err(AuthError::NotYetValid)),
        (0, 0, Ok(())),
    ];
    for (rel, leeway, want) in cases {
        let v = verifier(|a| a.leeway = Duration::from_secs(*leeway));
        let got = check(&v, &hs256(json!({"nbf": t() + rel}))).map(|_| ());
        assert_eq!(got, *want, "nbf now{rel:+} leeway {leeway}");
    }
}

#[test]
fn fractional_exp_and_nbf_are_honoured() {
    let v = verifier(|a| a.leeway = Duration::from_secs(0));
    let now = t() as f64;
    assert_eq!(check(&v, &hs256(json!({"exp": now - 100.5}))), Err(AuthError::Expired));
    assert!(check(&v, &hs256(json!({"exp": now + 100.5}))).is_ok());
    assert_eq!(check(&v, &hs256(json!({"nbf": now + 100.5}))), Err(AuthError::NotYetValid));
}

#[test]
fn a_non_numeric_exp_is_refused() {
    let v = default_verifier();
    for exp in [json!("tomorrow"), json!(-5), json!({"at": 1}), json!(true)] {
        assert!(check(&v, &hs256(json!({ "exp": exp }))).is_err(), "exp {exp}");
    }
}

#[test]
fn alg_none_is_refused_as_an_algorithm() {
    let v = default_verifier();
    let claims = b64(&json!({"organisationId": "1"}));
    let good_sig = hs256(json!({})).rsplit_once('.').unwrap().1.to_owned();
    for header in [
        "eyJhbGciOiJub25lIn0".to_owned(), // {"alg":"none"}
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&json!({"alg": "None"})),
        b64(&json!({"alg": "NONE"})),
        b64(&json!({"alg": ""})),
    ] {
        assert_eq!(check(&v, &format!("{header}.{claims}.")), Err(AuthError::Algorithm), "{header}");
        assert_eq!(check(&v, &format!("{header}.{claims}.{good_sig}")), Err(AuthError::Algorithm), "{header}");
    }
}

#[test]
fn an_algorithm_not_configured_is_refused() {
    use jsonwebtoken::Algorithm as J;
    let v = default_verifier();
    assert_eq!(check(&v, &token(S1, J::HS512, json!({}))), Err(AuthError::Algorithm));
    assert_eq!(check(&v, &token(S1, J::HS384, json!({}))), Err(AuthError::Algorithm));
    let claims = b64(&json!({}));
    for alg in ["RS256", "ES256", "PS256", "EdDSA", "hs256", "HS256 "] {
        let header = b64(&json!({ "alg": alg, "typ": "JWT" }));
        assert_eq!(check(&v, &format!("{header}.{claims}.c2ln")), Err(AuthError::Algorithm), "{alg}");
    }
}

#[test]
fn the_algorithm_is_checked_before_the_signature() {
    // Signed with a secret we don't know and an algorithm we don't allow: the class is algorithm.
    let tok = token(OTHER, jsonwebtoken::Algorithm::HS512, json!({}));
    assert_eq!(check(&default_verifier(), &tok), Err(AuthError::Algorithm));
}

// ---------------------------------------------------------------------------------------------
// Rotation

#[test]
fn either_secret_of_a_rotation_verifies_and_its_index_is_reported() {
    let v = Verifier::new(&loaded(&[S1, S2], |_| {}));
    let cases: &[(&str, Result<usize, AuthError>)] = &[(S1, Ok(0)), (S2, Ok(1)), (OTHER, Err(AuthError::BadSignature))];
    for (secret, want) in cases {
        let tok = token(secret, jsonwebtoken::Algorithm::HS256, json!({"iat": t()}));
        assert_eq!(check(&v, &tok).map(|v| v.secret_index), *want, "{secret}");
        // Same answer from the cache.
        assert_eq!(check(&v, &tok).map(|v| v.secret_index), *want, "{secret} (cached)");
    }
}

#[test]
fn an_expired_token_from_the_second_secret_is_expired_not_a_bad_signature() {
    let v = Verifier::new(&loaded(&[S1, S2], |_| {}));
    let tok = token(S2, jsonwebtoken::Algorithm::HS256, json!({"exp": t() - 3600}));
    assert_eq!(check(&v, &tok), Err(AuthError::Expired));
    let tok = token(S2, jsonwebtoken::Algorithm::HS256, json!({"nbf": t() + 3600}));
    assert_eq!(check(&v, &tok), Err(AuthError::NotYetValid));
}

#[test]
fn secrets_read_from_files_verify_like_inline_ones() {
    // Loaded.secrets is what counts (inline then files), not config.auth.secrets.
    let mut l = loaded(&[S1], |_| {});
    l.secrets.push(Secret::new(S2));
    let v = Verifier::new(&l);
    let tok = token(S2, jsonwebtoken::Algorithm::HS256, json!({}));
    assert_eq!(check(&v, &tok).map(|v| v.secret_index), Ok(1));
}

// ---------------------------------------------------------------------------------------------
// Organisation

#[test]
fn the_organisation_claim_is_checked_when_configured() {
    let v = verifier(|a| a.organisation_id = "1234".into());
    type Case = (&'static str, Value, Result<Option<&'static str>, AuthError>);
    let cases: &[Case] = &[
        ("matching string", json!({"organisationId": "1234"}), Ok(Some("1234"))),
        ("matching number", json!({"organisationId": 1234}), Ok(Some("1234"))),
        ("other organisation", json!({"organisationId": "999"}), Err(AuthError::Organisation)),
        ("other number", json!({"organisationId": 12345}), Err(AuthError::Organisation)),
        ("missing claim", json!({}), Err(AuthError::Organisation)),
        ("empty claim", json!({"organisationId": ""}), Err(AuthError::Organisation)),
        ("null claim", json!({"organisationId": null}), Err(AuthError::Organisation)),
        ("claim of another case", json!({"organisationid": "1234"}), Err(AuthError::Organisation)),
        ("claim as a list", json!({"organisationId": ["1234"]}), Err(AuthError::Organisation)),
    ];
    for (name, claims, want) in cases {
        let got = check(&v, &hs256(claims.clone()));
        let got = got.as_ref().map(|v| v.organisation_id.as_deref()).map_err(|e| *e);
        assert_eq!(got, *want, "{name}");
    }
}

#[test]
fn a_custom_organisation_claim_name_is_used() {
    let v = verifier(|a| {
        a.organisation_id = "7".into();
        a.organisation_claim = "org".into();
    });
    assert_eq!(check(&v, &hs256(json!({"org": 7}))).unwrap().organisation_id.as_deref(), Some("7"));
    assert_eq!(check(&v, &hs256(json!({"organisationId": "7"}))), Err(AuthError::Organisation));
    let tok = sign(S1.as_bytes(), Algorithm::HS256, Some("7"), "org", None);
    assert!(check(&v, &tok).is_ok());
}

#[test]
fn without_a_configured_organisation_the_claim_is_reported_but_not_required() {
    let v = default_verifier();
    assert_eq!(check(&v, &hs256(json!({"organisationId": "55"}))).unwrap().organisation_id.as_deref(), Some("55"));
    assert_eq!(check(&v, &hs256(json!({"organisationId": 56}))).unwrap().organisation_id.as_deref(), Some("56"));
    assert_eq!(check(&v, &hs256(json!({}))).unwrap().organisation_id, None);
    assert_eq!(check(&v, &hs256(json!({"organisationId": ""}))).unwrap().organisation_id, None);
}

// ---------------------------------------------------------------------------------------------
// Cache

fn cache_entry(v: &Verifier, token: &str, exp: Option<u64>, nbf: Option<u64>) {
    v.cache.lock().unwrap().insert(
        token.to_owned(),
        Cached { verified: Verified { organisation_id: Some("c".into()), secret_index: 1 }, exp, nbf },
    );
}

#[test]
fn a_cached_token_is_answered_from_the_cache() {
    let v = verifier(|a| a.leeway = Duration::from_secs(60));
    cache_entry(&v, "cached.token.here", None, None);
    assert_eq!(check(&v, "cached.token.here"), Ok(Verified { organisation_id: Some("c".into()), secret_index: 1 }));
}

#[test]
fn the_cache_still_honours_exp_and_nbf() {
    let v = verifier(|a| a.leeway = Duration::from_secs(60));
    let now = now();
    // (name, cached exp, cached nbf, expected)
    type Case = (&'static str, Option<u64>, Option<u64>, Result<(), AuthError>);
    let cases: &[Case] = &[
        ("exp long past", Some(now - 3600), None, Err(AuthError::Expired)),
        ("exp past within leeway", Some(now - 30), None, Ok(())),
        ("exp in the future", Some(now + 30), None, Ok(())),
        ("exp at the end of time", Some(u64::MAX), None, Ok(())),
        ("nbf far ahead", None, Some(now + 3600), Err(AuthError::NotYetValid)),
        ("nbf ahead within leeway", None, Some(now + 30), Ok(())),
        ("nbf past", None, Some(now - 30), Ok(())),
    ];
    for (i, (name, exp, nbf, want)) in cases.iter().enumerate() {
        let tok = format!("crafted.{i}.token");
        cache_entry(&v, &tok, *exp, *nbf);
        assert_eq!(check(&v, &tok).map(|_| ()), *want, "{name}");
    }
}

#[test]
fn a_token_verified_before_its_exp_is_refused_from_the_cache_once_expired() {
    let v = verifier(|a| a.leeway = Duration::ZERO);
    let tok = hs256(json!({"exp": t() + 1}));
    assert!(check(&v, &tok).is_ok());
    assert!(check(&v, &tok).is_ok(), "second, cached, verification");
    assert!(v.cache.lock().unwrap().contains_key(&tok));
    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(check(&v, &tok), Err(AuthError::Expired));
}

#[test]
fn the_cache_keeps_fractional_exp_and_nbf() {
    let v = default_verifier();
    let n = now();
    let tok = hs256(json!({"exp": n as f64 + 3600.4, "nbf": n as f64 - 10.6}));
    assert!(check(&v, &tok).is_ok());
    let entry = v.cache.lock().unwrap().get(&tok).cloned().unwrap();
    assert_eq!(entry.exp, Some(n + 3600));
    assert_eq!(entry.nbf, Some(n - 11));
}

#[test]
fn refusals_are_not_cached() {
    let v = verifier(|a| a.organisation_id = "1".into());
    let wrong_org = hs256(json!({"organisationId": "2"}));
    let bad_sig = token(OTHER, jsonwebtoken::Algorithm::HS256, json!({}));
    let expired = hs256(json!({"exp": t() - 3600}));
    for tok in [&wrong_org, &bad_sig, &expired] {
        assert!(check(&v, tok).is_err());
        assert!(check(&v, tok).is_err());
    }
    assert!(v.cache.lock().unwrap().is_empty());
}

#[test]
fn the_cache_is_bounded() {
    let v = default_verifier();
    for i in 0..CACHE_CAPACITY + 5 {
        assert!(check(&v, &hs256(json!({ "n": i }))).is_ok());
    }
    assert!(v.cache.lock().unwrap().len() <= CACHE_CAPACITY);
}

// ---------------------------------------------------------------------------------------------
// Disabled, labels

#[test]
fn disabled_auth_accepts_anything_without_a_header() {
    let v = Verifier::new(&loaded(&[], |a| {
        a.disabled = true;
        a.organisation_id = "77".into();
    }));
    assert!(v.is_disabled());
    let want = Ok(Verified { organisation_id: Some("77".into()), secret_index: 0 });
    assert_eq!(v.verify(None), want);
    assert_eq!(check(&v, "garbage"), want);
    let v = Verifier::new(&loaded(&[], |a| a.disabled = true));
    assert_eq!(v.verify(None), Ok(Verified { organisation_id: None, secret_index: 0 }));
    assert!(!default_verifier().is_disabled());
}

#[test]
fn refusal_reasons_are_bounded_labels_and_never_the_token() {
    let cases = [
        (AuthError::Missing, "missing"),
        (AuthError::Malformed, "malformed"),
        (AuthError::BadSignature, "bad_signature"),
        (AuthError::Expired, "expired"),
        (AuthError::NotYetValid, "not_yet_valid"),
        (AuthError::Algorithm, "algorithm"),
        (AuthError::Organisation, "organisation"),
    ];
    for (e, label) in cases {
        assert_eq!(e.reason(), label);
        let text = e.to_string();
        assert!(!text.is_empty() && !text.contains("eyJ"), "{text}");
    }
}

#[test]
fn the_last_header_value_is_compared_as_sent() {
    let v = default_verifier();
    let tok = hs256(json!({}));
    assert!(check(&v, &tok).is_ok());
    assert!(check(&v, &tok).is_ok(), "the same value again");
    // Other spellings of the same token: read again, the same cache entry.
    assert!(check(&v, &format!("Bearer {tok}")).is_ok());
    assert!(check(&v, &format!("  {tok} ")).is_ok());
    assert_eq!(v.cache.lock().unwrap().len(), 1);
    // A value that only starts like the last one is not answered from it.
    let mut longer = tok.clone().into_bytes();
    longer.push(0xff);
    assert_eq!(v.verify(Some(&longer)), Err(AuthError::Malformed));
    assert!(check(&v, &format!("{tok}x")).is_err());
    assert_eq!(check(&v, "  "), Err(AuthError::Missing));
    assert_eq!(v.verify(None), Err(AuthError::Missing));
    assert!(check(&v, &tok).is_ok(), "and the token itself still passes");
}
