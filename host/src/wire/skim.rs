//! The relay's fast path: a cells cast read without building its JSON trees, and written
//! back by splicing.
//!
//! A relay changes three fields of the cells message (`routing_path`, `hop_count`,
//! `max_hop_count`) and gives the oslo envelope a new `_unique_id`; the context and the
//! method's arguments pass through untouched. [`Skim::read`] parses each layer once into
//! borrowed raw values, keeps the byte spans of what a relay rewrites and checks every field
//! the full decoder checks. [`Skim::relay_body`] and [`Skim::local_body`] then write the new
//! bodies by copying the untouched text and splicing in the new values, escaping each layer
//! once.
//!
//! The skim takes only what it can carry out exactly as the full path would: a cast (no
//! `_msg_id`) of `process_message` holding a well-formed targeted or broadcast message that
//! wants no response, with no repeated keys among the fields it reads. For anything else it
//! answers `None` and the caller takes the full path ([`super::decode_request`]), which also
//! gives the precise error of a bad body. Text written here decodes to the same request and
//! cells message as the full path's re-encoding (a property test in this file holds the two
//! to that); it is not byte-for-byte the same, since untouched values keep the sender's
//! formatting.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use super::cells::{Direction, MessageType, KNOWN_KEYS};
use super::json::{
    escaped_offsets, plain_escaped_offsets, plain_escaped_offsets_from_end, plain_prefix,
    unescape_doubly_plain, unescape_json_str, unescape_json_str_prefix, write_python_str,
    write_python_str_content, write_python_str_content_chunked,
};
use super::scan;

/// Keys of `extra` the skim reads besides the cells message's own
/// ([`KNOWN_KEYS`]); a repetition of any of them sends a message down the
/// full path.
const EXTRA_KEYS: [&str; 2] = ["run_locally", "cellhost_timeout_ms"];

/// Request keys whose repetition sends a message down the full path.
const REQUEST_KEYS: [&str; 8] = [
    "method",
    "args",
    "version",
    "_unique_id",
    "namespace",
    "_msg_id",
    "_reply_q",
    "_timeout",
];

/// What routing needs of a cells cast, with the text a relay copies.
#[derive(Debug, Clone)]
pub struct Skim {
    /// The cells message's own JSON text (`args.message`, unescaped).
    cells: String,
    ctxt: Range<usize>,
    method_kwargs: Range<usize>,
    routing_path: Range<usize>,
    hop_count_at: Range<usize>,
    max_hop_count_at: Range<usize>,
    pub message_type: MessageType,
    pub direction: Direction,
    pub fanout: bool,
    pub run_locally: bool,
    pub hop_count: u32,
    pub max_hop_count: u32,
    pub uuid: String,
    pub method_name: String,
    /// The path so far; empty when the message enters the tree here.
    pub path: String,
    pub target_cell: Option<String>,
    /// The request's text as received, when the body is laid out as
    /// oslo.messaging writes it: a relay then copies the escaped text.
    received: Option<Received>,
}

/// Where the cells message lies in a body laid out as oslo.messaging writes
/// it (the envelope's head, then the request's head up to the cells message).
#[derive(Debug, Clone)]
enum Received {
    /// Escaped twice with nothing but `\"` and `\\` (what Python writes
    /// for ASCII text without control characters): its text begins at
    /// `cells_at` in the body. `unique_id_at` is where the request's
    /// `_unique_id` value lies in the body when the rest of the request is
    /// what a relay writes there ([`Skim::tail_as_written`]): a relay then
    /// copies it and puts only a new id in.
    DoublyPlain {
        cells_at: Range<usize>,
        unique_id_at: Option<Range<usize>>,
    },
    /// Escaped otherwise: the request, unescaped from the envelope, and
    /// where the cells message's escaped text lies in it (between its quotes).
    Request {
        request: String,
        cells_at: Range<usize>,
    },
}

impl Skim {
    /// Reads a body of at most `limit` bytes, or `None` when it needs the full path.
    pub fn read(body: &[u8], limit: usize) -> Option<Skim> {
        if body.len() > limit {
            return None;
        }
        if let Some(skim) = Skim::read_doubly_plain(body) {
            return Some(skim);
        }
        let text = std::str::from_utf8(body).ok()?;
        // What oslo.messaging writes is read without a parse of the whole
        // envelope: its one string literal is unescaped (and checked) directly.
        let mut headed = false;
        let inner = match text
            .strip_prefix(ENVELOPE_HEAD)
            .and_then(|rest| rest.strip_suffix('}'))
        {
            Some(literal) => {
                headed = true;
                unescape_json_str(literal)?
            }
            None => {
                let outer = Entries::read(text)?;
                if parse_str(outer.single("oslo.version")??)? != "2.0" {
                    return None;
                }
                unescape_json_str(outer.single("oslo.message")??)?
            }
        };
        // Likewise the request oslo.messaging writes for `process_message`:
        // the cells message is unescaped where it starts, and only the keys
        // after `args` are parsed.
        if let Some(rest) = inner.strip_prefix(REQUEST_HEAD) {
            let (cells, used) = unescape_json_str_prefix(rest)?;
            check_request_after_cells(rest.get(used..)?.to_string())?;
            let mut skim = Skim::read_cells(cells)?;
            if headed {
                skim.received = Some(Received::Request {
                    request: inner,
                    cells_at: REQUEST_HEAD.len() + 1..REQUEST_HEAD.len() + used - 1,
                });
            }
            return Some(skim);
        }
        let request = RequestKeys::read(&inner)?;
        if parse_str(request.single("method")??)? != "process_message" {
            return None;
        }
        check_cast(&request)?;
        let args = Entries::read(request.single("args")??)?;
        let cells = unescape_json_str(args.single("message")??)?;
        Skim::read_cells(cells)
    }

    /// The common case, read in one pass: the envelope and the request
    /// laid out as oslo.messaging writes them, and the cells message escaped
    /// with nothing but `\"` and `\\` at both levels. The cells message is
    /// unescaped straight from the body, without the request's text in
    /// between; `None` leaves the body to [`Skim::read`]'s other ways.
    ///
    /// The body is not checked as UTF-8 as a whole: its heads are ASCII,
    /// the cells message is checked once unescaped (each escape stands for
    /// one ASCII byte, so the unescaped text is UTF-8 exactly when the
    /// escaped one is), and the rest of the request on its own.
    fn read_doubly_plain(body: &[u8]) -> Option<Skim> {
        let literal = body
            .strip_prefix(ENVELOPE_HEAD.as_bytes())?
            .strip_suffix(b"}")?;
        let cells_text = literal
            .strip_prefix(b"\"")?
            .strip_prefix(ESCAPED_REQUEST_HEAD.as_bytes())?;
        let cells_at = body.len() - 1 - cells_text.len();
        let (cells, end) = unescape_doubly_plain(cells_text)?;
        let mut skim = Skim::read_cells(cells)?;
        // What oslo.messaging writes after the cells message is what a relay
        // writes there: recognised as such, it needs no other check.
        let unique_id_at = skim.tail_as_written(body, cells_at + end);
        if unique_id_at.is_none() {
            // From the `"` that closes the cells message's literal in the
            // request: what follows it in the request, as one literal.
            let rest = std::str::from_utf8(cells_text.get(end + 1..)?).ok()?;
            let after = unescape_json_str(rest)?;
            check_request_after_cells(after)?;
        }
        skim.received = Some(Received::DoublyPlain {
            cells_at: cells_at..cells_at + end,
            unique_id_at,
        });
        Some(skim)
    }

