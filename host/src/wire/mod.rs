//! The wire codec: bytes in, typed messages out, and back again.
//!
//! This module owns the two layers of text a nova-cells peer puts on the wire: the
//! oslo.messaging envelope (`envelope`: requests, calls and replies) and the flat cells
//! message carried inside a `process_message` cast (`cells`), plus the Python-compatible JSON
//! writer both of them need (`json`), and the relay's fast path through both (`skim`), which
//! reads only what routing needs and writes a relay by splicing. It knows JSON and the oslo envelope and nothing else:
//! no AMQP, no queues, no routing decisions. Everything here is pure and never panics on
//! input; every rejection is a [`WireError`] an operator can read and a metric can count.

mod cells;
mod envelope;
mod json;
mod response;
mod scan;
mod skim;

pub use cells::{CellsMessage, Direction, MessageType};
pub use envelope::{
    decode_reply, decode_request, relay_cast, CallInfo, Context, RemoteFailure, Reply,
    ReplyOutcome, Request,
};
pub use json::{
    to_python_json, value_to_python_json, write_python_json, write_python_str, PythonFormatter,
};
pub use response::{nova_failure, CellResponse};
pub use skim::{Hop, Skim};

use serde_json::Value;
use std::fmt;

/// Largest body accepted by default. Nova's cells messages are small (a context plus the
/// method's arguments); a megabyte leaves room for big instance records while keeping a
/// runaway or hostile publisher from making us parse arbitrarily large documents.
pub const DEFAULT_BODY_LIMIT: usize = 1 << 20;

/// Which layer of a message an error was found in. It appears in the error text, so an
/// operator knows whether to blame the peer's oslo.messaging, its Nova, or a plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    /// The raw AMQP body as a whole.
    Body,
    /// The outer `{"oslo.version", "oslo.message"}` envelope.
    Envelope,
    /// The inner oslo message of a cast or call (`method`, `args`, `_context_*`, ...).
    Request,
    /// The inner oslo message of a reply (`result`, `failure`, `ending`, `_msg_id`).
    Reply,
    /// The serialized remote exception inside a reply's `failure`.
    Failure,
    /// A request that should be a cells `process_message` cast but is not one.
    ProcessMessage,
    /// The flat cells message carried in `args.message`.
    CellsMessage,
}

impl Part {
    fn as_str(self) -> &'static str {
        match self {
            Part::Body => "message body",
            Part::Envelope => "oslo envelope",
            Part::Request => "oslo request",
            Part::Reply => "oslo reply",
            Part::Failure => "remote failure",
            Part::ProcessMessage => "process_message request",
            Part::CellsMessage => "cells message",
        }
    }

    /// The reason code of a structural problem found in this layer.
    fn reason_code(self) -> &'static str {
        match self {
            Part::Body => "not-json",
            Part::Envelope => "bad-envelope",
            Part::Request => "bad-request",
            Part::Reply | Part::Failure => "bad-reply",
            Part::ProcessMessage | Part::CellsMessage => "bad-cells-message",
        }
    }
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a body could not be decoded. The `Display` text names the layer, the field and the
/// offending value (shortened), because the person reading it is debugging a live system.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WireError {
    /// Checked before any parsing, so an oversized body costs nothing but its length.
    #[error("body of {size} bytes exceeds the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },

    #[error("message body is not valid UTF-8 (first bad byte at offset {valid_up_to})")]
    NotUtf8 { valid_up_to: usize },

    #[error("{part} is not valid JSON: {detail}")]
    NotJson { part: Part, detail: String },

    #[error("{part} must be a JSON object, got {got}")]
    NotAnObject { part: Part, got: String },

    #[error("oslo envelope version {version} is not supported (only \"2.0\" is)")]
    UnsupportedVersion { version: String },

    #[error("{part}: field `{field}` is missing")]
    Missing { part: Part, field: &'static str },

    #[error("{part}: field `{field}` must be {expected}, got {got}")]
    Invalid {
        part: Part,
        field: &'static str,
        expected: &'static str,
        got: String,
    },
}

impl WireError {
    /// A short, stable slug for metrics labels and dead-letter headers. It names the kind of
    /// problem, or for structural problems the layer that is broken; the wording of
    /// `Display` may improve over time, these slugs must not change.
    ///
    /// One of `too-large`, `not-utf8`, `not-json` (the body itself is not JSON),
    /// `bad-envelope`, `unsupported-version`, `bad-request`, `bad-reply`, `bad-cells-message`.
    pub fn reason_code(&self) -> &'static str {
        match self {
            WireError::TooLarge { .. } => "too-large",
            WireError::NotUtf8 { .. } => "not-utf8",
            WireError::UnsupportedVersion { .. } => "unsupported-version",
            WireError::NotJson { part, .. }
            | WireError::NotAnObject { part, .. }
            | WireError::Missing { part, .. }
            | WireError::Invalid { part, .. } => part.reason_code(),
        }
    }

    /// The layer the problem was found in, where there is one.
    pub fn part(&self) -> Option<Part> {
        match self {
            WireError::TooLarge { .. } | WireError::NotUtf8 { .. } => Some(Part::Body),
            WireError::UnsupportedVersion { .. } => Some(Part::Envelope),
            WireError::NotJson { part, .. }
            | WireError::NotAnObject { part, .. }
            | WireError::Missing { part, .. }
            | WireError::Invalid { part, .. } => Some(*part),
        }
    }
}

