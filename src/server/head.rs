//! The first request head of a connection, read before hyper takes the connection over.
//!
//! hyper gives every connection its dispatch state and an 8 KiB write buffer when it takes it
//! over, and a 16 KiB read buffer on its first read: with the task, about 28 KiB a connection
//! (heaptrack: 4,000 connections that had sent one byte held 114 MiB). A flood of such
//! sockets would hold that much each for as long as the header timeout. Here a new connection
//! costs only its task and what it has sent (about 1.5 KiB): its bytes are read into a buffer
//! of their own until the head is complete (an empty line) or as large as hyper's first
//! buffer, and then replayed to hyper (`io::Replay`), which parses everything itself. Nothing
//! is interpreted here, so a wrong guess only hands over earlier. The header timeout runs from
//! the accept; after a `Partial` hand-over hyper's own header timeout runs anew.

use std::io;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Bytes past which the connection goes to hyper even without a complete head: hyper's own
/// first read buffer, so holding more here would save nothing (hyper then applies its header
/// size limit and its header timeout).
pub const HANDOFF: usize = 8 * 1024;

/// What the first bytes of a connection came to.
#[derive(Debug, PartialEq, Eq)]
pub enum FirstHead {
    /// A complete request head (and whatever followed it in the same reads).
    Complete(Vec<u8>),
    /// `HANDOFF` bytes or more, without the end of the head yet.
    Partial(Vec<u8>),
    /// The peer closed (or reset) the connection before completing a head.
    Closed,
    /// The deadline passed first; `sent_bytes` when the peer had sent part of a head.
    TimedOut { sent_bytes: bool },
}

/// Reads `stream` until one of the outcomes of [`FirstHead`].
pub async fn read_first_head(stream: &TcpStream, deadline: Instant) -> FirstHead {
    let mut buf = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, stream.readable()).await {
            Err(_) => return FirstHead::TimedOut { sent_bytes: !buf.is_empty() },
            Ok(Err(_)) => return FirstHead::Closed,
            Ok(Ok(())) => {}
        }
        match read_some(stream, &mut buf) {
            Ok(0) => return FirstHead::Closed,
            Ok(n) => {
                if ends_head(&buf, n) {
                    return FirstHead::Complete(buf);
                }
                if buf.len() >= HANDOFF {
                    return FirstHead::Partial(buf);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return FirstHead::Closed,
        }
    }
}

/// One non-blocking read appended to `buf`. Not async: the stack buffer never lives in the
/// connection's task between two reads.
fn read_some(stream: &TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    let mut chunk = [0u8; 4096];
    let n = stream.try_read(&mut chunk)?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

/// Whether the `new` bytes at the end of `buf` complete a head: an empty line, ended by CRLF
/// or a bare LF (which HTTP/1.1 parsers accept).
pub(super) fn ends_head(buf: &[u8], new: usize) -> bool {
    let from = buf.len().saturating_sub(new + 2);
    buf[from..].windows(2).any(|w| w == b"\n\n") || buf[from..].windows(3).any(|w| w == b"\n\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn the_end_of_a_head_is_found_even_when_it_arrives_split() {
        let head = b"POST /x HTTP/1.1\r\nhost: a\r\n\r\n{\"type\":1}";
        for split in 1..head.len() {
            let mut buf = head[..split].to_vec();
            let mut found = ends_head(&buf, split);
            buf.extend_from_slice(&head[split..]);
            found |= ends_head(&buf, head.len() - split);
            assert!(found, "split at {split}");
        }
        assert!(ends_head(b"GET / HTTP/1.1\nhost: a\n\n", 24));
        assert!(!ends_head(b"GET / HTTP/1.1\r\nhost: a\r\n", 26));
        assert!(!ends_head(b"P", 1));
    }

    async fn pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        (client, server)
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    #[test]
    fn a_head_sent_in_pieces_is_handed_over_whole_with_what_followed() {
        rt().block_on(async {
            let (mut client, server) = pair().await;
            let deadline = Instant::now() + Duration::from_secs(10);
            let reader = tokio::spawn(async move { read_first_head(&server, deadline).await });
            for piece in [&b"POST /x HTTP/1.1\r\n"[..], b"host: a\r\n", b"\r\n{}"] {
                client.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
            assert_eq!(reader.await.unwrap(), FirstHead::Complete(b"POST /x HTTP/1.1\r\nhost: a\r\n\r\n{}".to_vec()));
        });
    }

    #[test]
    fn a_connection_that_sends_one_byte_times_out_and_one_that_closes_is_closed() {
        rt().block_on(async {
            let (mut client, server) = pair().await;
            client.write_all(b"P").await.unwrap();
            let got = read_first_head(&server, Instant::now() + Duration::from_millis(200)).await;
            assert_eq!(got, FirstHead::TimedOut { sent_bytes: true });

            let (client, server) = pair().await;
            let silent = read_first_head(&server, Instant::now() + Duration::from_millis(50)).await;
            assert_eq!(silent, FirstHead::TimedOut { sent_bytes: false });
            drop(client);
            let got = read_first_head(&server, Instant::now() + Duration::from_secs(10)).await;
            assert_eq!(got, FirstHead::Closed);
        });
    }

    #[test]
    fn a_head_without_end_goes_to_hyper_once_it_fills_hypers_first_buffer() {
        rt().block_on(async {
            let (mut client, server) = pair().await;
            let deadline = Instant::now() + Duration::from_secs(10);
            let reader = tokio::spawn(async move { read_first_head(&server, deadline).await });
            let big = format!("GET / HTTP/1.1\r\nx-big: {}", "a".repeat(HANDOFF));
            client.write_all(big.as_bytes()).await.unwrap();
            match reader.await.unwrap() {
                FirstHead::Partial(buf) => assert!(buf.len() >= HANDOFF && big.as_bytes().starts_with(&buf)),
                other => panic!("{other:?}"),
            }
        });
    }
}
