//! JSON text exactly as Python's `json.dumps` writes it with default arguments.
//!
//! oslo.messaging serializes with those defaults: `", "` and `": "` separators, everything
//! outside printable ASCII escaped as `\uXXXX` (surrogate pairs above the BMP), floats in
//! `repr` form, keys in insertion order (serde_json's `preserve_order` keeps that order for
//! us). Writing the same bytes as the Python peer is not needed for it to understand us, but
//! it makes a relayed message byte-identical to what arrived, which keeps captures diffable
//! and lets tests compare against observed samples. This file knows nothing about oslo or
//! cells; it only formats JSON.

use serde::Serialize;
use serde_json::ser::Formatter;
use serde_json::Value;
use std::io;

/// A `serde_json` formatter producing Python's `json.dumps` default output.
///
/// Escapes that serde_json already writes the way Python does (`\"`, `\\`, `\n`, `\t`,
/// `\r`, `\b`, `\f` and `\u00xx` for other control characters, lowercase hex) are left to
/// the default implementation; only the separators, non-ASCII text and floats differ.
#[derive(Debug, Clone, Copy, Default)]
pub struct PythonFormatter;

impl Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        writer.write_all(b": ")
    }

    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        // Python's `ensure_ascii` escapes everything outside ' '..='~', including DEL (0x7f),
        // which serde_json would pass through raw. Control characters below 0x20 never reach
        // this method: serde_json routes them to `write_char_escape`.
        let mut clean_from = 0;
        for (at, ch) in fragment.char_indices() {
            if (' '..='~').contains(&ch) {
                continue;
            }
            writer.write_all(&fragment.as_bytes()[clean_from..at])?;
            let mut units = [0u16; 2];
            for unit in ch.encode_utf16(&mut units) {
                write!(writer, "\\u{unit:04x}")?;
            }
            clean_from = at + ch.len_utf8();
        }
        writer.write_all(&fragment.as_bytes()[clean_from..])
    }

    fn write_f64<W: ?Sized + io::Write>(&mut self, writer: &mut W, value: f64) -> io::Result<()> {
        writer.write_all(python_float_repr(value).as_bytes())
    }
}

/// Python's `repr(float)`: the shortest digits that read back as the same float, the
/// nearest such (ties to even), laid out as Python does: fixed notation with at least one decimal (`1.0`, `0.0001`) while
/// the decimal exponent stays within -4 < decpt <= 16, otherwise scientific with a signed,
/// at least two-digit exponent (`1e+16`, `1.5e-07`).
fn python_float_repr(value: f64) -> String {
    // serde_json turns non-finite floats into `null` before asking us; these only keep the
    // function total. They are what Python's json module writes.
    if value.is_nan() {
        return "NaN".to_owned();
    }
    if value.is_infinite() {
        return if value > 0.0 { "Infinity" } else { "-Infinity" }.to_owned();
    }
    // Rust's shortest digits have the right length, but when two candidates of that length
    // are equally near the exact binary value Rust may round up where Python's dtoa picks
    // the nearer-to-even one. The correctly rounded (ties-to-even) digits of the same length
    // are Python's choice whenever they still read back as the same float.
    let shortest = format!("{value:e}");
    let significant = shortest
        .split_once('e')
        .map_or(shortest.as_str(), |(mantissa, _)| mantissa)
        .chars()
        .filter(char::is_ascii_digit)
        .count();
    let nearest = format!("{value:.*e}", significant.saturating_sub(1));
    let scientific = if nearest.parse::<f64>() == Ok(value) {
        nearest
    } else {
        shortest
    };
    let (mantissa, exponent) = scientific
        .split_once('e')
        .unwrap_or((scientific.as_str(), "0"));
    let exponent: i64 = exponent.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    // Python's "decpt": the value is 0.<digits> times ten to the decpt.
    let decpt = exponent + 1;
    let mut out = String::from(sign);
    if -4 < decpt && decpt <= 16 {
        let len = digits.len() as i64;
        if decpt <= 0 {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', (-decpt) as usize));
            out.push_str(&digits);
        } else if decpt >= len {
            out.push_str(&digits);
            out.extend(std::iter::repeat_n('0', (decpt - len) as usize));
            out.push_str(".0");
        } else {
            let (int_part, frac_part) = digits.split_at(decpt as usize);
            out.push_str(int_part);
            out.push('.');
            out.push_str(frac_part);
        }
    } else {
        let (first, rest) = digits.split_at(digits.len().min(1));
        out.push_str(first);
        if !rest.is_empty() {
            out.push('.');
            out.push_str(rest);
        }
        let exp_sign = if exponent < 0 { '-' } else { '+' };
        out.push_str(&format!("e{exp_sign}{:02}", exponent.unsigned_abs()));
    }
    out
}

