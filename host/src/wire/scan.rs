//! The top-level entries of a JSON object, found in one pass that checks the
//! whole text as serde_json checks a value it skips.
//!
//! The relay's fast path ([`super::skim`]) reads a dozen fields of a cells
//! message and passes the rest (the context, the method's arguments) on as
//! text; yet it must refuse what the full decoder refuses. serde_json's own
//! skipping of the values it does not keep costs a hundred instructions or
//! so per string, and a Nova message is mostly short strings. This scanner
//! checks the same grammar (whitespace, literals, numbers, strings with their
//! escapes, nesting), sixteen bytes at a time inside strings, and hands each
//! entry over as borrowed text.
//!
//! It accepts only what `serde_json::from_str` accepts for the same text
//! (a property test below holds the two together, on valid and on broken
//! JSON); what it cannot vouch for (nesting deeper than [`MAX_DEPTH`]) it
//! refuses, and the caller takes the full path, which decides.

use std::borrow::Cow;

use super::json::{plain_prefix, specials16, unescape_json_str};

/// The deepest nesting scanned; deeper text is left to serde_json.
pub const MAX_DEPTH: u32 = 64;

/// One entry of an object: its key's literal (quotes and escapes in),
/// whether that literal holds an escape, and the value's text.
pub struct Entry<'a> {
    pub key_literal: &'a str,
    pub key_escaped: bool,
    pub value: &'a str,
}

impl<'a> Entry<'a> {
    /// The key's value: borrowed when it holds no escape, unescaped when it
    /// does (`None` for what the unescaper refuses, an unpaired surrogate).
    pub fn key(&self) -> Option<Cow<'a, str>> {
        if self.key_escaped {
            unescape_json_str(self.key_literal).map(Cow::Owned)
        } else {
            let quoted = self.key_literal.strip_prefix('"')?.strip_suffix('"')?;
            Some(Cow::Borrowed(quoted))
        }
    }
}

