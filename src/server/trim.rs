//! Gives the memory of closed connections back to the system once a crowd of them is gone.
//!
//! glibc's allocator keeps freed memory in its arenas (one per worker thread, at most 8 per
//! core) for reuse, and returns it only from the top of each heap: after a flood of
//! connections, the resident size stayed where the flood left it. `malloc_trim(0)` walks every
//! arena and hands whole free pages back. It costs a few milliseconds on a large heap, so it
//! runs on its own thread, once a second at most, and only after many connections have closed.
//! On other C libraries it does nothing (musl's allocator returns memory by itself).

use super::conns::Connections;
use std::time::Duration;

/// Closed connections worth a trim: at the ~1 KiB a connection without a request costs here
/// that is little, but each connection that went through hyper left ~20 KiB of buffers.
const RELEASED_FOR_TRIM: usize = 256;
const EVERY: Duration = Duration::from_secs(1);

/// Starts the thread that trims after connections close (once per process).
pub fn spawn(conns: &'static Connections) {
    let spawned = std::thread::Builder::new().name("malloc-trim".into()).spawn(move || loop {
        std::thread::sleep(EVERY);
        if conns.released() >= RELEASED_FOR_TRIM {
            conns.forget_peak();
            conns.compact();
            give_back_free_memory();
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the memory trimming thread; memory freed after a flood stays with the process");
    }
}

/// Returns the allocator's free pages to the system.
pub fn give_back_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes the allocator's own locks; it only releases free pages.
        let released = unsafe { libc::malloc_trim(0) };
        tracing::debug!(released = released != 0, "malloc_trim after connections closed");
    }
}
