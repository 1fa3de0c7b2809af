//! W3C Trace Context (`traceparent`) of an event: taken from the webhook request when valid,
//! else made here, then carried to every sink (HTTP header, AMQP header, Kafka header), into
//! log lines, and stored with the event in the spool so that a delivery after a restart
//! carries the same value.
//!
//! Invariants: a [`TraceParent`] is always valid (trace id and parent id not all zeros);
//! it is written as version `00` (`00-<32 hex>-<16 hex>-<2 hex>`, lowercase), whatever
//! version it was read from. The router passes the context on unchanged: it records no spans
//! of its own, so it does not take the parent id's place.

use std::fmt;

/// The header's name (HTTP and the brokers' headers alike).
pub const HEADER: &str = "traceparent";

/// Bytes of [`TraceParent::to_bytes`].
pub const LEN: usize = 25;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
    pub flags: u8,
}

fn hex_digit(c: u8) -> Option<u8> {
    // Lowercase only: W3C treats uppercase hex as invalid.
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

fn hex_into(s: &[u8], out: &mut [u8]) -> Option<()> {
    if s.len() != out.len() * 2 {
        return None;
    }
    for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        *o = hex_digit(pair[0])? << 4 | hex_digit(pair[1])?;
    }
    Some(())
}

impl TraceParent {
    /// Parses a `traceparent` value; `None` when it is not a valid one (then a new one is made).
    pub fn parse(value: &[u8]) -> Option<TraceParent> {
        // version "-" trace-id "-" parent-id "-" flags: 2 + 1 + 32 + 1 + 16 + 1 + 2 = 55.
        if value.len() < 55 {
            return None;
        }
        let mut version = [0u8; 1];
        hex_into(&value[..2], &mut version)?;
        match version[0] {
            0xff => return None,
            // Version 00 is exactly 55 characters; a later version may add fields after a dash.
            0x00 if value.len() != 55 => return None,
            0x00 => {}
            _ if value.len() > 55 && value[55] != b'-' => return None,
            _ => {}
        }
        if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
            return None;
        }
        let mut t = TraceParent { trace_id: [0; 16], parent_id: [0; 8], flags: 0 };
        hex_into(&value[3..35], &mut t.trace_id)?;
        hex_into(&value[36..52], &mut t.parent_id)?;
        let mut flags = [0u8; 1];
        hex_into(&value[53..55], &mut flags)?;
        t.flags = flags[0];
        t.is_valid().then_some(t)
    }

    /// A new context: random trace id and parent id, sampled (flags `01`).
    pub fn generate() -> TraceParent {
        let mut t = TraceParent { trace_id: [0; 16], parent_id: [0; 8], flags: 0x01 };
        while t.trace_id == [0; 16] {
            t.trace_id = fastrand::u128(..).to_be_bytes();
        }
        while t.parent_id == [0; 8] {
            t.parent_id = fastrand::u64(..).to_be_bytes();
        }
        t
    }

    /// The request's context if `header` holds a valid one, else a new one.
    pub fn from_header(header: Option<&[u8]>) -> TraceParent {
        header.and_then(TraceParent::parse).unwrap_or_else(TraceParent::generate)
    }

    /// A stable context for an event stored before contexts were (old spool records): the
    /// trace id is the event id's 16 bytes, so every read of it gives the same one.
    pub fn for_old_event(event_id: &str) -> TraceParent {
        let key = crate::dedup::key(event_id).max(1).to_be_bytes();
        let mut parent_id = [0u8; 8];
        parent_id.copy_from_slice(&key[8..]);
        if parent_id == [0; 8] {
            parent_id[7] = 1;
        }
        TraceParent { trace_id: key, parent_id, flags: 0x01 }
    }

    fn is_valid(&self) -> bool {
        self.trace_id != [0; 16] && self.parent_id != [0; 8]
    }

    pub fn to_bytes(&self) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[..16].copy_from_slice(&self.trace_id);
        b[16..24].copy_from_slice(&self.parent_id);
        b[24] = self.flags;
        b
    }

    /// Reads [`TraceParent::to_bytes`]; `None` if they do not make a valid context.
    pub fn from_bytes(b: &[u8]) -> Option<TraceParent> {
        let b: &[u8; LEN] = b.try_into().ok()?;
        let mut t = TraceParent { trace_id: [0; 16], parent_id: [0; 8], flags: b[24] };
        t.trace_id.copy_from_slice(&b[..16]);
        t.parent_id.copy_from_slice(&b[16..24]);
        t.is_valid().then_some(t)
    }

    /// The 32 hex digits of the trace id.
    pub fn trace_id_hex(&self) -> String {
        hex::encode(self.trace_id)
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "00-{}-{}-{:02x}", hex::encode(self.trace_id), hex::encode(self.parent_id), self.flags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_header_is_kept_as_it_is() {
        let t = TraceParent::parse(GOOD.as_bytes()).unwrap();
        assert_eq!(t.to_string(), GOOD);
        assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.flags, 1);
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert_eq!(TraceParent::parse(unsampled.as_bytes()).unwrap().to_string(), unsampled);
    }

    #[test]
    fn invalid_headers_are_refused() {
        for bad in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", // uppercase
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01", // zero trace id
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", // zero parent id
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", // forbidden version
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", // 00 is 55 long
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x", // later version: '-' after flags
        ] {
            assert_eq!(TraceParent::parse(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn a_later_version_is_read_and_written_as_version_00() {
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes-next";
        assert_eq!(TraceParent::parse(later.as_bytes()).unwrap().to_string(), GOOD);
    }

    #[test]
    fn an_invalid_or_missing_header_gets_a_new_valid_context() {
        for header in [None, Some(&b"00-zz"[..])] {
            let t = TraceParent::from_header(header);
            let s = t.to_string();
            assert_eq!(TraceParent::parse(s.as_bytes()), Some(t), "{s} is valid");
            assert!(s.ends_with("-01"), "sampled: {s}");
        }
        assert_ne!(TraceParent::generate().trace_id, TraceParent::generate().trace_id);
        assert_eq!(TraceParent::from_header(Some(GOOD.as_bytes())).to_string(), GOOD);
    }

    #[test]
    fn contexts_round_trip_through_bytes_and_old_events_get_a_stable_one() {
        let t = TraceParent::generate();
        assert_eq!(TraceParent::from_bytes(&t.to_bytes()), Some(t));
        assert_eq!(TraceParent::from_bytes(&[0; LEN]), None);
        assert_eq!(TraceParent::from_bytes(&[1; 3]), None);
        let id = "0123456789abcdef0123456789abcdef";
        let old = TraceParent::for_old_event(id);
        assert_eq!(old, TraceParent::for_old_event(id));
        assert_eq!(old.trace_id_hex(), id);
        assert!(TraceParent::parse(old.to_string().as_bytes()).is_some());
    }
}
