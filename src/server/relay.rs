//! [`WokenOnly`]: a future polled again only once it has woken its task itself.
//!
//! A connection's task waits on hyper and, beside it, on signals that almost never fire (the
//! connection chosen to be shed, the listener shutting down). `select!` polls every branch at
//! every wake-up of the task, i.e. several times per request, and a waiting `Notify` or `watch`
//! future takes its mutex on each of those polls to check its waker. Wrapped in [`WokenOnly`],
//! such a signal is polled once, then only after it woke the task: the wrapper gives it a
//! waker of its own, which records the wake-up and passes it on to the task's current waker.

use futures_util::task::AtomicWaker;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

/// The inner future's waker: notes the wake-up, then wakes the task.
struct Relay {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Relay {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// `inner`, polled only on the first poll and after it has woken the task (see the module).
pub struct WokenOnly<F> {
    inner: Pin<Box<F>>,
    relay: Arc<Relay>,
    waker: Waker,
}

impl<F: Future> WokenOnly<F> {
    pub fn new(inner: F) -> Self {
        // Woken to begin with: the first poll reaches the inner future.
        let relay = Arc::new(Relay { woken: AtomicBool::new(true), task: AtomicWaker::new() });
        let waker = Waker::from(relay.clone());
        WokenOnly { inner: Box::pin(inner), relay, waker }
    }
}

impl<F: Future> Future for WokenOnly<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // Registered before the flag is read: a wake-up after this point wakes this task,
        // one before it is seen in the flag.
        self.relay.task.register(cx.waker());
        if !self.relay.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let this = &mut *self;
        let mut inner_cx = Context::from_waker(&this.waker);
        this.inner.as_mut().poll(&mut inner_cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    /// Counts its polls; ready once `ready` is set, waking the task through the waker it was
    /// last given.
    struct Probe {
        polls: Arc<AtomicUsize>,
        ready: Arc<AtomicBool>,
    }

    impl Future for Probe {
        type Output = ();
        fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.ready.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    #[test]
    fn the_inner_future_is_polled_first_then_only_when_it_woke_the_task() {
        let (polls, ready) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let mut w = Box::pin(WokenOnly::new(Probe { polls: polls.clone(), ready: ready.clone() }));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(w.as_mut().poll(&mut cx).is_pending());
        for _ in 0..10 {
            assert!(w.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1, "polled again without a wake-up of its own");
        ready.store(true, Ordering::SeqCst);
        w.relay.clone().wake();
        assert!(w.as_mut().poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_notification_wakes_the_task_and_completes_it() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(async {
            let notify = Arc::new(tokio::sync::Notify::new());
            let n = notify.clone();
            let mut signal = std::pin::pin!(WokenOnly::new(async move { n.notified().await }));
            let mut ticks = 0;
            // The task is woken by other things many times; the signal stays pending.
            loop {
                tokio::select! {
                    _ = &mut signal => break,
                    _ = tokio::time::sleep(Duration::from_millis(1)) => {
                        ticks += 1;
                        if ticks == 20 {
                            notify.notify_one();
                        }
                        assert!(ticks < 1000, "the notification was lost");
                    }
                }
            }
            assert!(ticks >= 20);
        });
    }

    #[test]
    fn a_watch_change_before_the_first_poll_is_seen() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(async {
            let (tx, mut rx) = tokio::sync::watch::channel(());
            rx.mark_unchanged();
            let signal = WokenOnly::new(async move { rx.changed().await.is_ok() });
            tx.send(()).unwrap();
            let changed = tokio::time::timeout(Duration::from_secs(5), signal).await.expect("the change was lost");
            assert!(changed);
        });
    }
}
