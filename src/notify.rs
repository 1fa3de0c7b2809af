//! systemd notifications (`Type=notify`): READY, RELOADING, STOPPING and watchdog pings.
//! Every call is a no-op when `NOTIFY_SOCKET` is unset (laptop, Kubernetes).

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

pub fn ready() {
    send(&[NotifyState::Ready]);
}

/// READY=1 with a STATUS= line (shown by `systemctl status`), in one datagram.
pub fn ready_with_status(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn reloading() {
    send(&[NotifyState::Reloading]);
}

pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// Pings the watchdog at half the interval systemd asked for (`WATCHDOG_USEC`).
pub fn spawn_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    let interval = sd_notify::watchdog_enabled().filter(|d| !d.is_zero())?;
    let every = interval / 2;
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            send(&[NotifyState::Watchdog]);
        }
    }))
}
