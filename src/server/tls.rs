//! HTTPS on the webhook listener (`server.tls_cert_file`, `server.tls_key_file`): rustls with
//! the binary's one crypto provider ([`crate::tls::provider`]), HTTP/1.1 only.
//!
//! Invariants:
//! - The handshake runs in the connection's own task, never in the accept loop, within the
//!   deadline of the first request head (the header timeout, counted from the accept). Until
//!   its first head is complete the connection is "without a request" for the shedding in
//!   `conns`: half-open handshakes are shed first, like silent sockets, and never starve the
//!   connections that carry a webhook.
//! - A reload swaps the [`Certificate`] in force whole, its rustls configuration with it: new
//!   connections get the new certificate (no session resumed from the old one), open ones
//!   keep the session they negotiated.
//! - A file that cannot be used is refused with its path and the reason, never its contents
//!   (the key file holds a secret, and PEM parse errors quote lines).

use super::head::{self, FirstHead, HANDOFF};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use sha2::{Digest, Sha256};
use std::fmt;
use std::future::poll_fn;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::Poll;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Why a certificate or key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{key}: cannot read {}: {source}", path.display())]
    Read { key: &'static str, path: PathBuf, source: std::io::Error },
    #[error("server.tls_cert_file: {} is not valid PEM", path.display())]
    CertPem { path: PathBuf },
    #[error("server.tls_cert_file: {} holds no certificate (PEM \"BEGIN CERTIFICATE\")", path.display())]
    NoCertificate { path: PathBuf },
    #[error("server.tls_cert_file: {} does not hold a valid X.509 certificate first", path.display())]
    BadCertificate { path: PathBuf },
    #[error("server.tls_key_file: {} is not valid PEM", path.display())]
    KeyPem { path: PathBuf },
    #[error(
        "server.tls_key_file: {} holds no unencrypted private key (PEM \"BEGIN PRIVATE KEY\", \"BEGIN RSA PRIVATE KEY\" or \"BEGIN EC PRIVATE KEY\")",
        path.display()
    )]
    NoKey { path: PathBuf },
    #[error("server.tls_key_file: {} holds a key TLS cannot use (supported: RSA of 2048 bits or more, ECDSA P-256/P-384, Ed25519)", path.display())]
    UnusableKey { path: PathBuf },
    #[error("server.tls_key_file: the key in {} does not match the certificate in {}", key.display(), cert.display())]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("server.tls_cert_file: cannot set up TLS: {0}")]
    Setup(rustls::Error),
}

/// Reads a certificate chain (the server's certificate first) and its private key (PKCS#8,
/// PKCS#1 RSA or SEC1 EC) from PEM files, and checks that they belong together. Both may be
/// one file holding both.
pub fn load(cert_file: &Path, key_file: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let cert_pem = std::fs::read(cert_file).map_err(|source| TlsError::Read {
        key: "server.tls_cert_file",
        path: cert_file.into(),
        source,
    })?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| TlsError::CertPem { path: cert_file.into() })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate { path: cert_file.into() });
    }
    let key_pem = std::fs::read(key_file).map_err(|source| TlsError::Read {
        key: "server.tls_key_file",
        path: key_file.into(),
        source,
    })?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoKey { path: key_file.into() },
        _ => TlsError::KeyPem { path: key_file.into() },
    })?;
    match CertifiedKey::from_der(chain, key, &crate::tls::provider()) {
        Ok(k) => Ok(Arc::new(k)),
        Err(rustls::Error::InconsistentKeys(_)) => {
            Err(TlsError::Mismatch { cert: cert_file.into(), key: key_file.into() })
        }
        Err(rustls::Error::InvalidCertificate(_)) => Err(TlsError::BadCertificate { path: cert_file.into() }),
        Err(_) => Err(TlsError::UnusableKey { path: key_file.into() }),
    }
}

/// The SHA-256 fingerprint of the server's certificate, as `openssl x509 -fingerprint
/// -sha256` prints it (`AB:CD:…`): what the log shows to tell certificates apart.
pub fn fingerprint(key: &CertifiedKey) -> String {
    let der = key.cert.first().map_or(&[][..], |c| c.as_ref());
    let hex = hex::encode_upper(Sha256::digest(der));
    let pairs: Vec<&str> = (0..hex.len()).step_by(2).map(|i| &hex[i..i + 2]).collect();
    pairs.join(":")
}

/// A certificate and the rustls configuration that presents it.
pub struct Certificate {
    acceptor: TlsAcceptor,
    key: Arc<CertifiedKey>,
}

impl fmt::Debug for Certificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Certificate(sha256 {})", self.fingerprint())
    }
}

