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
use std::mem::MaybeUninit;

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
    write_python_str_content(out, text);
    out.push('"');
}

/// What escaped text is appended to: a body's bytes, or a string (the escapes
/// are ASCII and the runs between them whole characters, so it stays a string
/// without being checked again).
pub(crate) trait EscapedText {
    /// The run `text[at..end]` that needs no escape: ASCII, so both its ends
    /// fall between characters.
    fn push_run(&mut self, text: &str, at: usize, end: usize);
    /// An escape: ASCII bytes only.
    fn push_escape(&mut self, escape: &[u8]);
    /// Escapes whole chunks of sixteen ASCII bytes from the start of
    /// `input`, as many as it can in one go; how many bytes it took (0 where
    /// there is no such fast way).
    fn push_ascii_chunks(&mut self, _input: &[u8]) -> usize {
        0
    }
}

impl EscapedText for Vec<u8> {
    fn push_run(&mut self, text: &str, at: usize, end: usize) {
        self.extend_from_slice(text.as_bytes().get(at..end).unwrap_or_default());
    }

    fn push_escape(&mut self, escape: &[u8]) {
        self.extend_from_slice(escape);
    }

    /// Each chunk is escaped into the spare room by [`escape_chunk`]. Stops
    /// at a chunk with a byte outside ASCII (the caller escapes its
    /// characters) or where fewer than sixteen bytes are left.
    fn push_ascii_chunks(&mut self, input: &[u8]) -> usize {
        let mut r = 0;
        while let Some(chunk) = input.get(r..).and_then(|rest| rest.first_chunk::<16>()) {
            if !chunk.is_ascii() {
                break;
            }
            self.reserve(CHUNK_ROOM);
            let Some(w) = escape_chunk(self.spare_capacity_mut(), input, r) else {
                break;
            };
            // SAFETY: `escape_chunk` wrote the first `w` bytes of the spare
            // room (its own comment says how), and checked every write
            // against the room, so they are within the capacity.
            unsafe { self.set_len(self.len() + w) };
            r += 16;
        }
        r
    }
}

/// The room [`escape_chunk`] needs: sixteen `\u00XX`, and sixteen bytes
/// copied after the last.
const CHUNK_ROOM: usize = 16 * 6 + 16;

/// Escapes the sixteen ASCII bytes of `input` at `start` into the start of
/// `room`, as Python does; how many bytes it wrote, or `None` when `room` is
/// short or there are not sixteen bytes (nothing of it is then to be used).
///
/// The chunk is copied whole (a fixed-size copy, cheaper than one of a
/// run's length), then its bytes to escape are walked by their bits: each
/// escape is written in its byte's place, and the rest of the chunk copied
/// again after it (sixteen bytes where there are, what lies past the chunk
/// written over or left out of the count). So every byte counted was written.
fn escape_chunk(room: &mut [MaybeUninit<u8>], input: &[u8], start: usize) -> Option<usize> {
    let chunk = input.get(start..)?.first_chunk::<16>()?;
    put(room, 0, chunk)?;
    let (mut r, mut w) = (start, 0);
    let mut specials = python_escapes16(chunk);
    while specials != 0 {
        let next = start + specials.trailing_zeros() as usize;
        specials &= specials - 1;
        w += next - r;
        let byte = *input.get(next)?;
        w += match ESCAPE[usize::from(byte)] {
            b'u' => {
                put(room, w, &unit_escape(u16::from(byte)))?;
                6
            }
            short => {
                put(room, w, &[b'\\', short])?;
                2
            }
        };
        r = next + 1;
        match input.get(r..).and_then(|rest| rest.first_chunk::<16>()) {
            Some(rest) => put(room, w, rest)?,
            None => {
                let rest = input.get(r..start + 16)?;
                write_all(room.get_mut(w..w + rest.len())?, rest);
            }
        }
    }
    Some(w + start + 16 - r)
}

/// Writes `bytes` into `slots`, as many as both have.
fn write_all(slots: &mut [MaybeUninit<u8>], bytes: &[u8]) {
    for (slot, byte) in slots.iter_mut().zip(bytes) {
        slot.write(*byte);
    }
}

impl EscapedText for String {
    fn push_run(&mut self, text: &str, at: usize, end: usize) {
        self.push_str(text.get(at..end).unwrap_or_default());
    }

    fn push_escape(&mut self, escape: &[u8]) {
        debug_assert!(escape.is_ascii());
        self.extend(escape.iter().map(|&byte| char::from(byte)));
    }
}

/// [`write_python_str`] without the quotes: `text` escaped for the inside of a
/// string literal, appended to `out`.
pub(crate) fn write_python_str_content(out: &mut impl EscapedText, text: &str) {
    escape_python_str::<false>(out, text);
}

