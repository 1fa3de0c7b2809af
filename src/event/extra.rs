//! `extra`: the payload fields the normaliser does not map, kept as the JSON text the sender
//! wrote (so a 30-digit integer or `1E2` comes out exactly as sent, which a `serde_json::Value`
//! cannot promise), compacted (no whitespace outside strings: an event is one line), keys in
//! sorted order and unique.
//!
//! Lookups (`extra.<name>` in routes and templates, tests) go through a `serde_json::Map` read
//! from that text on first use; most events are never looked into.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::sync::OnceLock;

pub struct Extra {
    /// The object's text; `None` is `{}` (no allocation for the common case).
    json: Option<Box<RawValue>>,
    /// Whether `json` is byte for byte what serde_json writes for the `Map` read from it (the
    /// bytes the event id hashes). False is always safe: the id then re-serialises the map.
    canonical: bool,
    map: OnceLock<Map<String, Value>>,
}

impl Extra {
    pub fn empty() -> Self {
        Extra { json: None, canonical: true, map: OnceLock::new() }
    }

    /// `json` must be a compact JSON object (keys unique and sorted for `canonical`, as
    /// documented on the field). Checked (a quick pass): the text is written into every event
    /// line as it is.
    pub(crate) fn from_compact(json: String, canonical: bool) -> Result<Self, serde_json::Error> {
        if json == "{}" {
            return Ok(Extra::empty());
        }
        let raw = RawValue::from_string(json)?;
        Ok(Extra { json: Some(raw), canonical, map: OnceLock::new() })
    }

    /// The object as JSON text (`{}` when empty).
    pub fn json(&self) -> &str {
        self.json.as_deref().map_or("{}", RawValue::get)
    }

    /// The text the event id hashes: serde_json's own writing of the map (keys sorted, numbers
    /// as it reads them). Borrowed when the stored text already is exactly that.
    pub(crate) fn canonical_json(&self) -> std::borrow::Cow<'_, str> {
        if self.canonical {
            std::borrow::Cow::Borrowed(self.json())
        } else {
            std::borrow::Cow::Owned(serde_json::to_string(&**self).expect("a JSON map serialises"))
        }
    }

    /// Is the stored text the canonical one (see `canonical`)?
    pub(crate) fn is_canonical(&self) -> bool {
        self.canonical
    }

    pub fn is_empty(&self) -> bool {
        self.json.is_none()
    }

    /// The fields as a `serde_json::Map` (a copy; numbers as serde_json reads them).
    pub fn to_map(&self) -> Map<String, Value> {
        (**self).clone()
    }
}

impl std::ops::Deref for Extra {
    type Target = Map<String, Value>;

    fn deref(&self) -> &Map<String, Value> {
        self.map.get_or_init(|| match &self.json {
            None => Map::new(),
            // The text is a valid object (checked when made); a number beyond f64's range
            // was refused by the normaliser, so this reads.
            Some(raw) => serde_json::from_str(raw.get()).unwrap_or_default(),
        })
    }
}

impl Default for Extra {
    fn default() -> Self {
        Extra::empty()
    }
}

impl Clone for Extra {
    fn clone(&self) -> Self {
        Extra { json: self.json.clone(), canonical: self.canonical, map: OnceLock::new() }
    }
}

impl std::fmt::Debug for Extra {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.json())
    }
}

/// Same text, or the same fields as JSON values (an event read back through a `Value` has
/// serde_json's writing of the same numbers).
impl PartialEq for Extra {
    fn eq(&self, other: &Extra) -> bool {
        self.json() == other.json() || **self == **other
    }
}

impl PartialEq<Map<String, Value>> for Extra {
    fn eq(&self, other: &Map<String, Value>) -> bool {
        **self == *other
    }
}

impl Serialize for Extra {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.json {
            Some(raw) => raw.serialize(s),
            None => Map::new().serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Extra {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Box::<RawValue>::deserialize(d)?;
        let text = raw.get();
        if !text.starts_with('{') {
            return Err(serde::de::Error::custom("extra must be a JSON object"));
        }
        // Stored events are compact already; anything else (a hand-edited dead letter) is
        // compacted, and its canonical form worked out (once, on read).
        let compact = super::normalise::compact(text);
        let canonical = super::normalise::object_is_canonical(&compact);
        Extra::from_compact(compact.into_owned(), canonical).map_err(serde::de::Error::custom)
    }
}