/// Appends `text` as a JSON string the way Python's `json.dumps` writes one: the quotes,
/// `\"` and `\\`, the short escapes of `\b \f \n \r \t`, `\u00xx` for other control
/// characters and DEL, and `\uXXXX` (surrogate pairs above the BMP) for everything outside
/// ASCII. The same bytes as serializing the string with [`PythonFormatter`], written without
/// going through serde, for the relay's fast path.
pub fn write_python_str(out: &mut String, text: &str) {
    out.reserve(text.len() + 2);
    out.push('"');
    let bytes = text.as_bytes();
    let mut clean_from = 0;
    let mut at = 0;
    while at < bytes.len() {
        let byte = bytes[at];
        if (b' '..=b'~').contains(&byte) && byte != b'"' && byte != b'\\' {
            at += 1;
            continue;
        }
        out.push_str(&text[clean_from..at]);
        let step = match byte {
            b'"' => push_escape(out, "\\\""),
            b'\\' => push_escape(out, "\\\\"),
            b'\n' => push_escape(out, "\\n"),
            b'\r' => push_escape(out, "\\r"),
            b'\t' => push_escape(out, "\\t"),
            0x08 => push_escape(out, "\\b"),
            0x0c => push_escape(out, "\\f"),
            0x00..=0x7f => {
                push_unit(out, u16::from(byte));
                1
            }
            _ => {
                // `at` is on a character boundary: every byte before it was ASCII or the
                // whole of an earlier character.
                let ch = text[at..].chars().next().unwrap_or('\u{fffd}');
                let mut units = [0u16; 2];
                for unit in ch.encode_utf16(&mut units) {
                    push_unit(out, *unit);
                }
                ch.len_utf8()
            }
        };
        at += step;
        clean_from = at;
    }
    out.push_str(&text[clean_from..]);
    out.push('"');
}

fn push_escape(out: &mut String, escape: &str) -> usize {
    out.push_str(escape);
    1
}

/// `\uXXXX` in lowercase hex, as Python writes it.
fn push_unit(out: &mut String, unit: u16) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push_str("\\u");
    for shift in [12, 8, 4, 0] {
        out.push(HEX[usize::from((unit >> shift) & 0xf)] as char);
    }
}

/// Writes `value` as Python's `json.dumps` would into `writer`.
pub fn write_python_json<W: io::Write, T: Serialize + ?Sized>(
    writer: W,
    value: &T,
) -> serde_json::Result<()> {
    let mut serializer = serde_json::Serializer::with_formatter(writer, PythonFormatter);
    value.serialize(&mut serializer)
}

/// `value` as Python's `json.dumps` would write it.
///
/// Fails only where serde_json itself would: a `Serialize` impl reporting an error, or a map
/// whose keys are not strings.
pub fn to_python_json<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<String> {
    let mut out = Vec::new();
    write_python_json(&mut out, value)?;
    Ok(ascii_to_string(out))
}

/// A JSON value as Python's `json.dumps` would write it. Infallible: see [`encode_total`].
pub fn value_to_python_json(value: &Value) -> String {
    encode_total(value)
}

/// Encodes values the codec builds itself, whose serialization cannot fail: writing into a
/// `Vec` never fails, every map key is a string and non-finite floats become `null`. The
/// error arm only keeps this function total; a debug build would rather hear about it.
pub(crate) fn encode_total<T: Serialize + ?Sized>(value: &T) -> String {
    match to_python_json(value) {
        Ok(text) => text,
        Err(err) => {
            debug_assert!(false, "encoding an in-memory value failed: {err}");
            String::from("null")
        }
    }
}