/// [`write_python_str_content`] into a body's bytes, its ASCII taken sixteen
/// bytes at a time ([`EscapedText::push_ascii_chunks`]): for long text with
/// escapes every few bytes, such as a request written into its envelope. Text
/// already escaped once, with an escape every other byte or so, costs more
/// this way than run by run (a copy of sixteen bytes after each escape).
pub(crate) fn write_python_str_content_chunked(out: &mut Vec<u8>, text: &str) {
    escape_python_str::<true>(out, text);
}

/// The escaper of both, with or without the chunks.
fn escape_python_str<const CHUNKED: bool>(out: &mut impl EscapedText, text: &str) {
    let mut at = 0;
    let input = text.as_bytes();
    loop {
        if CHUNKED {
            at += out.push_ascii_chunks(input.get(at..).unwrap_or_default());
        }
        let Some(&byte) = input.get(at) else {
            break;
        };
        match ESCAPE[usize::from(byte)] {
            0 => {
                let end = python_plain_end(input, at + 1);
                out.push_run(text, at, end);
                at = end;
            }
            b'u' if byte >= 0x80 => {
                // A character outside ASCII: `at` is on its first byte.
                let ch = text.get(at..).and_then(|rest| rest.chars().next());
                let ch = ch.unwrap_or('\u{fffd}');
                let mut units = [0u16; 2];
                for unit in ch.encode_utf16(&mut units) {
                    push_unit(out, *unit);
                }
                at += ch.len_utf8();
            }
            b'u' => {
                push_unit(out, u16::from(byte));
                at += 1;
            }
            short => {
                out.push_escape(&[b'\\', short]);
                at += 1;
            }
        }
    }
}

/// Where the run of bytes from `from` that Python writes as they are ends:
/// found sixteen bytes at a time, then eight, then one.
fn python_plain_end(input: &[u8], from: usize) -> usize {
    let mut end = from;
    while let Some(chunk) = input.get(end..).and_then(|rest| rest.first_chunk::<16>()) {
        match python_escapes16(chunk) {
            0 => end += 16,
            mask => return end + mask.trailing_zeros() as usize,
        }
    }
    while let Some(chunk) = input.get(end..).and_then(|rest| rest.first_chunk::<8>()) {
        if needs_escape(u64::from_le_bytes(*chunk)) {
            break;
        }
        end += 8;
    }
    while input.get(end).is_some_and(|b| ESCAPE[usize::from(*b)] == 0) {
        end += 1;
    }
    end
}

/// For each byte, how Python escapes it: 0 for not at all, the letter after the
/// backslash for a short escape, `u` for a `\uXXXX` escape.
const ESCAPE: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut byte = 0;
    while byte < 256 {
        table[byte] = match byte as u8 {
            b'"' => b'"',
            b'\\' => b'\\',
            b'\n' => b'n',
            b'\r' => b'r',
            b'\t' => b't',
            0x08 => b'b',
            0x0c => b'f',
            0x00..=0x1f | 0x7f..=0xff => b'u',
            _ => 0,
        };
        byte += 1;
    }
    table
};

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// The high bit of each lane of `word` (eight bytes, in memory order) that
/// holds `byte`. The lowest marked lane is exact: a borrow only marks lanes
/// above one that matched.
fn lanes_equal(word: u64, byte: u8) -> u64 {
    let w = word ^ (ONES * u64::from(byte));
    w.wrapping_sub(ONES) & !w & HIGH
}

/// The high bit of each lane of `word` that holds `"` or `\\`; the lowest
/// marked lane is exact.
fn quote_or_backslash_lanes(word: u64) -> u64 {
    lanes_equal(word, b'"') | lanes_equal(word, b'\\')
}

/// The high bit of each lane of `word` that holds a control character
/// (below `' '`); the lowest marked lane is exact. Bytes at or above 0x80
/// never borrow into a false positive: `!word` clears them.
fn control_lanes(word: u64) -> u64 {
    word.wrapping_sub(ONES * 0x20) & !word & HIGH
}

/// Whether any of the eight bytes of `word` needs an escape: below `' '`, DEL or above
/// (non-ASCII), `"` or `\\`. A byte-parallel test, exact for "any": a lane's high bit is
/// set where its condition holds (a borrow can only mark lanes above one that holds).
fn needs_escape(word: u64) -> bool {
    (control_lanes(word) | quote_or_backslash_lanes(word) | lanes_equal(word, 0x7f) | (word & HIGH))
        != 0
}

/// `\uXXXX` in lowercase hex, as Python writes it.
fn push_unit(out: &mut impl EscapedText, unit: u16) {
    out.push_escape(&unit_escape(unit));
}

/// The six bytes of `\uXXXX` for `unit`, in lowercase hex.
fn unit_escape(unit: u16) -> [u8; 6] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    [
        b'\\',
        b'u',
        HEX[usize::from(unit >> 12)],
        HEX[usize::from((unit >> 8) & 0xf)],
        HEX[usize::from((unit >> 4) & 0xf)],
        HEX[usize::from(unit & 0xf)],
    ]
}