impl Certificate {
    pub fn new(key: Arc<CertifiedKey>) -> Result<Certificate, TlsError> {
        let mut config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Setup)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(SingleCertAndKey::from(key.clone())));
        // The listener serves HTTP/1.1 only: a client that offers only h2 is refused in the
        // handshake rather than sent HTTP/1.1 bytes it would not parse.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Certificate { acceptor: TlsAcceptor::from(Arc::new(config)), key })
    }

    /// [`load`], then [`Certificate::new`].
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Certificate, TlsError> {
        Certificate::new(load(cert_file, key_file)?)
    }

    pub fn fingerprint(&self) -> String {
        fingerprint(&self.key)
    }
}

/// The listener's TLS: the certificate in force, swapped whole on reload. Each certificate
/// has a rustls configuration of its own, and with it its own session cache: a client cannot
/// resume a session negotiated under the old certificate, so every connection opened after
/// the swap is shown the new one, while those already open keep theirs.
pub struct Tls(RwLock<Arc<Certificate>>);

impl Tls {
    pub fn new(certificate: Certificate) -> Tls {
        Tls(RwLock::new(Arc::new(certificate)))
    }

    /// What a new connection's handshake uses.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.current().acceptor.clone()
    }

    /// The fingerprint of the certificate presented now.
    pub fn fingerprint(&self) -> String {
        self.current().fingerprint()
    }

    /// From the next connection on, presents `certificate`. False, and nothing changes, when
    /// its chain is the one in force already (so that its sessions can still be resumed).
    pub fn replace(&self, certificate: Certificate) -> bool {
        let mut current = self.0.write().expect("certificate lock");
        if current.key.cert == certificate.key.cert {
            return false;
        }
        *current = Arc::new(certificate);
        true
    }

    fn current(&self) -> Arc<Certificate> {
        self.0.read().expect("certificate lock").clone()
    }
}

/// The first byte of every TLS connection: a handshake record.
const HANDSHAKE_RECORD: u8 = 0x16;

/// The answer to a plain-HTTP request on the TLS listener (what nginx does too), so that a
/// sender configured with `http://` sees why, instead of a reset connection.
const PLAIN_HTTP: &[u8] = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-type: text/plain\r\ncontent-length: 44\r\n\r\nthis listener speaks HTTPS only: use https\r\n";

/// Why a connection on the TLS listener got no TLS session (it is then closed).
#[derive(Debug)]
pub enum NoSession {
    /// Not TLS (plain HTTP was answered 400), closed, or too slow: nothing to report.
    Quiet,
    /// The handshake itself failed (untrusted or unparsable hello, no common version or cipher).
    Failed(std::io::Error),
}

/// The TLS handshake of a new connection, finished by `deadline`.
pub async fn handshake(
    acceptor: TlsAcceptor,
    stream: TcpStream,
    deadline: Instant,
) -> Result<TlsStream<TcpStream>, NoSession> {
    let mut first = [0u8; 1];
    match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] == HANDSHAKE_RECORD => {}
        Ok(Ok(1)) => {
            if first[0].is_ascii_uppercase() {
                tracing::debug!("plain HTTP on the TLS listener; answered 400");
                let _ = stream.try_write(PLAIN_HTTP);
            }
            return Err(NoSession::Quiet);
        }
        _ => return Err(NoSession::Quiet),
    }
    match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(e)) => Err(NoSession::Failed(e)),
        Err(_) => Err(NoSession::Quiet),
    }
}

/// [`head::read_first_head`] over TLS: the decrypted bytes of the connection until its first
/// request head is complete, as large as hyper's first buffer, or `deadline` passes.
pub async fn read_first_head<S: AsyncRead + Unpin>(stream: &mut S, deadline: Instant) -> FirstHead {
    let mut buf = Vec::new();
    loop {
        // The chunk lives within one poll, never in the connection's task between reads.
        let read = poll_fn(|cx| {
            let mut chunk = [0u8; 4096];
            let mut chunk = ReadBuf::new(&mut chunk);
            match Pin::new(&mut *stream).poll_read(cx, &mut chunk) {
                Poll::Ready(Ok(())) => {
                    buf.extend_from_slice(chunk.filled());
                    Poll::Ready(Ok(chunk.filled().len()))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        });
        match tokio::time::timeout_at(deadline, read).await {
            Err(_) => return FirstHead::TimedOut { sent_bytes: !buf.is_empty() },
            Ok(Ok(0)) | Ok(Err(_)) => return FirstHead::Closed,
            Ok(Ok(n)) => {
                if head::ends_head(&buf, n) {
                    return FirstHead::Complete(buf);
                }
                if buf.len() >= HANDOFF {
                    return FirstHead::Partial(buf);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