/// The formatter escapes everything outside ASCII, so its output is always valid UTF-8; the
/// lossy conversion is never lossy in practice and avoids a panic path.
fn ascii_to_string(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes)
        .unwrap_or_else(|err| String::from_utf8_lossy(err.as_bytes()).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn separators_and_nesting_match_python() {
        let value = json!({"a": [1, 2, {"b": null}], "c": {}, "d": [], "e": true});
        assert_eq!(
            value_to_python_json(&value),
            r#"{"a": [1, 2, {"b": null}], "c": {}, "d": [], "e": true}"#
        );
    }

    #[test]
    fn keys_keep_insertion_order() {
        // Fails loudly if serde_json's `preserve_order` feature goes missing.
        let value: Value = serde_json::from_str(r#"{"z": 1, "a": 2, "m": 3}"#).unwrap();
        assert_eq!(value_to_python_json(&value), r#"{"z": 1, "a": 2, "m": 3}"#);
    }

    #[test]
    fn non_ascii_is_escaped_like_python() {
        // Expected text produced by CPython 3.11 `json.dumps`.
        let value = json!({"a": "zo\u{eb} \u{1F600} \u{7f} \u{1} \n / \\ \""});
        assert_eq!(
            value_to_python_json(&value),
            r#"{"a": "zo\u00eb \ud83d\ude00 \u007f \u0001 \n / \\ \""}"#
        );
        assert_eq!(value_to_python_json(&json!("zoë")), r#""zo\u00eb""#);
        assert_eq!(
            value_to_python_json(&json!({"clé": "😀"})),
            r#"{"cl\u00e9": "\ud83d\ude00"}"#
        );
        let controls: String = (0u8..0x20).map(char::from).collect();
        assert_eq!(
            value_to_python_json(&Value::String(controls)),
            concat!(
                r#""\u0000\u0001\u0002\u0003\u0004\u0005\u0006\u0007\b\t\n\u000b\f\r"#,
                r#"\u000e\u000f\u0010\u0011\u0012\u0013\u0014\u0015\u0016\u0017\u0018"#,
                r#"\u0019\u001a\u001b\u001c\u001d\u001e\u001f""#
            )
        );
    }

    #[test]
    fn floats_are_written_like_python_repr() {
        // Left: the float; right: CPython 3.11 `json.dumps` of it.
        let cases: &[(f64, &str)] = &[
            (1.0, "1.0"),
            (1e16, "1e+16"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (-0.0, "-0.0"),
            (0.0, "0.0"),
            (1.5e-7, "1.5e-07"),
            (123456789012345678.0, "1.2345678901234568e+17"),
            (0.1, "0.1"),
            (1e22, "1e+22"),
            (5e-324, "5e-324"),
            (f64::MAX, "1.7976931348623157e+308"),
            (100.0, "100.0"),
            (1234567890123456.0, "1234567890123456.0"),
            (12345678901234567.0, "1.2345678901234568e+16"),
            (-2.5, "-2.5"),
            (-1e100, "-1e+100"),
            (6.02214076e23, "6.02214076e+23"),
            // Exact ties between two shortest candidates: Python rounds half to even.
            (579862326618294.0 + 0.25, "579862326618294.2"),
            (-(633018349089.0 + 0.78125), "-633018349089.7812"),
            (0.3, "0.3"),
            (1.0 / 3.0, "0.3333333333333333"),
            (2.5e-5, "2.5e-05"),
            (123.456, "123.456"),
        ];
        for &(value, expected) in cases {
            assert_eq!(value_to_python_json(&json!(value)), expected, "{value:?}");
        }
        assert_eq!(python_float_repr(f64::NAN), "NaN");
        assert_eq!(python_float_repr(f64::NEG_INFINITY), "-Infinity");
    }

    #[test]
    fn parsed_text_reencodes_to_the_same_bytes() {
        let text = r#"{"x": [1.0, -3, 2.5e-07, "caf\u00e9"], "y": {"z": false}}"#;
        let value: Value = serde_json::from_str(text).unwrap();
        assert_eq!(value_to_python_json(&value), text);
    }
}