/// The value of a JSON string literal (`raw` with its quotes), for long strings full of
/// escapes such as an oslo envelope's inner message. `None` when `raw` is not one well-formed
/// string literal or holds an unpaired surrogate; the caller then parses it the usual way.
pub(crate) fn unescape_json_str(raw: &str) -> Option<String> {
    match unescape_json_str_prefix(raw)? {
        (value, used) if used == raw.len() => Some(value),
        _ => None,
    }
}

/// The value of the JSON string literal `raw` starts with, and the length of that literal
/// (quotes included): [`unescape_json_str`] for a literal followed by more text.
pub(crate) fn unescape_json_str_prefix(raw: &str) -> Option<(String, usize)> {
    let inner = raw.strip_prefix('"')?.as_bytes();
    // No escape is shorter than what it stands for, so the value fits in
    // as many bytes as the literal (see [`Unescaped`]).
    let mut value = Unescaped::for_input(inner);
    loop {
        // Plain runs and the escapes of one byte.
        value.walk(inner, |bytes| match bytes.first_chunk::<2>()? {
            [b'\\', escaped] => Some((short_escape(*escaped)?, 2)),
            _ => None,
        })?;
        // The closing quote, a `\u` escape, a byte a string may not hold, or
        // one of the last fifteen bytes.
        let r = value.read;
        match *inner.get(r)? {
            b'"' => return Some((value.finish()?, r + 2)),
            b'\\' => {}
            b if b < 0x20 => return None,
            b => {
                value.put(b, 1)?;
                continue;
            }
        }
        let escaped = *inner.get(r + 1)?;
        if let Some(byte) = short_escape(escaped) {
            value.put(byte, 2)?;
            continue;
        }
        if escaped != b'u' {
            return None;
        }
        let first = hex_unit(inner.get(r + 2..r + 6)?)?;
        let (ch, used) = if (0xd800..0xdc00).contains(&first) {
            // A high surrogate must be followed by `\u` and a low one.
            if inner.get(r + 6..r + 8)? != b"\\u" {
                return None;
            }
            let second = hex_unit(inner.get(r + 8..r + 12)?)?;
            (char::decode_utf16([first, second]).next()?.ok()?, 12)
        } else {
            (char::from_u32(u32::from(first))?, 6)
        };
        let mut buf = [0u8; 4];
        value.put_all(ch.encode_utf8(&mut buf).as_bytes(), used)?;
    }
}

/// The byte a two-byte escape `\` + `escaped` stands for, if it is one.
fn short_escape(escaped: u8) -> Option<u8> {
    Some(match escaped {
        b'"' => b'"',
        b'\\' => b'\\',
        b'/' => b'/',
        b'n' => b'\n',
        b'r' => b'\r',
        b't' => b'\t',
        b'b' => 0x08,
        b'f' => 0x0c,
        _ => return None,
    })
}

/// A string's value being unescaped from its literal: written by index into
/// the spare room of a buffer as long as the literal plus sixteen bytes,
/// then given the length written. `read` is where the literal is read,
/// `written` how much of the value is written; `written` never passes
/// `read` (no escape is shorter than what it stands for), so a chunk of
/// sixteen copied whole wherever one can be read still fits.
struct Unescaped {
    buffer: Vec<u8>,
    read: usize,
    written: usize,
}

impl Unescaped {
    fn for_input(input: &[u8]) -> Unescaped {
        Unescaped {
            buffer: Vec::with_capacity(input.len() + 16),
            read: 0,
            written: 0,
        }
    }

    /// Copies `input` from `read` on: sixteen bytes at a time, each chunk
    /// copied whole (a fixed-size copy, cheaper than one of a run's length),
    /// its special bytes (`"`, `\\`, control characters) then walked by
    /// their bits. At each, `escape` gives the byte the escape there stands
    /// for and its length; what follows it is copied again, further back,
    /// and the chunk's bits still say where the next special byte is. Stops
    /// at a special byte `escape` does not take, or where fewer than sixteen
    /// bytes are left.
    #[inline(always)]
    fn walk(&mut self, input: &[u8], escape: impl Fn(&[u8]) -> Option<(u8, usize)>) -> Option<()> {
        let room = self.buffer.spare_capacity_mut();
        let (mut r, mut w) = (self.read, self.written);
        while let Some(chunk) = input.get(r..).and_then(|rest| rest.first_chunk::<16>()) {
            let start = r;
            put(room, w, chunk)?;
            let mut specials = specials16(chunk);
            let taken = loop {
                if specials == 0 {
                    w += start + 16 - r;
                    r = start + 16;
                    break true;
                }
                let next = start + specials.trailing_zeros() as usize;
                w += next - r;
                r = next;
                let Some((byte, len)) = input.get(r..).and_then(&escape) else {
                    break false;
                };
                room.get_mut(w)?.write(byte);
                w += 1;
                r += len;
                if r >= start + 16 {
                    break true;
                }
                let Some(rest) = input.get(r..).and_then(|rest| rest.first_chunk::<16>()) else {
                    break true;
                };
                put(room, w, rest)?;
                specials &= u32::MAX << (r - start);
            };
            if !taken {
                break;
            }
        }
        (self.read, self.written) = (r, w);
        Some(())
    }