    /// Where the request's `_unique_id` value lies in `body`, when the body
    /// from `at` (the `\"` closing the cells message's literal) to its end is
    /// exactly what [`Skim::relay_body_copied`] writes there, the id aside:
    /// `version` 1.0, a `_unique_id` of printable ASCII, the context as
    /// `_context_` keys, escaped once with `\"` and `\\` only, and the
    /// envelope's end. Such a request is a well-formed cast (no `_msg_id`, no
    /// other key, none repeated), so the checks of
    /// [`check_request_after_cells`] hold without being made. `None` for
    /// any other text, which is then checked and written the long way, and
    /// for a context with DEL or bytes outside ASCII, which Python (and so
    /// the writing) escapes as `\u` and a sender may have sent as they are.
    fn tail_as_written(&self, body: &[u8], at: usize) -> Option<Range<usize>> {
        // A word at a time for ASCII, and a vector search for DEL.
        let ctxt = self.ctxt().as_bytes();
        if !ctxt.is_ascii() || memchr::memchr(0x7f, ctxt).is_some() {
            return None;
        }
        let mut tail = EscapedCursor { body, at };
        tail.raw(TAIL_HEAD.as_bytes())?;
        let id_start = tail.at;
        let id_len = body
            .get(id_start..)?
            .iter()
            .position(|b| !matches!(b, b' '..=b'~') || *b == b'\\' || *b == b'"')?;
        tail.at += id_len;
        tail.raw(b"\\\"")?;
        scan::object_entries(self.ctxt(), |entry| {
            tail.raw(b", \\\"_context_")?;
            tail.escaped(entry.key_literal.strip_prefix('"')?)?;
            tail.raw(b": ")?;
            tail.escaped(entry.value)
        })?;
        tail.raw(b"}\"}")?;
        (tail.at == body.len()).then_some(id_start..id_start + id_len)
    }

    fn read_cells(cells: String) -> Option<Skim> {
        // The fields the skim reads, found in one pass; a repeated one sends
        // the message down the full path.
        let fields = CellsFields::read(&cells)?;
        let field = |key: &str| fields.get(key);
        let span = |raw: &str| {
            let at = raw.as_ptr() as usize - cells.as_ptr() as usize;
            at..at + raw.len()
        };
        let message_type = MessageType::from_wire(&parse_str(field("message_type")?)?)?;
        let direction = Direction::from_wire(&parse_str(field("direction")?)?)?;
        let ctxt = field("ctxt").filter(|raw| raw.starts_with('{'))?;
        let method_kwargs = field("method_kwargs").filter(|raw| raw.starts_with('{'))?;
        let need_response = parse_bool(field("need_response")?)?;
        let fanout = parse_bool(field("fanout")?)?;
        let routing_path = field("routing_path")?;
        let hop_count = field("hop_count")?;
        let max_hop_count = field("max_hop_count")?;
        let target_cell = match field("target_cell") {
            Some(raw) => parse_opt_str(raw)?,
            None => None,
        };
        if let Some(raw) = field("response_uuid") {
            parse_opt_str(raw)?;
        }
        // Only what needs no answer: responses and requests waiting for one
        // take the full path, which knows how to answer them.
        if need_response || message_type == MessageType::Response {
            return None;
        }
        if message_type != MessageType::Broadcast && target_cell.is_none() {
            return None;
        }
        let skim = Skim {
            ctxt: span(ctxt),
            method_kwargs: span(method_kwargs),
            routing_path: span(routing_path),
            hop_count_at: span(hop_count),
            max_hop_count_at: span(max_hop_count),
            message_type,
            direction,
            fanout,
            run_locally: field("run_locally").and_then(parse_bool).unwrap_or(true),
            hop_count: parse_u32(hop_count)?,
            max_hop_count: parse_u32(max_hop_count)?,
            uuid: parse_str(field("uuid")?)?.into_owned(),
            method_name: parse_str(field("method_name")?)?.into_owned(),
            path: parse_opt_str(routing_path)?
                .map(Cow::into_owned)
                .unwrap_or_default(),
            target_cell: target_cell.map(Cow::into_owned),
            cells: String::new(),
            received: None,
        };
        Some(Skim { cells, ..skim })
    }

    /// The context's JSON text, as the sender wrote it.
    pub fn ctxt(&self) -> &str {
        &self.cells[self.ctxt.clone()]
    }

    /// The method arguments' JSON text, as the sender wrote it.
    pub fn method_kwargs(&self) -> &str {
        &self.cells[self.method_kwargs.clone()]
    }

    /// The oslo cast that carries the message on, with `hop` recorded: what
    /// [`super::Request::process_message`] of the updated message writes.
    /// `body` is the body this skim was read from.
    pub fn relay_body(&self, body: &[u8], hop: &Hop, unique_id: &str) -> Vec<u8> {
        match self.relay_body_copied(body, hop, unique_id) {
            Some(relay) => relay,
            None => self.relay_body_written(hop, unique_id),
        }
    }

    /// The relay body of a message laid out as oslo.messaging writes it: the
    /// received body's text is copied as it is, still escaped twice, up to
    /// and between the values a relay changes, and only those, the new
    /// `_unique_id` and the context are escaped. `None` when the body is laid
    /// out otherwise.
    fn relay_body_copied(&self, body: &[u8], hop: &Hop, unique_id: &str) -> Option<Vec<u8>> {
        let edits = self.edits(hop);
        // The edges of each edit in the cells text, and its end.
        let mut edges = [0; 7];
        for (i, (range, _)) in edits.iter().enumerate() {
            edges[2 * i] = range.start;
            edges[2 * i + 1] = range.end;
        }
        edges[6] = self.cells.len();
        let in_body = match self.received.as_ref()? {
            Received::DoublyPlain { cells_at, .. } => {
                // Each `"` and `\` of the cells text takes four bytes there,
                // and nothing else is escaped (the read made sure).
                let mut in_body = Vec::with_capacity(7);
                plain_escaped_offsets_from_end(
                    self.cells.as_bytes(),
                    cells_at.len(),
                    3,
                    &edges,
                    &mut in_body,
                )?;
                in_body.iter_mut().for_each(|at| *at += cells_at.start);
                in_body
            }
            Received::Request { request, cells_at } => {
                Self::offsets_through_request(body, request, cells_at.clone(), &edges, &self.cells)?
            }
        };

        let mut out = Vec::with_capacity(body.len() + hop.routing_path.len() * 4 + 64);
        out.extend_from_slice(body.get(..in_body[0])?);
        let (mut once, mut twice) = (String::new(), String::new());
        for (i, (_, edit)) in edits.iter().enumerate() {
            match edit {
                // Digits read the same at every level.
                Edit::Count(n) => out.extend_from_slice(itoa::Buffer::new().format(*n).as_bytes()),
                // The new value's JSON text, escaped for the request, then for the body.
                Edit::Str(_) => {
                    once.clear();
                    edit.write(&mut once);
                    twice.clear();
                    write_python_str_content(&mut twice, &once);
                    write_python_str_content(&mut out, &twice);
                }
            }
            out.extend_from_slice(body.get(in_body[2 * i + 1]..in_body[2 * i + 2])?);
        }
        if let Some(Received::DoublyPlain {
            unique_id_at: Some(id_at),
            ..
        }) = &self.received
        {
            // The received request after the cells message is what would
            // be written here: copied, with the new id in its place.
            if unique_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            {
                out.extend_from_slice(body.get(in_body[6]..id_at.start)?);
                out.extend_from_slice(unique_id.as_bytes());
                out.extend_from_slice(body.get(id_at.end..)?);
                return Some(out);
            }
        }
        // The request after the cells message, escaped for the body.
        let mut tail = String::with_capacity(self.ctxt.len() + 128);
        tail.push_str("\"}, \"version\": \"1.0\", \"_unique_id\": ");
        write_python_str(&mut tail, unique_id);
        self.write_context(&mut tail, &[]);
        tail.push('}');
        write_python_str_content(&mut out, &tail);
        out.extend_from_slice(b"\"}");
        Some(out)
    }

