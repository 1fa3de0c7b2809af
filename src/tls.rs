//! The one rustls crypto provider of the binary: *ring*.
//!
//! rustls picks a process-wide default provider when a configuration is built without one, and
//! refuses to guess when two are compiled in. The build keeps aws-lc-rs out (lapin without its
//! `rustls` feature, hyper-rustls with `ring`), so ring is the only provider in `Cargo.lock`;
//! [`provider`] installs it as the process default once, before anything builds a TLS
//! configuration, so every TLS client (HTTP sink, `amqps://`) and the webhook listener's TLS
//! (`crate::server::tls`) use the same one. Build configurations with
//! `builder_with_provider(provider())` rather than relying on the default.

use rustls::crypto::CryptoProvider;
use std::sync::{Arc, OnceLock};

/// The process-wide crypto provider, installed as rustls's default on first use.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            // Installing fails only if a default is already there (another thread, or a
            // library that installed its own first): then that one is the process's.
            let _ = rustls::crypto::ring::default_provider().install_default();
            CryptoProvider::get_default().cloned().unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_provider_is_ring_and_is_the_process_default() {
        let p = provider();
        let ring = rustls::crypto::ring::default_provider();
        let suites = |p: &CryptoProvider| p.cipher_suites.iter().map(|s| s.suite()).collect::<Vec<_>>();
        assert_eq!(suites(&p), suites(&ring));
        let default = CryptoProvider::get_default().expect("installed");
        assert!(Arc::ptr_eq(&p, default) || suites(default) == suites(&ring));
    }
}