    /// Writes `byte`, standing for `len` bytes of the input.
    fn put(&mut self, byte: u8, len: usize) -> Option<()> {
        self.put_all(&[byte], len)
    }

    /// Writes `bytes`, standing for `len` bytes of the input (no fewer).
    fn put_all(&mut self, bytes: &[u8], len: usize) -> Option<()> {
        if bytes.len() > len {
            return None;
        }
        let room = self.buffer.spare_capacity_mut();
        write_all(
            room.get_mut(self.written..self.written + bytes.len())?,
            bytes,
        );
        self.written += bytes.len();
        self.read += len;
        Some(())
    }

    /// The value written, if it is UTF-8.
    fn finish(mut self) -> Option<String> {
        // SAFETY: every byte before `written` was written (`walk` and
        // `put_all` only move `written` past bytes they wrote; a run `walk`
        // skips over lies in the chunk it copied last), and `written` is
        // within the capacity, which every write checked.
        unsafe { self.buffer.set_len(self.written) };
        String::from_utf8(self.buffer).ok()
    }
}

/// Where the characters at byte offsets `targets` (ascending) of a string
/// literal's value begin in its escaped text (`escaped`: the literal without
/// its opening quote, and whatever follows it), appended to `out`. An offset
/// equal to the value's length maps to the closing quote. `None` when a
/// target falls inside a character or past the value, or the escapes are
/// not well formed: the caller then writes the text out itself.
///
/// This is what lets a relay copy a message's escaped text as received and
/// splice only the values it changes, instead of unescaping and escaping the
/// whole of it again.
pub(crate) fn escaped_offsets(
    escaped: &[u8],
    targets: &[usize],
    out: &mut Vec<usize>,
) -> Option<()> {
    let mut targets = targets.iter().copied().peekable();
    // `e` walks the escaped text, `u` the value it stands for.
    let (mut e, mut u) = (0, 0);
    loop {
        let rest = escaped.get(e..)?;
        // Doubly escaped text is dense with escapes: a run of length zero
        // is common and found without a search.
        let run = plain_run(rest)?;
        while let Some(target) = targets.next_if(|t| *t <= u + run) {
            out.push(e + (target - u));
        }
        if targets.peek().is_none() {
            return Some(());
        }
        e += run;
        u += run;
        if rest.get(run)? == &b'"' {
            return None;
        }
        let (escape_len, value_len) = match escaped.get(e + 1)? {
            b'u' => {
                let unit = hex_unit(escaped.get(e + 2..e + 6)?)?;
                match unit {
                    0xd800..=0xdbff => (12, 4),
                    0..=0x7f => (6, 1),
                    0x80..=0x7ff => (6, 2),
                    _ => (6, 3),
                }
            }
            _ => (2, 1),
        };
        if targets.peek().is_some_and(|t| *t < u + value_len) {
            return None;
        }
        e += escape_len;
        u += value_len;
    }
}

/// `\\\"`, the escape of a `"` inside a literal inside a literal, as a word.
const ESCAPED_QUOTE: u32 = u32::from_le_bytes(*b"\\\\\\\"");
/// `\\\\`, the escape of a `\` inside a literal inside a literal, as a word.
const ESCAPED_BACKSLASH: u32 = u32::from_le_bytes(*b"\\\\\\\\");

/// The value of a string literal nested in another (a JSON text held as a
/// string inside a JSON text held as a string), read straight from the outer
/// literal's escaped text, when every escape at both levels is `\"` or `\\`:
/// a `"` of the value is written `\\\"` there (four bytes), a `\` is written
/// `\\\\`. `escaped` starts just after the inner literal's opening quote; the
/// answer is the value and where, in `escaped`, the `\"` that closes the
/// inner literal begins. `None` for any other escape or a control character:
/// the caller then unescapes one level at a time.
pub(crate) fn unescape_doubly_plain(escaped: &[u8]) -> Option<(String, usize)> {
    // Each escape as one word: two comparisons.
    let one = |bytes: &[u8]| match u32::from_le_bytes(*bytes.first_chunk::<4>()?) {
        ESCAPED_QUOTE => Some((b'"', 4)),
        ESCAPED_BACKSLASH => Some((b'\\', 4)),
        _ => None,
    };
    let mut value = Unescaped::for_input(escaped);
    loop {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("ssse3") {
            // SAFETY: the CPU has SSSE3, checked just above.
            unsafe { unescape_quotes_ssse3(&mut value, escaped) };
        }
        value.walk(escaped, one)?;
        // Another special byte, or one of the last fifteen bytes.
        let r = value.read;
        match escaped.get(r..)? {
            // `\"` closes the inner literal; a bare `"` would close the outer.
            [b'\\', b'"', ..] => return Some((value.finish()?, r)),
            rest @ [b'\\', ..] => {
                let (byte, len) = one(rest)?;
                value.put(byte, len)?;
            }
            [b'"', ..] | [] => return None,
            [b, ..] if *b < 0x20 => return None,
            [b, ..] => value.put(*b, 1)?,
        }
    }
}