/// Longest rendering of an offending value quoted in an error. Error texts end up in logs and
/// AMQP headers; quoting a whole megabyte of method arguments there helps nobody.
const GOT_MAX_CHARS: usize = 60;

/// Renders an offending value for an error message: as JSON, so `"x"` and `x` differ, and
/// shortened on a character boundary.
pub(crate) fn describe(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() <= GOT_MAX_CHARS {
        return text;
    }
    let mut short: String = text.chars().take(GOT_MAX_CHARS).collect();
    short.push('…');
    short
}

/// The `got` of an error about a field that may be absent.
pub(crate) fn describe_opt(value: Option<&Value>) -> String {
    match value {
        Some(value) => describe(value),
        None => "nothing".to_owned(),
    }
}

pub(crate) fn invalid(
    part: Part,
    field: &'static str,
    expected: &'static str,
    got: &Value,
) -> WireError {
    WireError::Invalid {
        part,
        field,
        expected,
        got: describe(got),
    }
}

/// Parses `text` as JSON, blaming `part` if it is not.
pub(crate) fn parse_json(part: Part, text: &str) -> Result<Value, WireError> {
    serde_json::from_str(text).map_err(|err| WireError::NotJson {
        part,
        detail: err.to_string(),
    })
}

/// Parses `text` as a JSON object, blaming `part` if it is not one.
pub(crate) fn parse_object(
    part: Part,
    text: &str,
) -> Result<serde_json::Map<String, Value>, WireError> {
    match parse_json(part, text)? {
        Value::Object(map) => Ok(map),
        other => Err(WireError::NotAnObject {
            part,
            got: describe(&other),
        }),
    }
}

/// A required string field.
pub(crate) fn req_string(
    part: Part,
    field: &'static str,
    value: Option<Value>,
) -> Result<String, WireError> {
    match value {
        Some(Value::String(text)) => Ok(text),
        Some(other) => Err(invalid(part, field, "a string", &other)),
        None => Err(WireError::Missing { part, field }),
    }
}

/// An optional string field; Python's `None` counts as absent.
pub(crate) fn opt_string(
    part: Part,
    field: &'static str,
    value: Option<Value>,
) -> Result<Option<String>, WireError> {
    match value {
        Some(Value::String(text)) => Ok(Some(text)),
        Some(Value::Null) | None => Ok(None),
        Some(other) => Err(invalid(part, field, "a string or null", &other)),
    }
}

/// A required object field.
pub(crate) fn req_object(
    part: Part,
    field: &'static str,
    value: Option<Value>,
) -> Result<serde_json::Map<String, Value>, WireError> {
    match value {
        Some(Value::Object(map)) => Ok(map),
        Some(other) => Err(invalid(part, field, "an object", &other)),
        None => Err(WireError::Missing { part, field }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn too_large_message_reads_well() {
        let err = WireError::TooLarge {
            size: 2_000_000,
            limit: DEFAULT_BODY_LIMIT,
        };
        assert_eq!(
            err.to_string(),
            "body of 2000000 bytes exceeds the 1048576-byte limit"
        );
        assert_eq!(err.reason_code(), "too-large");
    }

    #[test]
    fn invalid_field_message_quotes_the_value_as_json() {
        let err = invalid(
            Part::CellsMessage,
            "hop_count",
            "a non-negative integer",
            &json!("x"),
        );
        assert_eq!(
            err.to_string(),
            "cells message: field `hop_count` must be a non-negative integer, got \"x\""
        );
        assert_eq!(err.reason_code(), "bad-cells-message");
        assert_eq!(err.part(), Some(Part::CellsMessage));
    }

    #[test]
    fn describe_shortens_long_values_on_a_char_boundary() {
        let long = Value::String("é".repeat(500));
        let text = describe(&long);
        assert_eq!(text.chars().count(), GOT_MAX_CHARS + 1);
        assert!(text.ends_with('…'));
        assert_eq!(describe_opt(None), "nothing");
    }

    #[test]
    fn reason_codes_follow_the_broken_layer() {
        let not_json = |part| WireError::NotJson {
            part,
            detail: String::new(),
        };
        assert_eq!(not_json(Part::Body).reason_code(), "not-json");
        assert_eq!(not_json(Part::Envelope).reason_code(), "bad-envelope");
        assert_eq!(not_json(Part::Request).reason_code(), "bad-request");
        assert_eq!(not_json(Part::Failure).reason_code(), "bad-reply");
        assert_eq!(
            not_json(Part::CellsMessage).reason_code(),
            "bad-cells-message"
        );
        assert_eq!(
            WireError::NotUtf8 { valid_up_to: 0 }.reason_code(),
            "not-utf8"
        );
        assert_eq!(
            WireError::UnsupportedVersion {
                version: "\"1.0\"".into()
            }
            .reason_code(),
            "unsupported-version"
        );
    }
}