    /// Where `edges` of the cells text are in `body`, through the request's
    /// text (`request`, the cells message's escaped text at `cells_at`).
    fn offsets_through_request(
        body: &[u8],
        request: &str,
        cells_at: Range<usize>,
        edges: &[usize],
        cells: &str,
    ) -> Option<Vec<usize>> {
        let request = request.as_bytes();
        let mut in_request = Vec::with_capacity(7);
        let cells_text = request.get(cells_at.start..)?;
        plain_escaped_offsets(cells.as_bytes(), cells_at.len(), 1, edges, &mut in_request)
            .or_else(|| {
                in_request.clear();
                escaped_offsets(cells_text, edges, &mut in_request)
            })?;
        in_request.iter_mut().for_each(|at| *at += cells_at.start);
        // The envelope's literal runs from after its head to the `"}` that
        // ends the body (the only layout `received` is kept for).
        let request_at = ENVELOPE_HEAD.len() + 1;
        let request_len = body.len().checked_sub(request_at + 2)?;
        let mut in_body = Vec::with_capacity(7);
        plain_escaped_offsets(request, request_len, 1, &in_request, &mut in_body).or_else(
            || {
                in_body.clear();
                escaped_offsets(body.get(request_at..)?, &in_request, &mut in_body)
            },
        )?;
        in_body.iter_mut().for_each(|at| *at += request_at);
        Some(in_body)
    }

    /// What a relay changes in the cells text, in text order.
    fn edits<'a>(&self, hop: &'a Hop) -> [(Range<usize>, Edit<'a>); 3] {
        let mut edits = [
            (self.routing_path.clone(), Edit::Str(&hop.routing_path)),
            (self.hop_count_at.clone(), Edit::Count(hop.hop_count)),
            (
                self.max_hop_count_at.clone(),
                Edit::Count(hop.max_hop_count),
            ),
        ];
        edits.sort_by_key(|(range, _)| range.start);
        edits
    }

    /// The relay body written out: the cells text with its edits, escaped
    /// for the request, and the request escaped for the envelope.
    fn relay_body_written(&self, hop: &Hop, unique_id: &str) -> Vec<u8> {
        let mut cells = String::with_capacity(self.cells.len() + hop.routing_path.len() + 16);
        let mut from = 0;
        for (range, edit) in &self.edits(hop) {
            cells.push_str(&self.cells[from..range.start]);
            edit.write(&mut cells);
            from = range.end;
        }
        cells.push_str(&self.cells[from..]);

        let mut inner = String::with_capacity(cells.len() * 11 / 10 + 128);
        inner.push_str("{\"method\": \"process_message\", \"args\": {\"message\": ");
        write_python_str(&mut inner, &cells);
        inner.push_str("}, \"version\": \"1.0\", \"_unique_id\": ");
        write_python_str(&mut inner, unique_id);
        self.write_context(&mut inner, &[]);
        inner.push('}');
        envelope(&inner)
    }

    /// The oslo cast of `method_name(**method_kwargs)` to the local worker,
    /// with the message's context plus where it came from: what the full
    /// path's local delivery of a cast writes.
    pub fn local_body(&self, hop: &Hop, unique_id: &str) -> Vec<u8> {
        let mut inner = String::with_capacity(self.cells.len() + 256);
        inner.push_str("{\"method\": ");
        write_python_str(&mut inner, &self.method_name);
        inner.push_str(", \"args\": ");
        inner.push_str(self.method_kwargs());
        inner.push_str(", \"version\": \"1.0\", \"_unique_id\": ");
        write_python_str(&mut inner, unique_id);
        // Appended last, so they win over keys of the same name in the
        // context, as inserting them into the context does.
        self.write_context(
            &mut inner,
            &[
                ("cell_routing_path", &hop.routing_path),
                ("cell_message_uuid", &self.uuid),
            ],
        );
        inner.push('}');
        envelope(&inner)
    }

    /// Each context entry as a flat `_context_<key>` request key, then `more`.
    ///
    /// A key is written as its received literal with `_context_` put in
    /// after the opening quote, its escapes left as the sender wrote them
    /// (a literal means the same with text put in front of its content), and
    /// a value as its received text.
    fn write_context(&self, out: &mut String, more: &[(&str, &str)]) {
        let before = out.len();
        let written = scan::object_entries(self.ctxt(), |entry| {
            out.push_str(", \"_context_");
            out.push_str(entry.key_literal.strip_prefix('"')?);
            out.push_str(": ");
            out.push_str(entry.value);
            Some(())
        });
        // Scanned once already in `read`, so it scans; should it not, the
        // context is left out rather than written broken.
        if written.is_none() {
            out.truncate(before);
        }
        for (name, value) in more {
            out.push_str(", \"_context_");
            // The names are the host's own: nothing in them to escape.
            out.push_str(name);
            out.push_str("\": ");
            write_python_str(out, value);
        }
    }
}

/// How the request after the cells message starts in the body, escaped
/// once, from the `\"` closing the cells message's literal to the
/// `_unique_id` value's first byte.
const TAIL_HEAD: &str = r#"\"}, \"version\": \"1.0\", \"_unique_id\": \""#;

/// Reads a body from `at` against the text expected there.
struct EscapedCursor<'a> {
    body: &'a [u8],
    at: usize,
}