/// [`unescape_doubly_plain`]'s bulk, sixteen bytes a step whatever they
/// hold: in a chunk whose only escapes are `\\\"` (a quote of the value)
/// lying wholly within it, which is most of a Nova message's text, the
/// backslashes are dropped with one shuffle per half instead of one step
/// per escape. Another chunk is copied up to its first special byte, and
/// an escape there (`\\\"` or `\\\\`) taken. Stops where fewer than
/// sixteen bytes are left or at a special byte it does not take (the end
/// of the value, a bad escape), for [`Unescaped::walk`] and its caller.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "ssse3")]
fn unescape_quotes_ssse3(value: &mut Unescaped, input: &[u8]) {
    use std::arch::x86_64::{
        _mm_add_epi8, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_min_epu8, _mm_movemask_epi8,
        _mm_set1_epi8, _mm_set_epi64x, _mm_shuffle_epi8, _mm_srli_si128, _mm_storel_epi64,
        _mm_storeu_si128,
    };
    let room = value.buffer.spare_capacity_mut();
    let (mut r, mut w) = (value.read, value.written);
    let upper_half = _mm_set_epi64x(0x0808_0808_0808_0808, 0);
    while let Some(chunk) = input.get(r..).and_then(|rest| rest.first_chunk::<16>()) {
        // Sixteen bytes of room at `w`: `w` never passes `r`, and the room
        // is the input's length and sixteen.
        let Some(slot) = room.get_mut(w..w + 16) else {
            break;
        };
        let out = slot.as_mut_ptr().cast::<u8>();
        // SAFETY: `chunk` is sixteen bytes, what an unaligned load reads.
        let v = unsafe { _mm_loadu_si128(chunk.as_ptr().cast()) };
        let backslashes = _mm_movemask_epi8(_mm_cmpeq_epi8(v, _mm_set1_epi8(b'\\' as i8))) as u32;
        let quotes = _mm_movemask_epi8(_mm_cmpeq_epi8(v, _mm_set1_epi8(b'"' as i8))) as u32;
        // Below ' ' exactly when the unsigned minimum with 0x1f is the byte.
        let controls =
            _mm_movemask_epi8(_mm_cmpeq_epi8(_mm_min_epu8(v, _mm_set1_epi8(0x1f)), v)) as u32;
        if backslashes | quotes | controls == 0 {
            // SAFETY: `slot` is sixteen bytes of room.
            unsafe { _mm_storeu_si128(out.cast(), v) };
            r += 16;
            w += 16;
            continue;
        }
        // A chunk starts where an escape does or after one, so each run of
        // backslashes starts in it. Only runs of three, each followed by
        // its quote in the chunk, and nothing else special: `\\\"` alone.
        let starts = backslashes & !(backslashes << 1);
        if controls == 0
            && backslashes == starts | starts << 1 | starts << 2
            && quotes == starts << 3
            && quotes < 1 << 16
        {
            // The bytes kept, all but the backslashes, packed by halves.
            let kept = !backslashes & 0xffff;
            let (low, high) = ((kept & 0xff) as usize, (kept >> 8) as usize);
            let order = _mm_add_epi8(_mm_set_epi64x(PACK[high], PACK[low]), upper_half);
            let packed = _mm_shuffle_epi8(v, order);
            let low_len = low.count_ones() as usize;
            // SAFETY: both stores are of eight bytes within `slot`, the
            // second at `low_len` (at most eight) from its start.
            unsafe {
                _mm_storel_epi64(out.cast(), packed);
                _mm_storel_epi64(out.add(low_len).cast(), _mm_srli_si128::<8>(packed));
            }
            r += 16;
            w += low_len + high.count_ones() as usize;
            continue;
        }
        // Up to the first special byte, then the escape there, if it is one.
        let plain = (backslashes | quotes | controls).trailing_zeros() as usize;
        // SAFETY: `slot` is sixteen bytes of room.
        unsafe { _mm_storeu_si128(out.cast(), v) };
        r += plain;
        w += plain;
        let byte = match input.get(r..).and_then(|rest| rest.first_chunk::<4>()) {
            Some(escape) if u32::from_le_bytes(*escape) == ESCAPED_QUOTE => b'"',
            Some(escape) if u32::from_le_bytes(*escape) == ESCAPED_BACKSLASH => b'\\',
            _ => break,
        };
        let Some(at) = room.get_mut(w) else { break };
        at.write(byte);
        r += 4;
        w += 1;
    }
    (value.read, value.written) = (r, w);
}

