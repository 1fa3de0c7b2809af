//! `delivery.dedup_store`: the Redis URL of the shared dedup window, checked at load without
//! connecting. The client is [`crate::dedup::store`].

/// Why `delivery.dedup_store` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreUrlError {
    #[error("not a usable Redis URL (use redis://[:password@]host:port[/db] or redis+unix:///path; value not shown)")]
    Invalid(#[source] redis::RedisError),
    #[error("scheme {0:?} is not supported (use redis:// or redis+unix://)")]
    Scheme(String),
}

/// Checks `url` without connecting.
pub fn check_url(url: &str) -> Result<(), StoreUrlError> {
    let scheme = url.split_once("://").map_or("", |(s, _)| s);
    if !matches!(scheme, "redis" | "redis+unix" | "unix") {
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
        assert!(matches!(check_url("rediss://h:6379"), Err(StoreUrlError::Scheme(_))));
        let e = check_url("redis://:hunter2@[bad").unwrap_err().to_string();
        assert!(!e.contains("hunter2"), "{e}");
    }
}