impl EscapedCursor<'_> {
    /// Steps over `bytes`, if the body has them at the cursor.
    fn raw(&mut self, bytes: &[u8]) -> Option<()> {
        let end = self.at.checked_add(bytes.len())?;
        (self.body.get(self.at..end)? == bytes).then(|| self.at = end)
    }

    /// Steps over `text` escaped once as Python escapes printable ASCII
    /// (`\"` and `\\`, nothing else), if the body has it so at the cursor.
    /// `None` for a control character in `text`, which Python writes
    /// otherwise.
    fn escaped(&mut self, text: &str) -> Option<()> {
        let mut rest = text.as_bytes();
        loop {
            let run = plain_prefix(rest);
            self.raw(rest.get(..run)?)?;
            rest = rest.get(run..)?;
            let Some((&byte, after)) = rest.split_first() else {
                return Some(());
            };
            match byte {
                b'"' => self.raw(b"\\\"")?,
                b'\\' => self.raw(b"\\\\")?,
                byte if byte < 0x20 => return None,
                // A plain byte among the last few, which `plain_prefix` may leave.
                byte => self.raw(&[byte])?,
            }
            rest = after;
        }
    }
}

/// How oslo.messaging's envelope starts.
const ENVELOPE_HEAD: &str = "{\"oslo.version\": \"2.0\", \"oslo.message\": ";
/// How oslo.messaging's request of `process_message` starts, up to the cells message.
const REQUEST_HEAD: &str = "{\"method\": \"process_message\", \"args\": {\"message\": ";

/// How that request head reads inside the envelope's literal, with the
/// opening quote of the cells message's literal.
const ESCAPED_REQUEST_HEAD: &str =
    r#"{\"method\": \"process_message\", \"args\": {\"message\": \""#;

/// Checks what follows the cells message's literal in a request laid out as
/// oslo.messaging writes it (`}` closing `args`, then the other keys): only
/// `args` held it, and the request is a cast.
fn check_request_after_cells(mut after: String) -> Option<()> {
    let request: RequestKeys<'_> = if after == "}}" {
        RequestKeys::default()
    } else {
        // `}, ` before the other keys becomes ` {`: they read as an
        // object of their own, without a copy.
        if !after.starts_with("}, ") {
            return None;
        }
        after.replace_range(..2, " {");
        RequestKeys::read(&after)?
    };
    if request.count("method") + request.count("args") > 0 {
        return None;
    }
    check_cast(&request)
}

/// Checks a request's keys as the full decoder does, and that it is a cast:
/// `None` for a call, a repeated key or a key of the wrong type.
fn check_cast(request: &RequestKeys<'_>) -> Option<()> {
    if request.seen.iter().any(|n| *n > 1) {
        return None;
    }
    // A call, or a cast whose `_msg_id` is neither null nor absent.
    if request.single("_msg_id")?.is_some_and(|raw| raw != "null") {
        return None;
    }
    for key in ["version", "_unique_id", "namespace"] {
        if let Some(raw) = request.single(key)? {
            parse_opt_str(raw)?;
        }
    }
    Some(())
}

/// This cell's hop, as a relay records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    pub routing_path: String,
    pub hop_count: u32,
    pub max_hop_count: u32,
}

enum Edit<'a> {
    Str(&'a str),
    Count(u32),
}

impl Edit<'_> {
    fn write(&self, out: &mut String) {
        match self {
            Edit::Str(text) => write_python_str(out, text),
            Edit::Count(n) => out.push_str(itoa::Buffer::new().format(*n)),
        }
    }
}

/// The oslo 2.0 envelope around an inner message's text.
fn envelope(inner: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(inner.len() * 11 / 10 + 48);
    out.extend_from_slice(b"{\"oslo.version\": \"2.0\", \"oslo.message\": \"");
    write_python_str_content_chunked(&mut out, inner);
    out.extend_from_slice(b"\"}");
    out
}

/// A JSON string's value, borrowed when it holds no escapes.
fn parse_str(text: &str) -> Option<Cow<'_, str>> {
    // The text is valid JSON already: a string without escapes is its
    // text between the quotes.
    if let Some(inner) = text
        .strip_prefix('"')
        .and_then(|rest| rest.strip_suffix('"'))
    {
        if !inner.contains('\\') {
            return Some(Cow::Borrowed(inner));
        }
    }
    serde_json::from_str::<Text<'_>>(text).ok().map(|t| t.0)
}

/// A JSON string or null; `None` (the outer one) when it is neither.
fn parse_opt_str(text: &str) -> Option<Option<Cow<'_, str>>> {
    if text == "null" {
        return Some(None);
    }
    parse_str(text).map(Some)
}

/// A JSON boolean.
fn parse_bool(text: &str) -> Option<bool> {
    match text {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

/// A JSON number that is a `u32`, as serde reads one into a `u32`.
fn parse_u32(text: &str) -> Option<u32> {
    // Valid JSON digits parse as such; anything else (`-0`, an exponent,
    // a fraction) is left to serde, which decides as the full path does.
    text.parse()
        .ok()
        .or_else(|| serde_json::from_str(text).ok())
}

/// The fields of a cells message the skim reads ([`KNOWN_KEYS`], then
/// [`EXTRA_KEYS`]), as the text of their values, found in one pass over its
/// object that checks the rest of it ([`scan::object_entries`]). A repeated
/// field fails the read.
struct CellsFields<'a>([Option<&'a str>; KNOWN_KEYS.len() + EXTRA_KEYS.len()]);

impl<'a> CellsFields<'a> {
    fn read(cells: &'a str) -> Option<CellsFields<'a>> {
        let mut fields = CellsFields(Default::default());
        scan::object_entries(cells, |entry| {
            // A key spelled with escapes names the field it spells.
            match CellsFields::index(&entry.key()?) {
                Some(i) if fields.0[i].replace(entry.value).is_some() => None,
                _ => Some(()),
            }
        })?;
        Some(fields)
    }

    /// Where `key` is in [`KNOWN_KEYS`] then [`EXTRA_KEYS`]: a match, which
    /// compares lengths before bytes (a test holds it to the two lists).
    fn index(key: &str) -> Option<usize> {
        Some(match key {
            "message_type" => 0,
            "ctxt" => 1,
            "method_name" => 2,
            "method_kwargs" => 3,
            "direction" => 4,
            "need_response" => 5,
            "fanout" => 6,
            "uuid" => 7,
            "routing_path" => 8,
            "hop_count" => 9,
            "max_hop_count" => 10,
            "target_cell" => 11,
            "response_uuid" => 12,
            "run_locally" => 13,
            "cellhost_timeout_ms" => 14,
            _ => return None,
        })
    }

    fn get(&self, key: &str) -> Option<&'a str> {
        Self::index(key).and_then(|i| self.0[i])
    }
}

/// The keys of a request the skim checks ([`REQUEST_KEYS`]), found in one
/// pass over its object: how often each appears, and its value (the last,
/// if repeated). Other keys are checked and skipped.
#[derive(Default)]
struct RequestKeys<'a> {
    seen: [u8; REQUEST_KEYS.len()],
    values: [Option<&'a str>; REQUEST_KEYS.len()],
}

