//! The JWT check on arbitrary header values: never panics, always an `AuthError` (nothing
//! random verifies), and a second look (from the cache) agrees with the first.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use webio_router::auth::Verifier;

fn verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("webio-router.toml");
        std::fs::write(
            &path,
            "[auth]\nsecrets = [\"fuzz-secret-0123456789-0123456789-0123\"]\nalgorithms = [\"HS256\", \"HS512\"]\n",
        )
        .unwrap();
        Verifier::new(&webio_router::config::Config::load(Some(&path), None).unwrap())
    })
}

fuzz_target!(|data: &[u8]| {
    let v = verifier();
    let first = v.verify(Some(data));
    assert!(first.is_err(), "an unsigned input verified");
    assert_eq!(v.verify(Some(data)), first);
});