/// For each set of bytes of eight kept (a bit each), the shuffle that packs
/// them to the front, in order; its other lanes zero their byte.
#[cfg(target_arch = "x86_64")]
static PACK: [i64; 256] = {
    let mut table = [0i64; 256];
    let mut kept = 0;
    while kept < 256 {
        let mut lanes = [0x80u8; 8];
        let (mut from, mut to) = (0, 0);
        while from < 8 {
            if kept & (1 << from) != 0 {
                lanes[to] = from as u8;
                to += 1;
            }
            from += 1;
        }
        table[kept] = i64::from_le_bytes(lanes);
        kept += 1;
    }
    table
};

/// Writes the `N` bytes into `room` at `at`; `None` when they do not fit.
fn put<const N: usize>(room: &mut [MaybeUninit<u8>], at: usize, bytes: &[u8; N]) -> Option<()> {
    let slot = room.get_mut(at..)?.first_chunk_mut::<N>()?;
    *slot = bytes.map(MaybeUninit::new);
    Some(())
}

/// How many bytes `bytes` starts with that a string may hold as they are
/// (not `"`, `\\` or a control character), sixteen at a time, then eight;
/// it may stop short of the end when fewer than eight are left.
pub(super) fn plain_prefix(bytes: &[u8]) -> usize {
    let mut at = 0;
    while let Some(chunk) = bytes.get(at..).and_then(|rest| rest.first_chunk::<16>()) {
        match first_special16(chunk) {
            16 => at += 16,
            plain => return at + plain,
        }
    }
    while let Some(chunk) = bytes.get(at..).and_then(|rest| rest.first_chunk::<8>()) {
        match first_special8(chunk) {
            8 => at += 8,
            plain => return at + plain,
        }
    }
    at
}

/// How many of the sixteen bytes come before the first `"`, `\\` or
/// control character: 16 when there is none.
fn first_special16(chunk: &[u8; 16]) -> usize {
    (specials16(chunk) | 1 << 16).trailing_zeros() as usize
}

/// A bit for each of the sixteen bytes that is `"`, `\\` or a control
/// character (bit 0 for the first byte).
pub(super) fn specials16(chunk: &[u8; 16]) -> u32 {
    marked16::<false>(chunk)
}

/// A bit for each of the sixteen bytes that Python escapes in a string
/// ([`ESCAPE`]): [`specials16`]'s, DEL and every byte outside ASCII.
fn python_escapes16(chunk: &[u8; 16]) -> u32 {
    marked16::<true>(chunk)
}

/// [`specials16`], or with `OUTSIDE_PRINTABLE` [`python_escapes16`]: with
/// SSE2 where the build has it (every x86-64 does), else a byte at a time.
fn marked16<const OUTSIDE_PRINTABLE: bool>(chunk: &[u8; 16]) -> u32 {
    #[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
    {
        // SAFETY: `special16` needs SSE2, which this build enables, so
        // every CPU it runs on has it.
        unsafe { special16::<OUTSIDE_PRINTABLE>(chunk) }
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "sse2")))]
    {
        marked16_bytewise::<OUTSIDE_PRINTABLE>(chunk)
    }
}

/// [`marked16`] a byte at a time: where there is no SSE2, and, where there
/// is, in the tests, to hold the SSE2 search to.
#[cfg_attr(all(target_arch = "x86_64", target_feature = "sse2"), cfg(test))]
fn marked16_bytewise<const OUTSIDE_PRINTABLE: bool>(chunk: &[u8; 16]) -> u32 {
    chunk
        .iter()
        .enumerate()
        .filter(|(_, b)| {
            matches!(**b, b'"' | b'\\' | 0..=0x1f) || (OUTSIDE_PRINTABLE && **b >= 0x7f)
        })
        .fold(0, |mask, (i, _)| mask | 1 << i)
}

/// [`first_special16`] for eight bytes.
fn first_special8(chunk: &[u8; 8]) -> usize {
    let word = u64::from_le_bytes(*chunk);
    // The lowest marked lane is exact.
    (quote_or_backslash_lanes(word) | control_lanes(word)).trailing_zeros() as usize / 8
}

