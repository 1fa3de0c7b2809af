//! The process's descriptor limit and the bound on open connections derived from it.
//!
//! Every accepted connection is a descriptor. A flood that reaches the descriptor limit leaves
//! none for what the daemon must still open (the spool, sink files, broker sockets, the admin
//! listener's probes), so the bound on connections stays below the limit, with a reserve.
//! The soft limit is raised to the hard one at start: the soft default (often 1024) is a
//! compatibility setting for programs that use `select()`, which this one does not.

/// The most connections open at once (both listeners together), whatever the descriptor
/// limit: each costs memory, and a gateway that receives webhooks from one provider does not
/// need more.
pub const MAX_CONNECTIONS: usize = 4096;
/// Descriptors kept for everything but connections, at least (small limits) and at most.
const RESERVE_MIN: u64 = 128;
const RESERVE_MAX: u64 = 1024;
/// Fewer connections than this is not a server; a limit this low is logged as a problem.
const MIN_CONNECTIONS: usize = 32;

/// The descriptor limit before and after [`raise_nofile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nofile {
    pub was: u64,
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (or to what the kernel allows when the hard
/// limit is unlimited). Never lowers it.
pub fn raise_nofile() -> std::io::Result<Nofile> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct it is given, nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let was = lim.rlim_cur;
    let mut target = lim.rlim_max;
    if target == libc::RLIM_INFINITY {
        // Linux refuses an unlimited descriptor count; its ceiling is fs.nr_open.
        target =
            std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(1 << 20);
    }
    if lim.rlim_cur != libc::RLIM_INFINITY && lim.rlim_cur < target {
        let raised = libc::rlimit { rlim_cur: target, rlim_max: lim.rlim_max };
        // SAFETY: setrlimit reads the struct it is given, nothing else.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        lim.rlim_cur = target;
    }
    Ok(Nofile { was, soft: lim.rlim_cur, hard: lim.rlim_max })
}

/// Descriptors kept for everything but connections: a quarter of the limit, at least 128
/// and at most 1024 (the spool and its temporary files, up to 64 open files per file sink,
/// HTTP sinks' pools, broker sockets, the runtime's own).
pub fn reserve(nofile: u64) -> u64 {
    (nofile / 4).clamp(RESERVE_MIN, RESERVE_MAX)
}

/// The bound on open connections for a soft descriptor limit of `nofile`.
pub fn connection_bound(nofile: u64) -> usize {
    let room = nofile.saturating_sub(reserve(nofile));
    usize::try_from(room).unwrap_or(usize::MAX).clamp(MIN_CONNECTIONS, MAX_CONNECTIONS)
}

/// Raises the limit, derives the bound and says both in the log.
pub fn connection_bound_at_start() -> usize {
    match raise_nofile() {
        Ok(n) => {
            let bound = connection_bound(n.soft);
            if bound == MAX_CONNECTIONS {
                tracing::info!(
                    soft = n.soft,
                    was = n.was,
                    hard = n.hard,
                    max_connections = bound,
                    "descriptor limit raised to the hard limit; open connections bounded"
                );
            } else {
                tracing::warn!(
                    soft = n.soft,
                    was = n.was,
                    hard = n.hard,
                    max_connections = bound,
                    wanted = MAX_CONNECTIONS,
                    "the descriptor limit bounds open connections below the default; raise LimitNOFILE (systemd) or ulimit -n"
                );
            }
            bound
        }
        Err(e) => {
            let bound = connection_bound(1024);
            tracing::warn!(error = %e, max_connections = bound, "cannot read or raise the descriptor limit; assuming 1024");
            bound
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_leaves_a_reserve_below_the_descriptor_limit_and_never_exceeds_the_default() {
        for (nofile, bound) in [
            (64, MIN_CONNECTIONS),
            (256, 128),
            (1024, 768),
            (4096, 3072),
            (5120, 4096),
            (20_000, 4096),
            (1 << 20, 4096),
        ] {
            assert_eq!(connection_bound(nofile), bound, "nofile {nofile}");
        }
        for nofile in [512u64, 1024, 2048, 4096, 8192, 65_536] {
            assert!(connection_bound(nofile) as u64 + RESERVE_MIN <= nofile, "nofile {nofile}");
        }
    }

    #[test]
    fn raising_the_limit_never_lowers_it() {
        let n = raise_nofile().expect("getrlimit works here");
        assert!(n.soft >= n.was);
        assert!(n.soft <= n.hard || n.hard == libc::RLIM_INFINITY);
    }
}