impl<'a> RequestKeys<'a> {
    /// The keys of the JSON object `text`; `None` when it is not one.
    fn read(text: &'a str) -> Option<RequestKeys<'a>> {
        let mut keys = RequestKeys::default();
        scan::object_entries(text, |entry| {
            if let Some(i) = Self::index(&entry.key()?) {
                keys.seen[i] = keys.seen[i].saturating_add(1);
                keys.values[i] = Some(entry.value);
            }
            Some(())
        })?;
        Some(keys)
    }

    fn index(key: &str) -> Option<usize> {
        REQUEST_KEYS.iter().position(|k| *k == key)
    }

    fn count(&self, key: &str) -> usize {
        Self::index(key).map_or(0, |i| usize::from(self.seen[i]))
    }

    /// The value of a key that appears at most once: `Some(None)` when it
    /// is absent, `None` when it is repeated.
    fn single(&self, key: &str) -> Option<Option<&'a str>> {
        let i = Self::index(key)?;
        (self.seen[i] <= 1).then_some(self.values[i])
    }
}

/// The entries of one JSON object in text order, values left as their text.
#[derive(Default)]
struct Entries<'a>(Vec<(Cow<'a, str>, &'a str)>);

impl<'a> Entries<'a> {
    /// The entries of the JSON object `text`; `None` when it is not one.
    fn read(text: &'a str) -> Option<Entries<'a>> {
        let mut entries = Vec::with_capacity(16);
        scan::object_entries(text, |entry| {
            entries.push((entry.key()?, entry.value));
            Some(())
        })?;
        Some(Entries(entries))
    }

    /// The value of a key that appears at most once: `Some(None)` when it
    /// is absent, `None` when it is repeated.
    fn single(&self, key: &str) -> Option<Option<&'a str>> {
        let mut found = None;
        for (k, v) in &self.0 {
            if k == key {
                if found.is_some() {
                    return None;
                }
                found = Some(*v);
            }
        }
        Some(found)
    }
}

