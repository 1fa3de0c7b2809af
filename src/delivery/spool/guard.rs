//! redb panics on some damaged files (zeroed pages: "entered unreachable code") instead of
//! returning an error. Every call into redb that reads what it did not just write goes
//! through [`catch`], so that damage becomes an error with a clear message — never a crash,
//! and never a crash loop under a supervisor.
//!
//! While a call is guarded, the panic's own report is kept off stderr (the caller turns it
//! into one message); panics anywhere else are reported as usual.

use std::cell::{Cell, RefCell};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Once;

thread_local! {
    static GUARDED: Cell<bool> = const { Cell::new(false) };
    static LOCATION: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// A panic inside redb, caught.
#[derive(Debug, Clone, thiserror::Error)]
#[error("redb stopped on an inconsistency in the file: {message}{}", .location.as_ref().map(|l| format!(" (at {l})")).unwrap_or_default())]
pub struct Panicked {
    pub message: String,
    pub location: Option<String>,
}

fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if GUARDED.with(Cell::get) {
                let at = info.location().map(|l| format!("{}:{}", short(l.file()), l.line()));
                LOCATION.with(|l| *l.borrow_mut() = at);
            } else {
                previous(info);
            }
        }));
    });
}

/// A source path from its crate's directory on ("redb-4.6.0/src/…"), not the build machine's.
fn short(file: &str) -> &str {
    file.rfind("/redb-").map_or(file, |i| &file[i + 1..])
}

/// Runs `f`, turning a panic into [`Panicked`]. What `f` touched must be dropped, not reused,
/// after a panic (redb's state is unknown then): callers treat it as a damaged file.
pub fn catch<T>(f: impl FnOnce() -> T) -> Result<T, Panicked> {
    install();
    let outer = GUARDED.with(|g| g.replace(true));
    let result = catch_unwind(AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(outer));
    result.map_err(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".to_owned());
        Panicked { message, location: LOCATION.with(|l| l.borrow_mut().take()) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_error_with_its_message_and_place() {
        let err = catch(|| -> u8 { unreachable!() }).unwrap_err();
        assert!(err.message.contains("unreachable"), "{err}");
        assert!(err.location.as_deref().is_some_and(|l| l.contains("guard.rs")), "{err:?}");
        assert_eq!(catch(|| 7).unwrap(), 7);
    }
}
