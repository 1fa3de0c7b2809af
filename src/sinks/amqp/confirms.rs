//! Publisher confirms of one connection, answered per publish.
//!
//! lapin hands a `basic.return` to the first confirm it resolves after the return arrived,
//! which under pipelining (and multiple-acks) is not necessarily the confirm of the returned
//! message. So one collector task per connection owns every pending confirm and matches
//! returns to publishes by `message_id` (the event id) before answering. RabbitMQ sends a
//! message's return before its ack, so the confirm carrying it is resolved no later than the
//! message's own; confirms are registered with the collector under the publish lock, and the
//! collector takes that lock before answering a batch, so the carrier is always known by then.

use lapin::{Confirmation, PublisherConfirm};
use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, Mutex};

/// One publish whose confirm is awaited.
pub(super) struct Pending {
    pub message_id: String,
    pub confirm: PublisherConfirm,
    pub reply: oneshot::Sender<Outcome>,
}

#[derive(Debug)]
pub(super) enum Outcome {
    Ack,
    Nack,
    Returned { code: u16, text: String },
    Lost(String),
}

const RETURN_TTL: Duration = Duration::from_secs(120);

type Resolved = (Pending, lapin::Result<Confirmation>);

/// Takes the resolved confirms out of `pending`.
fn poll_pending(pending: &mut Vec<Pending>, cx: &mut std::task::Context<'_>) -> Vec<Resolved> {
    let mut done = Vec::new();
    let mut i = 0;
    while i < pending.len() {
        match Pin::new(&mut pending[i].confirm).poll(cx) {
            Poll::Ready(r) => done.push((pending.swap_remove(i), r)),
            Poll::Pending => i += 1,
        }
    }
    done
}

/// Owns every pending confirm of one connection and answers each publish once its confirm
/// resolved, with returned messages matched by `message_id` (see the module comment).
pub(super) async fn collect(mut rx: mpsc::UnboundedReceiver<Pending>, publish: Arc<Mutex<()>>) {
    let mut pending: Vec<Pending> = Vec::new();
    // Returns seen (carried by some confirm) whose own confirm was not answered yet. A return
    // whose publish was somehow never registered here would stay, so they expire.
    let mut returned: HashMap<String, Vec<(u16, String, Instant)>> = HashMap::new();
    let mut open = true;
    loop {
        let batch = poll_fn(|cx| {
            while open {
                match rx.poll_recv(cx) {
                    Poll::Ready(Some(p)) => pending.push(p),
                    Poll::Ready(None) => open = false,
                    Poll::Pending => break,
                }
            }
            let done = poll_pending(&mut pending, cx);
            if !done.is_empty() {
                Poll::Ready(Some(done))
            } else if !open && pending.is_empty() {
                Poll::Ready(None)
            } else {
                Poll::Pending
            }
        })
        .await;
        let Some(mut batch) = batch else { return };
        // The confirm carrying one of these messages' return may belong to a later publish
        // whose frames are out but which is not registered here yet: it holds the publish
        // lock until it is. Wait for it, take what was registered meanwhile and include what
        // resolved.
        {
            let _quiet = publish.lock().await;
            while let Ok(p) = rx.try_recv() {
                pending.push(p);
            }
        }
        batch.extend(poll_fn(|cx| Poll::Ready(poll_pending(&mut pending, cx))).await);

        // First every return carried by this batch, then the answers.
        let mut answers = Vec::with_capacity(batch.len());
        for (p, result) in batch {
            let outcome = match result {
                Ok(confirmation) => {
                    let ack = matches!(confirmation, Confirmation::Ack(_));
                    let nack = matches!(confirmation, Confirmation::Nack(_));
                    if let Some(m) = confirmation.take_message() {
                        if let Some(id) = m.delivery.properties.message_id() {
                            returned.entry(id.as_str().to_owned()).or_default().push((
                                m.reply_code,
                                m.reply_text.as_str().to_owned(),
                                Instant::now(),
                            ));
                        }
                    }
                    if ack {
                        Outcome::Ack
                    } else if nack {
                        Outcome::Nack
                    } else {
                        Outcome::Lost("publisher confirms are not enabled on the channel".into())
                    }
                }
                Err(e) => Outcome::Lost(e.to_string()),
            };
            answers.push((p, outcome));
        }
        for (p, outcome) in answers {
            let outcome = match returned.get_mut(&p.message_id).and_then(Vec::pop) {
                Some((code, text, _)) => Outcome::Returned { code, text },
                None => outcome,
            };
            let _ = p.reply.send(outcome);
        }
        // A return nobody claimed (its publish was cancelled before reaching this task).
        returned.retain(|_, v| {
            v.retain(|(_, _, at)| at.elapsed() < RETURN_TTL);
            !v.is_empty()
        });
    }
}