/// A string borrowed from the text when it can be, owned when it had escapes.
struct Text<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> Visitor<'de> for TextVisitor {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(TextVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{decode_request, CellsMessage, Context, Request, DEFAULT_BODY_LIMIT};
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Map, Value};

    const CAST: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/wire/cast-process-message.json"
    ));

    /// A request minus its `args`, and the cells message it carries: what a
    /// peer makes of a relay, whatever the formatting of its text.
    fn meaning(body: &[u8]) -> (Request, CellsMessage) {
        let mut request = decode_request(body, DEFAULT_BODY_LIMIT).expect("a request");
        let message = request.cells_message().expect("a cells message");
        request.args = Map::new();
        (request, message)
    }

    fn hop_of(message: &CellsMessage, cell: &str, max: u32) -> Hop {
        let mut m = message.clone();
        m.append_hop(cell);
        Hop {
            routing_path: m.routing_path,
            hop_count: m.hop_count,
            max_hop_count: m.max_hop_count.min(max),
        }
    }

    /// The full path's relay: the message updated and encoded again.
    fn full_relay(message: &CellsMessage, hop: &Hop, unique_id: &str) -> Vec<u8> {
        let mut m = message.clone();
        m.routing_path = hop.routing_path.clone();
        m.hop_count = hop.hop_count;
        m.max_hop_count = hop.max_hop_count;
        Request::process_message(&m, Context(m.ctxt.clone()), unique_id).encode()
    }

    /// The full path's local delivery of a cast.
    fn full_local(message: &CellsMessage, hop: &Hop, unique_id: &str) -> Vec<u8> {
        let mut context = message.ctxt.clone();
        context.insert("cell_routing_path".into(), json!(hop.routing_path));
        context.insert("cell_message_uuid".into(), json!(message.uuid));
        Request::cast(
            &message.method_name,
            message.method_kwargs.clone(),
            Context(context),
            unique_id,
        )
        .encode()
    }

    #[test]
    fn the_fields_are_found_where_the_key_lists_have_them() {
        let keys: Vec<&str> = KNOWN_KEYS.iter().chain(&EXTRA_KEYS).copied().collect();
        for (at, key) in keys.iter().enumerate() {
            assert_eq!(CellsFields::index(key), Some(at), "{key}");
        }
        assert_eq!(CellsFields::index("uuid2"), None);
        assert_eq!(CellsFields::index(""), None);
    }

    #[test]
    fn the_sample_relays_byte_for_byte_as_the_full_path() {
        let skim = Skim::read(CAST.as_bytes(), DEFAULT_BODY_LIMIT).expect("the sample skims");
        let (_, message) = meaning(CAST.as_bytes());
        assert_eq!(skim.uuid, message.uuid);
        assert_eq!(skim.path, "api-cell");
        assert_eq!(skim.target_cell.as_deref(), Some("api-cell!child-cell2"));
        let hop = hop_of(&message, "child-cell2", 5);
        // Python-formatted text in Nova's key order: splicing changes nothing else.
        let id = "0123456789abcdef0123456789abcdef";
        assert_eq!(
            skim.relay_body(CAST.as_bytes(), &hop, id),
            full_relay(&message, &hop, id)
        );
        assert_eq!(skim.local_body(&hop, id), full_local(&message, &hop, id));
        // The sample file is indented; on the wire it is one line, which a
        // relay copies rather than writes, to the same bytes.
        let sample: Value = serde_json::from_str(CAST).expect("the sample");
        let wire = super::super::to_python_json(&sample).expect("json");
        let skim = Skim::read(wire.as_bytes(), DEFAULT_BODY_LIMIT).expect("the sample skims");
        // The sample's request carries a context of three keys, its cells
        // message one of six: the request's end is written anew.
        assert!(
            matches!(
                skim.received,
                Some(Received::DoublyPlain {
                    unique_id_at: None,
                    ..
                })
            ),
            "laid out as oslo.messaging writes it, ASCII only"
        );
        let relay = skim.relay_body(wire.as_bytes(), &hop, id);
        assert_eq!(relay, full_relay(&message, &hop, id));
        assert_eq!(skim.relay_body_written(&hop, id), relay);
        // The next cell reads the relay, whose request carries the message's
        // own context as a relay writes it: copied there, with a new id.
        let next = Skim::read(&relay, DEFAULT_BODY_LIMIT).expect("a relay skims");
        assert!(matches!(
            next.received,
            Some(Received::DoublyPlain {
                unique_id_at: Some(_),
                ..
            })
        ));
        let (_, relayed) = meaning(&relay);
        let hop = hop_of(&relayed, "grandchild", 5);
        let other_id = "fedcba9876543210fedcba9876543210";
        let again = next.relay_body(&relay, &hop, other_id);
        assert_eq!(again, full_relay(&relayed, &hop, other_id));
        assert_eq!(next.relay_body_written(&hop, other_id), again);
    }

    #[test]
    fn a_request_ending_otherwise_is_checked_and_written_anew() {
        let (_, message) = meaning(CAST.as_bytes());
        let hop = hop_of(&message, "child-cell2", 5);
        let id = "0123456789abcdef0123456789abcdef";
        let python = |request: &Request| {
            let text = String::from_utf8(request.encode()).expect("ascii");
            assert!(text.is_ascii());
            text
        };
        let as_written = python(&Request::process_message(
            &message,
            Context(message.ctxt.clone()),
            "u",
        ));
        let unique_id = r#"\"_unique_id\": \"u\""#;
        assert!(as_written.contains(unique_id), "{as_written}");
        // Each is still a cast to relay, but its request does not end as a
        // relay writes it: the request's context is not the message's, a
        // key more, a null `_msg_id`, an escaped id, other spacing.
        let others = [
            python(&Request::process_message(&message, Context::default(), "u")),
            as_written.replacen(
                unique_id,
                &format!(r#"{unique_id}, \"namespace\": null"#),
                1,
            ),
            as_written.replacen(unique_id, &format!(r#"{unique_id}, \"_msg_id\": null"#), 1),
            as_written.replacen(unique_id, r#"\"_unique_id\": \"\\u0075\""#, 1),
            as_written.replacen(r#"\"version\": "#, r#"\"version\":"#, 1),
        ];
        for body in &others {
            let skim = Skim::read(body.as_bytes(), DEFAULT_BODY_LIMIT).expect("a cast skims");
            assert!(
                !matches!(
                    skim.received,
                    Some(Received::DoublyPlain {
                        unique_id_at: Some(_),
                        ..
                    })
                ),
                "{body}"
            );
            let relay = skim.relay_body(body.as_bytes(), &hop, id);
            let (request, cells) = meaning(&relay);
            assert_eq!((request, cells), meaning(&full_relay(&message, &hop, id)));
        }
        // A context sent with é and DEL as they are, not as `\u` escapes:
        // the request's end is not copied.
        let mut raw = message.clone();
        raw.ctxt.insert("accent".into(), json!("é\u{7f}"));
        let escaped = python(&Request::process_message(
            &raw,
            Context(raw.ctxt.clone()),
            "u",
        ));
        let sent = escaped
            .replace(r"\\\\u00e9\\\\u007f", "é\u{7f}")
            .replace(r"\\u00e9\\u007f", "é\u{7f}");
        assert!(
            sent.contains("é\u{7f}") && !sent.contains("u00e9"),
            "{sent}"
        );
        let skim = Skim::read(sent.as_bytes(), DEFAULT_BODY_LIMIT).expect("a cast skims");
        assert!(matches!(
            skim.received,
            Some(Received::DoublyPlain {
                unique_id_at: None,
                ..
            })
        ));
        let relay = skim.relay_body(sent.as_bytes(), &hop, id);
        // The cells message is copied as received; the request's end is
        // written anew, é and DEL escaped for the envelope.
        let relay_text = String::from_utf8(relay.clone()).expect("text");
        assert!(
            relay_text.ends_with(r#"\"_context_accent\": \"\u00e9\u007f\"}"}"#),
            "{relay_text}"
        );
        let hop_raw = hop_of(&raw, "child-cell2", 5);
        assert_eq!(hop_raw, hop);
        assert_eq!(meaning(&relay), meaning(&full_relay(&raw, &hop, id)));
        // What the request's end must not hold still sends the body down the
        // full path: a call, a second `method`.
        for refused in [
            as_written.replacen(unique_id, &format!(r#"{unique_id}, \"_msg_id\": \"m\""#), 1),
            as_written.replacen(unique_id, &format!(r#"{unique_id}, \"method\": \"x\""#), 1),
            as_written.replacen(
                unique_id,
                &format!(r#"{unique_id}, \"version\": \"1.0\""#),
                1,
            ),
        ] {
            assert!(
                Skim::read(refused.as_bytes(), DEFAULT_BODY_LIMIT).is_none(),
                "{refused}"
            );
        }
    }

    #[test]
    fn offsets_are_found_in_escaped_text() {
        // The value `a"é😀b`, escaped as Python does, and what follows it.
        let escaped = br#"a\"\u00e9\ud83d\ude00b", 1"#;
        let mut out = Vec::new();
        assert_eq!(
            escaped_offsets(escaped, &[0, 1, 2, 4, 8, 9], &mut out),
            Some(())
        );
        assert_eq!(out, [0, 1, 3, 9, 21, 22]);
        // Inside é, or past the value's end: not found.
        assert_eq!(escaped_offsets(escaped, &[3], &mut Vec::new()), None);
        assert_eq!(escaped_offsets(escaped, &[10], &mut Vec::new()), None);

        // Only `\"` and `\\` escaped: offsets are counted, for any length.
        let value = br#"a"b\c, "a long run of text with "quotes" and \ inside""#;
        let mut escaped = String::new();
        write_python_str(&mut escaped, std::str::from_utf8(value).expect("ascii"));
        let escaped = &escaped[1..escaped.len() - 1];
        let targets = [0, 1, 2, 5, 20, value.len()];
        let (mut counted, mut walked) = (Vec::new(), Vec::new());
        assert_eq!(
            plain_escaped_offsets(value, escaped.len(), 1, &targets, &mut counted),
            Some(())
        );
        let literal = format!("{escaped}\"");
        assert_eq!(
            escaped_offsets(literal.as_bytes(), &targets, &mut walked),
            Some(())
        );
        assert_eq!(counted, walked);
        assert_eq!(&counted[..4], [0, 1, 3, 7]);
        // Counted back from the end, to the same offsets.
        let mut from_end = vec![99];
        assert_eq!(
            plain_escaped_offsets_from_end(value, escaped.len(), 1, &targets, &mut from_end),
            Some(())
        );
        assert_eq!(from_end[0], 99, "what was in the vector stays");
        assert_eq!(from_end[1..], counted[..]);
        // Targets out of order, or past the value: not counted.
        assert_eq!(
            plain_escaped_offsets_from_end(value, escaped.len(), 1, &[5, 2], &mut Vec::new()),
            None
        );
        assert_eq!(
            plain_escaped_offsets_from_end(
                value,
                escaped.len(),
                1,
                &[value.len() + 1],
                &mut Vec::new()
            ),
            None
        );
        // A literal with any other escape is longer: not counted.
        let other = br#"a\u0062"#;
        assert_eq!(
            plain_escaped_offsets(b"ab", other.len(), 1, &[1], &mut Vec::new()),
            None
        );
    }

    #[test]
    fn a_body_that_is_not_utf8_is_not_skimmed() {
        let (_, message) = meaning(CAST.as_bytes());
        let mut args = Map::new();
        let cells = serde_json::to_value(&message).expect("a message");
        args.insert("message".into(), Value::String(cells.to_string()));
        let good = Request::cast("process_message", args, Context::default(), "u").encode();
        let skim = Skim::read(&good, DEFAULT_BODY_LIMIT).expect("the cast skims");
        assert!(matches!(skim.received, Some(Received::DoublyPlain { .. })));
        // A byte that starts no UTF-8 character, in the cells message, in
        // the request after it, and a character cut short by an escape.
        let uuid_at = find(&good, message.uuid.as_bytes());
        let unique_id_at = find(&good, b"_unique_id");
        for (at, bytes) in [
            (uuid_at, &[0xff][..]),
            (unique_id_at, &[0xff][..]),
            (uuid_at, &[0xc3, b'\\', b'\\', b'\\', b'"', 0xa9][..]),
        ] {
            let mut bad = good.clone();
            bad.splice(at..at, bytes.iter().copied());
            assert!(
                Skim::read(&bad, DEFAULT_BODY_LIMIT).is_none(),
                "{bytes:?} at {at}"
            );
            assert!(decode_request(&bad, DEFAULT_BODY_LIMIT).is_err());
        }
    }

    fn find(haystack: &[u8], needle: &[u8]) -> usize {
        haystack
            .windows(needle.len())
            .position(|w| w == needle)
            .expect("the needle is there")
    }

    #[test]
    fn what_needs_an_answer_or_is_malformed_takes_the_full_path() {
        let (_, message) = meaning(CAST.as_bytes());
        let body = |change: &dyn Fn(&mut Map<String, Value>)| {
            let mut cells = serde_json::to_value(&message).expect("a message");
            if let Value::Object(map) = &mut cells {
                change(map);
            }
            let mut args = Map::new();
            args.insert("message".into(), Value::String(cells.to_string()));
            Request::cast("process_message", args, Context::default(), "u").encode()
        };
        let skims = |change: &dyn Fn(&mut Map<String, Value>)| {
            Skim::read(&body(change), DEFAULT_BODY_LIMIT).is_some()
        };
        assert!(skims(&|_| {}));
        assert!(!skims(&|m| {
            m.insert("need_response".into(), json!(true));
        }));
        assert!(!skims(&|m| {
            m.insert("message_type".into(), json!("response"));
            m.insert("response_uuid".into(), json!("r"));
        }));
        assert!(!skims(&|m| {
            m.insert("hop_count".into(), json!(1.0));
        }));
        assert!(!skims(&|m| {
            m.insert("hop_count".into(), json!(-1));
        }));
        assert!(!skims(&|m| {
            m.insert("ctxt".into(), json!([]));
        }));
        assert!(!skims(&|m| {
            m.remove("target_cell");
        }));
        assert!(!skims(&|m| {
            m.insert("direction".into(), json!("sideways"));
        }));
        // A call goes the full way, as does a body over the limit.
        let mut call = decode_request(&body(&|_| {}), DEFAULT_BODY_LIMIT).expect("a request");
        call.call = Some(crate::wire::CallInfo {
            msg_id: "m".into(),
            reply_q: "q".into(),
            timeout: None,
        });
        assert!(Skim::read(&call.encode(), DEFAULT_BODY_LIMIT).is_none());
        assert!(Skim::read(&body(&|_| {}), 100).is_none());
        // A repeated key is left to the full path, which keeps the last.
        let text =
            String::from_utf8(Request::process_message(&message, Context::default(), "u").encode())
                .expect("ascii");
        let fanout = "\\\\\\\"fanout\\\\\\\": false";
        let repeated = text.replacen(
            fanout,
            &format!("{fanout}, {}", fanout.replace("false", "true")),
            1,
        );
        assert_ne!(repeated, text);
        assert!(Skim::read(repeated.as_bytes(), DEFAULT_BODY_LIMIT).is_none());
    }

    #[test]
    fn broken_string_literals_are_left_to_the_full_path() {
        for raw in [
            "\"a\tb\"",
            "\"a\"b\"",
            "\"abc",
            "\"a\\",
            "\"\\x\"",
            "\"\\ud800\"",
            "abc",
        ] {
            assert_eq!(unescape_json_str(raw), None, "{raw}");
        }
        assert_eq!(
            unescape_json_str_prefix("\"a\\\"b\", \"c\""),
            Some(("a\"b".to_string(), 6))
        );
        // A raw control character inside the envelope's literal is invalid JSON:
        // the skim must not accept what the full decoder refuses.
        let body = CAST.replace("\"oslo.message\": \"{", "\"oslo.message\": \"\t{");
        assert!(decode_request(body.as_bytes(), DEFAULT_BODY_LIMIT).is_err());
        let compact: Value = serde_json::from_str(CAST).expect("the sample");
        let python = super::super::to_python_json(&compact).expect("json");
        let broken = python.replacen("{\\\"method", "\t{\\\"method", 1);
        assert_ne!(broken, python);
        assert!(Skim::read(python.as_bytes(), DEFAULT_BODY_LIMIT).is_some());
        assert!(Skim::read(broken.as_bytes(), DEFAULT_BODY_LIMIT).is_none());
    }

    /// Any text, or printable ASCII only (which Python escapes with
    /// nothing but `\"` and `\\`, the relay's quickest case).
    fn text(ascii: bool) -> BoxedStrategy<String> {
        if ascii {
            "[ -~]{0,24}".boxed()
        } else {
            any::<String>().boxed()
        }
    }

    fn json_value(ascii: bool) -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            text(ascii).prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 48, 8, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                prop::collection::vec((text(ascii), inner), 0..8)
                    .prop_map(|entries| Value::Object(entries.into_iter().collect())),
            ]
        })
    }

    fn json_object(
        size: std::ops::Range<usize>,
        ascii: bool,
    ) -> impl Strategy<Value = Map<String, Value>> {
        prop::collection::vec((text(ascii), json_value(ascii)), size)
            .prop_map(|entries| entries.into_iter().collect())
    }

    prop_compose! {
        fn cells_message(ascii: bool)(
            broadcast in any::<bool>(),
            ctxt in json_object(0..6, ascii),
            method_name in text(ascii),
            method_kwargs in json_object(0..24, ascii),
            down in any::<bool>(),
            fanout in any::<bool>(),
            uuid in text(ascii),
            path in if ascii {
                prop::collection::vec("[a-z0-9-]{1,12}", 0..4).boxed()
            } else {
                prop::collection::vec("[a-z0-9-]{1,12}|\\PC{1,6}", 0..4).boxed()
            },
            hop_count in 0u32..20,
            max_hop_count in any::<u32>(),
            target in if ascii { "[ -~]{0,20}".boxed() } else { "\\PC{0,20}".boxed() },
            extra in json_object(0..4, ascii),
        ) -> CellsMessage {
            let message_type = if broadcast { MessageType::Broadcast } else { MessageType::Targeted };
            CellsMessage {
                message_type,
                ctxt,
                method_name,
                method_kwargs,
                direction: if down { Direction::Down } else { Direction::Up },
                need_response: false,
                fanout,
                uuid,
                routing_path: path.join("!"),
                hop_count,
                max_hop_count,
                target_cell: (!broadcast).then_some(target),
                response_uuid: None,
                extra: extra
                    .into_iter()
                    .filter(|(k, _)| !KNOWN_KEYS.contains(&k.as_str()) && !EXTRA_KEYS.contains(&k.as_str()))
                    .collect(),
            }
        }
    }

    /// The message as Nova writes it, or as compact JSON with raw UTF-8 in
    /// every layer (what another JSON library might write).
    fn encoded(message: &CellsMessage, compact: bool) -> Vec<u8> {
        let context = Context(message.ctxt.clone());
        let request = Request::process_message(message, context.clone(), "id0");
        if !compact {
            return request.encode();
        }
        let mut args = Map::new();
        args.insert(
            "message".into(),
            Value::String(serde_json::to_string(message).expect("a message")),
        );
        let request = Request::cast("process_message", args, context, "id0");
        let inner = serde_json::to_string(&request).expect("a request");
        json!({"oslo.version": "2.0", "oslo.message": inner})
            .to_string()
            .into_bytes()
    }

    /// A Python-formatted body with some characters escaped although they
    /// need not be (`\u0065` for `e` in the cells message, `\/` for `/`
    /// and `\u00e9` written `\u00e9` again at the envelope's level): what
    /// another sender may write, meaning the same.
    fn escaped_otherwise(body: &[u8]) -> Vec<u8> {
        let text = std::str::from_utf8(body).expect("ascii");
        let literal = text
            .strip_prefix(ENVELOPE_HEAD)
            .and_then(|rest| rest.strip_suffix('}'))
            .expect("oslo's layout");
        let request = unescape_json_str(literal).expect("a literal");
        let rest = request.strip_prefix(REQUEST_HEAD).expect("oslo's layout");
        let (_, used) = unescape_json_str_prefix(rest).expect("a literal");
        // Inside the cells message's literal only: `e` also spells `true`.
        let cells_literal = &rest[1..used - 1];
        let request = format!(
            "{REQUEST_HEAD}\"{}\"{}",
            cells_literal.replace('e', "\\u0065"),
            &rest[used..]
        );
        let mut out = String::from(ENVELOPE_HEAD);
        write_python_str(&mut out, &request);
        out.push('}');
        // The envelope's literal holds only string text after its head.
        let (head, literal) = out.split_at(ENVELOPE_HEAD.len() + 1);
        format!(
            "{head}{}",
            literal.replace('/', "\\/").replace('a', "\\u0061")
        )
        .into_bytes()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn spliced_bodies_mean_what_the_full_path_writes(
            (message, ascii) in any::<bool>().prop_flat_map(|ascii| (cells_message(ascii), Just(ascii))),
            compact in any::<bool>(),
            cell in "[a-z0-9-]{1,12}",
            max in 1u32..30,
        ) {
            let body = encoded(&message, compact);
            let skim = Skim::read(&body, DEFAULT_BODY_LIMIT);
            prop_assert!(skim.is_some(), "a plain cast must skim");
            let skim = skim.expect("checked");
            let (_, decoded) = meaning(&body);
            prop_assert_eq!(&decoded, &message);
            prop_assert_eq!(skim.ctxt().parse::<Value>().ok(), Some(Value::Object(message.ctxt.clone())));
            let hop = hop_of(&message, &cell, max);
            let id = "fedcba9876543210fedcba9876543210";
            let full = full_relay(&message, &hop, id);
            let spliced = skim.relay_body(&body, &hop, id);
            prop_assert_eq!(meaning(&spliced), meaning(&full));
            // Python's layout is relayed by copying its escaped text, even
            // where it escapes what it need not.
            prop_assert_eq!(skim.received.is_some(), !compact);
            if ascii && !compact {
                let doubly_plain = matches!(skim.received, Some(Received::DoublyPlain { .. }));
                prop_assert!(doubly_plain, "printable ASCII is read in one pass");
                let tail_copied = matches!(
                    skim.received,
                    Some(Received::DoublyPlain { unique_id_at: Some(_), .. })
                );
                prop_assert!(tail_copied, "and the request's end copied");
                prop_assert_eq!(&skim.relay_body_written(&hop, id), &spliced);
            }
            if !compact {
                let copied = skim.relay_body_copied(&body, &hop, id);
                prop_assert_eq!(copied.as_deref(), Some(&spliced[..]));
                let odd = escaped_otherwise(&body);
                let skim = Skim::read(&odd, DEFAULT_BODY_LIMIT);
                prop_assert!(skim.is_some(), "the same cast, escaped otherwise, must skim");
                let skim = skim.expect("checked");
                prop_assert!(
                    matches!(skim.received, Some(Received::Request { .. })),
                    "and be read one level at a time"
                );
                let copied = skim.relay_body_copied(&odd, &hop, id);
                prop_assert!(copied.is_some(), "and be relayed by copying");
                prop_assert_eq!(meaning(&copied.expect("checked")), meaning(&full));
            }
            let spliced = skim.local_body(&hop, id);
            let full = full_local(&message, &hop, id);
            prop_assert_eq!(
                decode_request(&spliced, DEFAULT_BODY_LIMIT).ok(),
                decode_request(&full, DEFAULT_BODY_LIMIT).ok()
            );
        }

        #[test]
        fn long_strings_are_unescaped_as_serde_json_does(text in any::<String>(), python in any::<bool>()) {
            let raw = if python {
                super::super::to_python_json(&text).expect("a string")
            } else {
                serde_json::to_string(&text).expect("a string")
            };
            prop_assert_eq!(unescape_json_str(&raw), Some(text));
        }

        #[test]
        fn doubly_escaped_strings_are_unescaped_in_one_pass_as_in_two(
            text in prop_oneof![
                any::<String>(),
                "[ -~]{0,40}",
                "[\"\\\\a-z]{0,24}",
                // Long enough for whole chunks: quotes alone, with backslashes,
                // and runs between quotes of every length.
                "[\"a-z ]{0,300}",
                "[\"\\\\a-z ]{0,300}",
                "([a-z]{0,20}\"){0,40}",
            ],
            tail in "[ -~]{0,12}",
        ) {
            // `text` as a literal inside a literal, as the envelope holds the
            // cells message, followed by more of the outer literal.
            let inner = serde_json::to_string(&text).expect("a string");
            let outer = serde_json::to_string(&format!("{inner}{tail}")).expect("a string");
            let escaped = &outer.as_bytes()[3..];
            match unescape_doubly_plain(escaped) {
                Some((value, end)) => {
                    prop_assert_eq!(&value, &text);
                    prop_assert_eq!(&escaped[end..end + 2], b"\\\"");
                    let rest: String = serde_json::from_str(&format!("\"{}", std::str::from_utf8(&escaped[end + 2..]).expect("text"))).expect("the rest");
                    prop_assert_eq!(rest, tail);
                }
                // Only for what takes an escape other than `\"` and `\\`.
                None => prop_assert!(text.chars().any(|c| c < ' ' || c == '\u{7f}' || !c.is_ascii()) || inner.contains("\\u"),
                    "refused {:?}", text),
            }
        }

        #[test]
        fn strings_are_escaped_as_the_python_formatter_does(text in any::<String>()) {
            let mut out = String::new();
            write_python_str(&mut out, &text);
            prop_assert_eq!(out, super::super::to_python_json(&text).expect("a string"));
        }

        /// Into a body's bytes, the escaper takes whole chunks of ASCII its
        /// own way: held to the formatter over text dense with escapes, of
        /// every length around a chunk's, with characters outside ASCII
        /// between the chunks.
        #[test]
        fn strings_are_escaped_into_bytes_as_the_python_formatter_does(
            text in proptest::collection::vec(
                proptest::prop_oneof![
                    12 => proptest::sample::select(vec!['a', 'b', '"', '\\', '\n', '\u{1}', '\u{7f}', '/']),
                    1 => proptest::sample::select(vec!['é', '😀']),
                ],
                0..200,
            ).prop_map(|chars| chars.into_iter().collect::<String>())
        ) {
            let mut out = b"head ".to_vec();
            write_python_str_content_chunked(&mut out, &text);
            let formatted = super::super::to_python_json(&text).expect("a string");
            let inside = &formatted[1..formatted.len() - 1];
            prop_assert_eq!(String::from_utf8(out).ok(), Some(format!("head {inside}")));
        }
    }
}