/// A bit for each of the sixteen bytes that is `"`, `\\` or below `' '`,
/// and with `OUTSIDE_PRINTABLE`, DEL or above.
#[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
#[target_feature(enable = "sse2")]
fn special16<const OUTSIDE_PRINTABLE: bool>(chunk: &[u8; 16]) -> u32 {
    use std::arch::x86_64::{
        _mm_cmpeq_epi8, _mm_min_epu8, _mm_movemask_epi8, _mm_or_si128, _mm_set1_epi8,
        _mm_set_epi64x,
    };
    let (low, high) = chunk.split_at(8);
    let word = |half: &[u8]| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(half);
        i64::from_le_bytes(bytes)
    };
    let v = _mm_set_epi64x(word(high), word(low));
    let quote = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'"' as i8));
    let backslash = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'\\' as i8));
    // Below ' ' exactly when the unsigned minimum with 0x1f is the byte.
    let control = _mm_cmpeq_epi8(_mm_min_epu8(v, _mm_set1_epi8(0x1f)), v);
    let mut found = _mm_or_si128(_mm_or_si128(quote, backslash), control);
    if OUTSIDE_PRINTABLE {
        // DEL, and the bytes from 0x80 by their own high bit, which is
        // what the mask is made of.
        let del = _mm_cmpeq_epi8(v, _mm_set1_epi8(0x7f));
        found = _mm_or_si128(_mm_or_si128(found, del), v);
    }
    _mm_movemask_epi8(found) as u32
}

/// [`escaped_offsets`] for text whose only escapes are `\"` and `\\` (what
/// Python writes for ASCII text without control characters), found by
/// counting instead of walking the escapes. Each `"` and `\` of `value` takes
/// `extra` bytes more in the escaped text: 1 for a literal, 3 for a literal
/// inside a literal. `escaped_len` is the escaped text's length. `None` when
/// it has other escapes (its length says so) or a target is past the value.
pub(crate) fn plain_escaped_offsets(
    value: &[u8],
    escaped_len: usize,
    extra: usize,
    targets: &[usize],
    out: &mut Vec<usize>,
) -> Option<()> {
    let (mut from, mut escapes) = (0, 0);
    for &target in targets {
        escapes += quotes_and_backslashes(value.get(from..target)?);
        out.push(target + extra * escapes);
        from = target;
    }
    escapes += quotes_and_backslashes(value.get(from..)?);
    // Every `"` and `\` takes `extra` bytes more; any other escape would take
    // more still, so equal lengths mean there is none.
    (escaped_len == value.len() + extra * escapes).then_some(())
}

/// [`plain_escaped_offsets`] for text known to hold no other escape (as
/// [`unescape_doubly_plain`] reads it), counted back from its end: a target
/// lies as far before the escaped text's end (`escaped_len`) as what follows
/// it takes escaped. It reads only what follows the first target, which for
/// a relay's edits (Nova writes the routing fields last) is the end of the
/// message, not its arguments. `None` when the targets are not ascending
/// within the value, or the value is longer than its escaped text.
pub(crate) fn plain_escaped_offsets_from_end(
    value: &[u8],
    escaped_len: usize,
    extra: usize,
    targets: &[usize],
    out: &mut Vec<usize>,
) -> Option<()> {
    let first = out.len();
    let (mut to, mut escapes) = (value.len(), 0);
    for &target in targets.iter().rev() {
        escapes += quotes_and_backslashes(value.get(target..to)?);
        out.push(escaped_len.checked_sub(value.len() - target + extra * escapes)?);
        to = target;
    }
    out.get_mut(first..)?.reverse();
    Some(())
}

/// How many bytes of `bytes` are `"` or `\\`: sixteen at a time with SSE2
/// where the build has it (every x86-64 does), else eight at a time.
fn quotes_and_backslashes(bytes: &[u8]) -> usize {
    #[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
    {
        let mut chunks = bytes.chunks_exact(16);
        let mut count = 0;
        loop {
            // SAFETY: `count_chunks` needs SSE2, which this build enables,
            // so every CPU it runs on has it.
            let (found, taken) = unsafe { count_chunks(&mut chunks) };
            count += found;
            if taken < LANE_MOST {
                break;
            }
        }
        count + quotes_and_backslashes_in_words(chunks.remainder())
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "sse2")))]
    {
        quotes_and_backslashes_in_words(bytes)
    }
}

/// How many chunks [`count_chunks`] takes at most: a byte lane counts to 255.
#[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
const LANE_MOST: usize = 255;

/// The `"` and `\\` in up to [`LANE_MOST`] chunks of sixteen, counted in
/// byte lanes and summed at the end; how many there were, and how many
/// chunks were taken.
#[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
#[target_feature(enable = "sse2")]
fn count_chunks(chunks: &mut std::slice::ChunksExact<'_, u8>) -> (usize, usize) {
    use std::arch::x86_64::{
        _mm_cmpeq_epi8, _mm_cvtsi128_si32, _mm_extract_epi16, _mm_loadu_si128, _mm_or_si128,
        _mm_sad_epu8, _mm_set1_epi8, _mm_setzero_si128, _mm_sub_epi8,
    };
    let (quote, backslash) = (_mm_set1_epi8(b'"' as i8), _mm_set1_epi8(b'\\' as i8));
    let mut lanes = _mm_setzero_si128();
    let mut taken = 0;
    while taken < LANE_MOST {
        let Some(chunk) = chunks.next() else { break };
        // SAFETY: `chunk` is sixteen bytes, what an unaligned load reads.
        let v = unsafe { _mm_loadu_si128(chunk.as_ptr().cast()) };
        // A found byte compares to -1: subtracting it counts one.
        let found = _mm_or_si128(_mm_cmpeq_epi8(v, quote), _mm_cmpeq_epi8(v, backslash));
        lanes = _mm_sub_epi8(lanes, found);
        taken += 1;
    }
    // The lanes summed by halves, each sum in the low 16 bits of its half.
    let sums = _mm_sad_epu8(lanes, _mm_setzero_si128());
    let low = _mm_cvtsi128_si32(sums) as u32 as usize;
    let high = _mm_extract_epi16::<4>(sums) as u32 as usize;
    (low + high, taken)
}

