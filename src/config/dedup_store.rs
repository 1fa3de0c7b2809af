//! `delivery.dedup_store`: the Redis URL of the shared dedup window, checked at load without
//! connecting. The client is [`crate::dedup::store`].

/// Why `delivery.dedup_store` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreUrlError {
    #[error(
        "not a usable Redis URL (use redis://[:password@]host:port[/db], rediss:// for TLS, or redis+unix:///path; value not shown)"
    )]
    Invalid(#[source] redis::RedisError),
    #[error("scheme {0:?} is not supported (use redis://, rediss:// or redis+unix://)")]
    Scheme(String),
    #[error("dedup_store_ca_file is only used with a rediss:// URL")]
    CaWithoutTls,
    #[error("dedup_store_ca_file: {0}")]
    CaFile(#[from] crate::tls::CaFileError),
}

/// Whether `url` asks for TLS (`rediss://`).
pub fn is_tls(url: &str) -> bool {
    url.trim_start().starts_with("rediss://")
}

/// The CA certificates (PEM) that replace the public roots for a `rediss://` store, checked.
pub fn read_ca(url: &str, ca_file: Option<&std::path::Path>) -> Result<Option<String>, StoreUrlError> {
    let Some(path) = ca_file else { return Ok(None) };
    let pem = crate::tls::read_ca_file(path)?;
    if !is_tls(url) {
        return Err(StoreUrlError::CaWithoutTls);
    }
    Ok(Some(pem))
}

/// Checks `url` without connecting.
pub fn check_url(url: &str) -> Result<(), StoreUrlError> {
    let scheme = url.split_once("://").map_or("", |(s, _)| s);
    if !matches!(scheme, "redis" | "rediss" | "redis+unix" | "unix") {
        return Err(StoreUrlError::Scheme(scheme.to_owned()));
    }
    redis::Client::open(url).map(|_| ()).map_err(StoreUrlError::Invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_without_connecting() {
        assert!(check_url("redis://127.0.0.1:6379").is_ok());
        assert!(check_url("redis://:secret@redis.example:6380/2").is_ok());
        assert!(check_url("redis+unix:///run/redis.sock").is_ok());
        assert!(matches!(check_url("http://127.0.0.1:6379"), Err(StoreUrlError::Scheme(s)) if s == "http"));
        assert!(check_url("rediss://:secret@redis.example:6380/2").is_ok(), "TLS");
        assert!(matches!(check_url("redis+tls://h:6379"), Err(StoreUrlError::Scheme(_))));
        let e = check_url("redis://:hunter2@[bad").unwrap_err().to_string();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn a_ca_file_is_read_only_for_a_tls_url_and_must_hold_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_ca("rediss://h:6379", None).unwrap().is_none(), "public roots");
        let missing = dir.path().join("missing.pem");
        let e = read_ca("rediss://h:6379", Some(&missing)).unwrap_err().to_string();
        assert!(e.contains("missing.pem"), "{e}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "hello\n").unwrap();
        let e = read_ca("rediss://h:6379", Some(&empty)).unwrap_err().to_string();
        assert!(e.contains("no PEM certificate"), "{e}");
        let mut params = rcgen::CertificateParams::new(vec!["redis.example".to_owned()]).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap();
        let good = dir.path().join("ca.pem");
        std::fs::write(&good, ca.pem()).unwrap();
        assert!(read_ca("rediss://h:6379", Some(&good)).unwrap().is_some());
        assert!(matches!(read_ca("redis://h:6379", Some(&good)), Err(StoreUrlError::CaWithoutTls)));
    }
}