/// Calls `each` with every top-level entry of the JSON object `text`, in text
/// order. `None` when `text` is not one JSON object (whitespace around it
/// allowed), nests deeper than [`MAX_DEPTH`], or `each` answers `None`.
pub fn object_entries<'a>(
    text: &'a str,
    mut each: impl FnMut(Entry<'a>) -> Option<()>,
) -> Option<()> {
    let mut s = Scanner {
        bytes: text.as_bytes(),
        at: 0,
    };
    s.whitespace();
    s.eat(b'{')?;
    s.whitespace();
    if s.peek()? == b'}' {
        s.at += 1;
    } else {
        loop {
            s.whitespace();
            let (key, key_escaped) = s.key()?;
            s.whitespace();
            let value_at = s.at;
            s.value()?;
            each(Entry {
                key_literal: text.get(key)?,
                key_escaped,
                value: text.get(value_at..s.at)?,
            })?;
            s.whitespace();
            match s.peek()? {
                b',' => s.at += 1,
                b'}' => {
                    s.at += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    s.whitespace();
    (s.at == s.bytes.len()).then_some(())
}

struct Scanner<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Scanner<'_> {
    #[inline(always)]
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    #[inline(always)]
    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.at += 1)
    }

    /// JSON's whitespace: space, tab, line feed, carriage return.
    #[inline(always)]
    fn whitespace(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    /// One value of any kind, nested values included; iterative, with the
    /// open arrays and objects kept as bits (1 for an object).
    fn value(&mut self) -> Option<()> {
        let mut open: u64 = 0;
        let mut depth = 0;
        loop {
            // A value starts here.
            self.whitespace();
            match self.peek()? {
                b @ (b'{' | b'[') => {
                    if depth == MAX_DEPTH {
                        return None;
                    }
                    self.at += 1;
                    let object = b == b'{';
                    open = open << 1 | u64::from(object);
                    depth += 1;
                    self.whitespace();
                    if self.peek()? == if object { b'}' } else { b']' } {
                        self.at += 1;
                        open >>= 1;
                        depth -= 1;
                    } else if object {
                        self.key()?;
                        continue;
                    } else {
                        continue;
                    }
                }
                b'"' => {
                    self.string()?;
                }
                b't' => self.literal(b"true")?,
                b'f' => self.literal(b"false")?,
                b'n' => self.literal(b"null")?,
                b'-' | b'0'..=b'9' => self.number()?,
                _ => return None,
            }
            // A value ended: close what it ends, or go on to the next one.
            loop {
                if depth == 0 {
                    return Some(());
                }
                self.whitespace();
                let object = open & 1 == 1;
                match self.peek()? {
                    b',' => {
                        self.at += 1;
                        if object {
                            self.whitespace();
                            self.key()?;
                        }
                        break;
                    }
                    b'}' if object => {}
                    b']' if !object => {}
                    _ => return None,
                }
                self.at += 1;
                open >>= 1;
                depth -= 1;
            }
        }
    }

    /// An object's key and its colon: where the key's literal is, and
    /// whether it holds an escape.
    #[inline(always)]
    fn key(&mut self) -> Option<(std::ops::Range<usize>, bool)> {
        let at = self.at;
        let escaped = self.string()?;
        let literal = at..self.at;
        self.whitespace();
        self.eat(b':')?;
        Some((literal, escaped))
    }

    /// A string literal from its opening quote; whether it holds an escape.
    /// Inlined, as the helpers above: a Nova message is mostly short
    /// strings, and a call per string cost about a third of reading one.
    #[inline(always)]
    fn string(&mut self) -> Option<bool> {
        self.eat(b'"')?;
        let mut escaped = false;
        loop {
            // To the next special byte, sixteen bytes at a time while
            // sixteen are left (most strings end in their first sixteen).
            match self.bytes.get(self.at..)?.first_chunk::<16>() {
                Some(chunk) => match specials16(chunk) {
                    0 => {
                        self.at += 16;
                        continue;
                    }
                    specials => self.at += specials.trailing_zeros() as usize,
                },
                None => self.at += plain_prefix(self.bytes.get(self.at..)?),
            }
            match self.peek()? {
                b'"' => {
                    self.at += 1;
                    return Some(escaped);
                }
                b'\\' => {
                    escaped = true;
                    match self.bytes.get(self.at + 1)? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.at += 2,
                        b'u' => {
                            let digits = self.bytes.get(self.at + 2..self.at + 6)?;
                            if !digits.iter().all(u8::is_ascii_hexdigit) {
                                return None;
                            }
                            self.at += 6;
                        }
                        _ => return None,
                    }
                }
                b if b < 0x20 => return None,
                // Fewer than eight bytes were left and this one is plain.
                _ => self.at += 1,
            }
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.at + word.len();
        (self.bytes.get(self.at..end)? == word).then(|| self.at = end)
    }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`
    fn number(&mut self) -> Option<()> {
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        match self.peek()? {
            b'0' => self.at += 1,
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.at += 1;
            self.some_digits()?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.at += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.at += 1;
            }
            self.some_digits()?;
        }
        Some(())
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.at += 1;
        }
    }

    /// At least one digit.
    fn some_digits(&mut self) -> Option<()> {
        let from = self.at;
        self.digits();
        (self.at > from).then_some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::value::RawValue;
    use serde_json::Value;

    /// The entries serde_json finds, as (key, value text), or `None` when it
    /// refuses the text.
    fn serde_entries(text: &str) -> Option<Vec<(String, String)>> {
        let map: Vec<(String, Box<RawValue>)> =
            serde_json::from_str::<OrderedEntries>(text).ok()?.0;
        Some(
            map.into_iter()
                .map(|(k, v)| (k, v.get().to_owned()))
                .collect(),
        )
    }

    fn scanned_entries(text: &str) -> Option<Vec<(String, String)>> {
        let mut out = Vec::new();
        object_entries(text, |e| {
            out.push((e.key()?.into_owned(), e.value.to_owned()));
            Some(())
        })?;
        Some(out)
    }

    /// Every entry in order, repeated keys included.
    struct OrderedEntries(Vec<(String, Box<RawValue>)>);

    impl<'de> serde::Deserialize<'de> for OrderedEntries {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = OrderedEntries;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("an object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> Result<OrderedEntries, A::Error> {
                    let mut entries = Vec::new();
                    while let Some(entry) = map.next_entry()? {
                        entries.push(entry);
                    }
                    Ok(OrderedEntries(entries))
                }
            }
            d.deserialize_map(V)
        }
    }

    #[test]
    fn reads_what_serde_reads() {
        let text = r#" {"a": 1, "b" : [true, {"c": null}], "\u0061": "x\"y", "d": -0.5e+3 } "#;
        assert_eq!(scanned_entries(text), serde_entries(text));
        assert_eq!(scanned_entries(text).map(|e| e.len()), Some(4));
        assert_eq!(scanned_entries("{}"), Some(vec![]));
    }

    #[test]
    fn refuses_what_serde_refuses() {
        for text in [
            "",
            "[]",
            "{",
            r#"{"a": 1,}"#,
            r#"{"a": 01}"#,
            r#"{"a": 1.}"#,
            r#"{"a": .5}"#,
            r#"{"a": 1e}"#,
            r#"{"a": -}"#,
            r#"{"a": tru}"#,
            r#"{"a": "\x"}"#,
            r#"{"a": "\u12g4"}"#,
            "{\"a\": \"\u{1}\"}",
            r#"{"a": [1 2]}"#,
            r#"{"a": {"b" 1}}"#,
            r#"{"a": {1: 2}}"#,
            r#"{"a": 1} x"#,
            r#"{"a": [}"#,
            r#"{a: 1}"#,
        ] {
            assert_eq!(serde_entries(text), None, "serde takes {text:?}");
            assert_eq!(scanned_entries(text), None, "the scanner takes {text:?}");
        }
    }

    #[test]
    fn deep_nesting_is_left_to_serde() {
        let depth = MAX_DEPTH as usize;
        let fits = format!("{{\"a\": {}{}}}", "[".repeat(depth), "]".repeat(depth));
        assert!(scanned_entries(&fits).is_some());
        let deeper = format!(
            "{{\"a\": {}{}}}",
            "[".repeat(depth + 1),
            "]".repeat(depth + 1)
        );
        assert_eq!(scanned_entries(&deeper), None);
    }

    /// Any JSON value, nested a few levels.
    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            any::<String>().prop_map(Value::String),
            "[ -~]{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec(("[a-z\"\\\\é]{0,6}", inner), 0..6)
                    .prop_map(|entries| Value::Object(entries.into_iter().collect())),
            ]
        })
    }

    fn json_object() -> impl Strategy<Value = String> {
        (
            prop::collection::vec(("[a-z\"\\\\é]{0,6}", json_value()), 0..6),
            any::<bool>(),
        )
            .prop_map(|(entries, pretty)| {
                let object = Value::Object(entries.into_iter().collect());
                if pretty {
                    serde_json::to_string_pretty(&object).expect("json")
                } else {
                    serde_json::to_string(&object).expect("json")
                }
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn agrees_with_serde_on_objects(text in json_object()) {
            prop_assert!(serde_entries(&text).is_some());
            prop_assert_eq!(scanned_entries(&text), serde_entries(&text));
        }

        #[test]
        fn agrees_with_serde_on_broken_objects(
            text in json_object(),
            cuts in prop::collection::vec((any::<prop::sample::Index>(), prop_oneof![
                Just(""), Just("\""), Just("\\"), Just(","), Just("}"), Just("]"), Just("["),
                Just("{"), Just(":"), Just("-"), Just("0"), Just("."), Just("e"), Just("\u{1}"),
                Just(" "), Just("\\u"), Just("n"), Just("1")
            ]), 1..3),
        ) {
            let mut text = text;
            for (at, insert) in cuts {
                let mut at = at.index(text.len() + 1);
                while !text.is_char_boundary(at) {
                    at -= 1;
                }
                // Remove one character there, or insert one.
                if insert.is_empty() {
                    if let Some(c) = text[at..].chars().next() {
                        text.replace_range(at..at + c.len_utf8(), "");
                    }
                } else {
                    text.insert_str(at, insert);
                }
            }
            let scanned = scanned_entries(&text);
            // The scanner never takes what serde refuses, and reads the same
            // entries when both take the text.
            if scanned.is_some() {
                prop_assert_eq!(&scanned, &serde_entries(&text), "{}", text);
            }
            if serde_entries(&text).is_some() {
                prop_assert_eq!(scanned, serde_entries(&text), "{}", text);
            }
        }
    }
}