/// [`quotes_and_backslashes`] eight bytes at a time: where there is no
/// SSE2, for the last bytes where there is, and in the tests.
fn quotes_and_backslashes_in_words(bytes: &[u8]) -> usize {
    const LOW: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    // The high bit of each lane that is zero, exactly (no borrow between lanes).
    let zero_lanes = |w: u64| !(((w & LOW) + LOW) | w | LOW);
    let mut words = bytes.chunks_exact(8);
    let mut count = 0;
    for chunk in &mut words {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let word = u64::from_le_bytes(word);
        let found = zero_lanes(word ^ (ONES * u64::from(b'"')))
            | zero_lanes(word ^ (ONES * u64::from(b'\\')));
        count += found.count_ones() as usize;
    }
    count
        + words
            .remainder()
            .iter()
            .filter(|b| **b == b'"' || **b == b'\\')
            .count()
}

/// The length of the run of `bytes` before its first `\\` or `"`, if it has
/// one. Escaped JSON (and more so JSON escaped twice) has many short runs:
/// the first eight bytes are tested together, and only a longer run is
/// left to `memchr`.
fn plain_run(bytes: &[u8]) -> Option<usize> {
    if let Some(chunk) = bytes.first_chunk::<8>() {
        let found = quote_or_backslash_lanes(u64::from_le_bytes(*chunk));
        if found != 0 {
            return Some(found.trailing_zeros() as usize / 8);
        }
        return memchr::memchr2(b'\\', b'"', &bytes[8..]).map(|at| at + 8);
    }
    bytes.iter().position(|b| *b == b'\\' || *b == b'"')
}

fn hex_unit(digits: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(digits).ok()?;
    u16::from_str_radix(text, 16).ok()
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

    proptest::proptest! {
        #[test]
        fn sixteen_bytes_are_searched_as_one_at_a_time(
            chunk in proptest::prop_oneof![
                proptest::array::uniform16(proptest::prelude::any::<u8>()),
                proptest::array::uniform16(proptest::sample::select(
                    &b"ab\"\\\x00\x1f\x20\x7f\x80\xff"[..]
                )),
            ]
        ) {
            proptest::prop_assert_eq!(specials16(&chunk), marked16_bytewise::<false>(&chunk));
            proptest::prop_assert_eq!(python_escapes16(&chunk), marked16_bytewise::<true>(&chunk));
            // The bytes Python escapes are those of its table.
            let by_table = chunk
                .iter()
                .enumerate()
                .filter(|(_, b)| ESCAPE[usize::from(**b)] != 0)
                .fold(0, |mask, (i, _)| mask | 1 << i);
            proptest::prop_assert_eq!(python_escapes16(&chunk), by_table);
        }

        #[test]
        fn quotes_and_backslashes_are_counted_as_one_at_a_time(
            bytes in proptest::collection::vec(
                proptest::sample::select(&b"a\"\\\x00\xff"[..]),
                0..5000,
            )
        ) {
            let one_at_a_time = bytes.iter().filter(|b| matches!(**b, b'"' | b'\\')).count();
            proptest::prop_assert_eq!(quotes_and_backslashes(&bytes), one_at_a_time);
        }
    }

    #[test]
    fn the_plain_prefix_ends_at_the_first_special_byte() {
        let text = b"abcdefghijklmnopqrstuvwxyz0123456789";
        // It may stop short of a special byte (never past it) only where
        // fewer than eight bytes are left.
        let ends_well = |bytes: &[u8], special_at: usize| {
            let got = plain_prefix(bytes);
            got == special_at || (got < special_at && bytes.len() - got < 8)
        };
        for at in 0..text.len() {
            for special in [b'"', b'\\', 0x01, 0x1f] {
                let mut bytes = text.to_vec();
                bytes[at] = special;
                assert!(ends_well(&bytes, at), "{special:#x} at {at}");
            }
            // DEL and non-ASCII bytes are plain.
            let mut bytes = text.to_vec();
            bytes[at] = 0x7f;
            bytes[(at + 1) % text.len()] = 0xc3;
            assert!(ends_well(&bytes, text.len()), "DEL at {at}");
        }
    }

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
