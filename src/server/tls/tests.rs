use super::*;
use rcgen::{CertificateParams, KeyPair};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Test-only certificates made with `openssl` (PKCS#1 RSA and SEC1 EC keys, which rcgen
/// cannot write).
fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls").join(name)
}

struct Files {
    dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
    key_pem: String,
}

/// A self-signed certificate for `localhost` and its PKCS#8 key, in files.
fn self_signed() -> Files {
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_owned()]).unwrap().self_signed(&key).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    Files { cert: cert_file, key: key_file, key_pem: key.serialize_pem(), dir }
}

/// The base64 lines of a PEM text: what must never appear in a message.
fn body_lines(pem: &str) -> Vec<&str> {
    pem.lines().filter(|l| !l.starts_with("-----") && l.len() > 8).collect()
}

fn assert_no_key_material(message: &str, key_pem: &str) {
    for line in body_lines(key_pem) {
        assert!(!message.contains(line), "the key leaked into {message:?}");
    }
}

#[test]
fn a_certificate_and_its_pkcs8_key_load() {
    let f = self_signed();
    load(&f.cert, &f.key).unwrap();
}

#[test]
fn rsa_pkcs1_and_ec_sec1_keys_load_and_the_fingerprint_is_the_one_openssl_prints() {
    let rsa = load(&fixture("rsa.crt"), &fixture("rsa-pkcs1.key")).expect("RSA PKCS#1");
    load(&fixture("ec.crt"), &fixture("ec-sec1.key")).expect("EC SEC1");
    // openssl x509 -in tests/fixtures/tls/rsa.crt -noout -fingerprint -sha256
    assert_eq!(
        fingerprint(&rsa),
        "16:45:70:2B:0E:36:4E:B1:30:4C:38:D7:1C:BD:7B:EB:9B:06:A1:13:76:78:A3:1E:FB:85:F1:16:38:29:B0:20"
    );
}

#[test]
fn one_file_holding_the_certificate_and_the_key_serves_as_both() {
    let f = self_signed();
    let both = f.dir.path().join("both.pem");
    std::fs::write(&both, format!("{}{}", std::fs::read_to_string(&f.cert).unwrap(), f.key_pem)).unwrap();
    load(&both, &both).unwrap();
}

#[test]
fn a_key_that_belongs_to_another_certificate_is_refused() {
    let (a, b) = (self_signed(), self_signed());
    let e = load(&a.cert, &b.key).unwrap_err();
    assert!(matches!(e, TlsError::Mismatch { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("does not match the certificate"), "{msg}");
    assert_no_key_material(&msg, &b.key_pem);
    let e = load(&fixture("rsa.crt"), &fixture("ec-sec1.key")).unwrap_err();
    assert!(matches!(e, TlsError::Mismatch { .. }), "another key type: {e:?}");
}

#[test]
fn files_without_a_certificate_or_a_key_or_unreadable_are_refused_naming_the_file_only() {
    let f = self_signed();
    let e = load(&f.key, &f.key).unwrap_err();
    assert!(matches!(e, TlsError::NoCertificate { .. }), "{e:?}");
    assert!(e.to_string().starts_with("server.tls_cert_file: "), "{e}");
    assert_no_key_material(&e.to_string(), &f.key_pem);

    let e = load(&f.cert, &f.cert).unwrap_err();
    assert!(matches!(e, TlsError::NoKey { .. }), "{e:?}");
    assert!(e.to_string().starts_with("server.tls_key_file: "), "{e}");

    let missing = f.dir.path().join("missing.pem");
    let e = load(&f.cert, &missing).unwrap_err();
    assert!(e.to_string().contains("cannot read") && e.to_string().contains("missing.pem"), "{e}");
    let e = load(&missing, &f.key).unwrap_err();
    assert!(e.to_string().starts_with("server.tls_cert_file: cannot read"), "{e}");
}

#[test]
fn a_damaged_key_file_is_refused_without_quoting_it() {
    let f = self_signed();
    // A key cut off before its end line: PEM parsers quote the lines they stop at.
    let cut: String = f.key_pem.lines().take(3).map(|l| format!("{l}\n")).collect();
    std::fs::write(&f.key, &cut).unwrap();
    let e = load(&f.cert, &f.key).unwrap_err();
    assert!(matches!(e, TlsError::KeyPem { .. }), "{e:?}");
    assert_no_key_material(&e.to_string(), &f.key_pem);

    // Valid PEM, but not a key rustls can parse.
    std::fs::write(&f.key, "-----BEGIN PRIVATE KEY-----\naGVsbG8gd29ybGQ=\n-----END PRIVATE KEY-----\n").unwrap();
    let e = load(&f.cert, &f.key).unwrap_err();
    assert!(matches!(e, TlsError::UnusableKey { .. }), "{e:?}");

    let e = load(&f.key, &f.key).unwrap_err();
    assert!(matches!(e, TlsError::NoCertificate { .. }), "{e:?}");
}

#[test]
fn a_garbled_certificate_is_refused() {
    let f = self_signed();
    std::fs::write(&f.cert, "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n").unwrap();
    let e = load(&f.cert, &f.key).unwrap_err();
    assert!(matches!(e, TlsError::BadCertificate { .. }), "{e:?}");
}

#[test]
fn the_answer_to_plain_http_is_a_well_formed_400() {
    let text = std::str::from_utf8(PLAIN_HTTP).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 400 "));
    assert!(head.contains(&format!("content-length: {}", body.len())), "{head} / {}", body.len());
}

#[test]
fn a_replaced_certificate_is_the_one_presented() {
    let (a, b) = (self_signed(), self_signed());
    let tls = Tls::new(Certificate::load(&a.cert, &a.key).unwrap());
    let before = tls.fingerprint();
    let next = Certificate::load(&b.cert, &b.key).unwrap();
    let expected = next.fingerprint();
    assert!(tls.replace(next));
    assert_ne!(before, expected);
    assert_eq!(tls.fingerprint(), expected);
    assert!(!tls.replace(Certificate::load(&b.cert, &b.key).unwrap()), "the same chain again changes nothing");
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

#[test]
fn the_first_head_is_read_whole_from_a_stream_that_delivers_it_in_pieces() {
    rt().block_on(async {
        let (mut client, mut server) = tokio::io::duplex(64);
        let deadline = Instant::now() + Duration::from_secs(10);
        let reader = tokio::spawn(async move { read_first_head(&mut server, deadline).await });
        for piece in [&b"POST /x HTTP/1.1\r\n"[..], b"host: a\r\n", b"\r\n{}"] {
            client.write_all(piece).await.unwrap();
            tokio::task::yield_now().await;
        }
        assert_eq!(reader.await.unwrap(), FirstHead::Complete(b"POST /x HTTP/1.1\r\nhost: a\r\n\r\n{}".to_vec()));
    });
}

#[test]
fn a_silent_stream_times_out_and_a_closed_one_is_closed() {
    rt().block_on(async {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"P").await.unwrap();
        let got = read_first_head(&mut server, Instant::now() + Duration::from_millis(100)).await;
        assert_eq!(got, FirstHead::TimedOut { sent_bytes: true });
        drop(client);
        let got = read_first_head(&mut server, Instant::now() + Duration::from_secs(10)).await;
        assert_eq!(got, FirstHead::Closed);
    });
}
