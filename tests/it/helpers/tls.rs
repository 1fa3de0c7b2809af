//! TLS for the broker tests: a private CA made per test (rcgen), a server certificate it signs
//! for `127.0.0.1` and `localhost`, and a TLS endpoint that records what it decrypts.

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// A CA of the test's own. `ca_file` is its certificate (PEM) in a temp dir; `server` a
/// rustls server configuration whose certificate it signed.
pub struct TestCa {
    _dir: tempfile::TempDir,
    pub ca_file: PathBuf,
    pub server: Arc<rustls::ServerConfig>,
}

impl TestCa {
    pub fn new() -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "webio-router test CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();

        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, "localhost");
        let cert = params.signed_by(&key, &ca).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let chain = vec![CertificateDer::from(cert.der().to_vec())];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let server = rustls::ServerConfig::builder_with_provider(webio_router::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        TestCa { _dir: dir, ca_file, server: Arc::new(server) }
    }
}

/// A TLS server on 127.0.0.1 that answers nothing: it records the first Kafka request frame
/// (4-byte length + body) it decrypts on each connection, and counts failed handshakes.
pub struct TlsEndpoint {
    pub addr: SocketAddr,
    pub requests: Arc<Mutex<Vec<Vec<u8>>>>,
    pub failed_handshakes: Arc<Mutex<usize>>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsEndpoint {
    pub async fn start(server: Arc<rustls::ServerConfig>) -> TlsEndpoint {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (requests, failed_handshakes) = (Arc::<Mutex<Vec<Vec<u8>>>>::default(), Arc::<Mutex<usize>>::default());
        let acceptor = TlsAcceptor::from(server);
        let (reqs, failed) = (requests.clone(), failed_handshakes.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, reqs, failed) = (acceptor.clone(), reqs.clone(), failed.clone());
                tokio::spawn(async move {
                    let mut tls = match acceptor.accept(tcp).await {
                        Ok(s) => s,
                        Err(_) => {
                            *failed.lock().unwrap() += 1;
                            return;
                        }
                    };
                    let mut len = [0u8; 4];
                    if tls.read_exact(&mut len).await.is_err() {
                        return;
                    }
                    let mut body = vec![0u8; u32::from_be_bytes(len).min(1 << 20) as usize];
                    if tls.read_exact(&mut body).await.is_ok() {
                        reqs.lock().unwrap().push(body);
                    }
                });
            }
        });
        TlsEndpoint { addr, requests, failed_handshakes, task }
    }
}

impl Drop for TlsEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The header of a Kafka request (v1+): API key, API version, correlation id, client id.
#[derive(Debug)]
pub struct KafkaRequestHeader {
    pub api_key: i16,
    pub api_version: i16,
    pub client_id: String,
}

pub fn kafka_request_header(body: &[u8]) -> Option<KafkaRequestHeader> {
    let api_key = i16::from_be_bytes(body.get(0..2)?.try_into().ok()?);
    let api_version = i16::from_be_bytes(body.get(2..4)?.try_into().ok()?);
    let len = i16::from_be_bytes(body.get(8..10)?.try_into().ok()?);
    let client_id = String::from_utf8(body.get(10..10 + usize::try_from(len).ok()?)?.to_vec()).ok()?;
    Some(KafkaRequestHeader { api_key, api_version, client_id })
}
