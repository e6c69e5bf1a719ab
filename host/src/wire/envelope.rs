//! The oslo.messaging envelope, both ways: requests (casts and calls) and replies.
//!
//! An AMQP body from oslo.messaging is `{"oslo.version": "2.0", "oslo.message": "<JSON
//! string>"}`; the inner object is either a request (`method`, `args`, the flattened
//! `_context_<key>` entries, and `_msg_id`/`_reply_q`/`_timeout` for a call) or a reply
//! (`result`, `failure`, `ending`, `_msg_id`). This file owns decoding and encoding those
//! bodies in the key order oslo.messaging 18 writes. Exchanges, routing keys and AMQP
//! properties belong to the transport, not here.

use super::cells::CellsMessage;
use super::json::encode_total;
use super::{
    describe, describe_opt, invalid, opt_string, parse_object, req_object, req_string, Part,
    WireError,
};
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use serde_json::{Map, Value};

/// The only envelope version oslo.messaging has ever written, and the one it accepts.
const ENVELOPE_VERSION: &str = "2.0";
const VERSION_KEY: &str = "oslo.version";
const MESSAGE_KEY: &str = "oslo.message";
/// oslo.messaging flattens the request context into the message under this prefix.
const CONTEXT_PREFIX: &str = "_context_";

/// The request context (user, project, request id, ...). On the wire each entry travels as
/// a top-level `_context_<key>` of the inner message; here the prefix is stripped.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Context(pub Map<String, Value>);

/// What turns a cast into a call: where and under which id the caller awaits its reply.
#[derive(Debug, Clone, PartialEq)]
pub struct CallInfo {
    pub msg_id: String,
    /// The reply queue; replies go to the default exchange with this as routing key.
    pub reply_q: String,
    /// `_timeout`: oslo's call *monitor* timeout in seconds, `None` unless the
    /// caller set `call_monitor_timeout`. When set, the server sends a
    /// heartbeat reply every half of it while it works. The call's own
    /// deadline is not here: it travels as the AMQP `expiration`.
    pub timeout: Option<f64>,
}

/// What an oslo RPC client sends: a cast, or a call when `call` is `Some`.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub method: String,
    pub args: Map<String, Value>,
    pub version: Option<String>,
    pub unique_id: Option<String>,
    pub call: Option<CallInfo>,
    pub context: Context,
    pub namespace: Option<String>,
    /// Every other key of the inner message, in arrival order, written back unchanged.
    pub extra: Map<String, Value>,
}

/// Inner-message keys the codec writes itself. An `extra` entry with one of these names (or
/// the context prefix) is never written: Python keeps the last of duplicate keys, so it
/// would silently override the typed field.
const REQUEST_KEYS: [&str; 8] = [
    "method",
    "args",
    "namespace",
    "version",
    "_msg_id",
    "_reply_q",
    "_timeout",
    "_unique_id",
];

/// Decodes a request body of at most `limit` bytes.
///
/// A bare inner message without the envelope, as oslo.messaging before the 2.0 envelope
/// sent and as oslo.messaging still accepts, is accepted too: a body with neither envelope
/// key is taken to be the inner message itself. A body with only one of the two keys is
/// refused.
pub fn decode_request(body: &[u8], limit: usize) -> Result<Request, WireError> {
    Request::from_map(open_envelope(body, limit, Part::Request)?)
}

impl Request {
    /// A cast of `method(**args)` with oslo's default version "1.0". `unique_id` is the
    /// `_unique_id` oslo uses to drop duplicate deliveries (a uuid4 in hex); the caller
    /// supplies it so that this codec stays pure and deterministic.
    pub fn cast(
        method: impl Into<String>,
        args: Map<String, Value>,
        context: Context,
        unique_id: impl Into<String>,
    ) -> Self {
        Request {
            method: method.into(),
            args,
            version: Some("1.0".to_owned()),
            unique_id: Some(unique_id.into()),
            call: None,
            context,
            namespace: None,
            extra: Map::new(),
        }
    }

    /// The cast a cell sends to a neighbour: `process_message(message=<cells JSON>)`.
    pub fn process_message(
        message: &CellsMessage,
        context: Context,
        unique_id: impl Into<String>,
    ) -> Self {
        let mut args = Map::new();
        args.insert("message".to_owned(), Value::String(message.to_json()));
        Request::cast("process_message", args, context, unique_id)
    }

    /// Validates an already unwrapped inner message.
    pub fn from_map(map: Map<String, Value>) -> Result<Self, WireError> {
        const PART: Part = Part::Request;
        // A null `_msg_id` means a cast to oslo (`if msg_id:`), so only a string makes a call;
        // the call keys of a cast are kept in `extra` like any other key.
        let is_call = match map.get("_msg_id") {
            None | Some(Value::Null) => false,
            Some(Value::String(_)) => true,
            Some(other) => return Err(invalid(PART, "_msg_id", "a string or null", other)),
        };

        let mut method = None;
        let mut args = None;
        let mut version = None;
        let mut unique_id = None;
        let mut namespace = None;
        let mut msg_id = None;
        let mut reply_q = None;
        let mut timeout = None;
        let mut context = Map::new();
        let mut extra = Map::new();
        for (key, value) in map {
            match key.as_str() {
                "method" => method = Some(value),
                "args" => args = Some(value),
                "version" => version = Some(value),
                "_unique_id" => unique_id = Some(value),
                "namespace" => namespace = Some(value),
                "_msg_id" if is_call => msg_id = Some(value),
                "_reply_q" if is_call => reply_q = Some(value),
                "_timeout" if is_call => timeout = Some(value),
                _ => match key.strip_prefix(CONTEXT_PREFIX) {
                    Some(name) => {
                        context.insert(name.to_owned(), value);
                    }
                    None => {
                        extra.insert(key, value);
                    }
                },
            }
        }

        let call = if is_call {
            Some(CallInfo {
                msg_id: req_string(PART, "_msg_id", msg_id)?,
                // Without a reply queue a call cannot be answered; refusing it now is better
                // than letting the caller time out wondering.
                reply_q: req_string(PART, "_reply_q", reply_q)?,
                timeout: match timeout {
                    None | Some(Value::Null) => None,
                    Some(value) => match value.as_f64() {
                        Some(seconds) if seconds >= 0.0 => Some(seconds),
                        _ => {
                            return Err(invalid(
                                PART,
                                "_timeout",
                                "a non-negative number or null",
                                &value,
                            ))
                        }
                    },
                },
            })
        } else {
            None
        };

        Ok(Request {
            method: req_string(PART, "method", method)?,
            args: req_object(PART, "args", args)?,
            version: opt_string(PART, "version", version)?,
            unique_id: opt_string(PART, "_unique_id", unique_id)?,
            call,
            context: Context(context),
            namespace: opt_string(PART, "namespace", namespace)?,
            extra,
        })
    }

    /// The full AMQP body: the envelope around the inner message.
    pub fn encode(&self) -> Vec<u8> {
        wrap_envelope(&encode_total(self))
    }

    /// The cells message of a `process_message` cast. Anything else is an error: a cells
    /// topic only ever carries that one method.
    pub fn cells_message(&self) -> Result<CellsMessage, WireError> {
        const PART: Part = Part::ProcessMessage;
        if self.method != "process_message" {
            return Err(WireError::Invalid {
                part: PART,
                field: "method",
                expected: "\"process_message\"",
                got: describe(&Value::String(self.method.clone())),
            });
        }
        // Nova passes the message as a JSON *string* (its `to_json()`), not as an object.
        match self.args.get("message") {
            Some(Value::String(text)) => CellsMessage::from_json(text),
            other => Err(WireError::Invalid {
                part: PART,
                field: "args.message",
                expected: "a JSON string holding the cells message",
                got: describe_opt(other),
            }),
        }
    }
}

/// The oslo cast that carries `message` to a cell's intercell topic: `process_message` with
/// the message's own context, under `unique_id`.
pub fn relay_cast(message: &CellsMessage, unique_id: &str) -> Vec<u8> {
    Request::process_message(message, Context(message.ctxt.clone()), unique_id).encode()
}

/// The inner message in oslo.messaging's order: `_make_message` writes method, args,
/// namespace, version; the driver then adds the call keys, `_unique_id` and finally the
/// context.
impl Serialize for Request {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("method", &self.method)?;
        map.serialize_entry("args", &self.args)?;
        if let Some(namespace) = &self.namespace {
            map.serialize_entry("namespace", namespace)?;
        }
        if let Some(version) = &self.version {
            map.serialize_entry("version", version)?;
        }
        if let Some(call) = &self.call {
            map.serialize_entry("_msg_id", &call.msg_id)?;
            map.serialize_entry("_reply_q", &call.reply_q)?;
            map.serialize_entry("_timeout", &call.timeout)?;
        }
        if let Some(unique_id) = &self.unique_id {
            map.serialize_entry("_unique_id", unique_id)?;
        }
        for (key, value) in &self.extra {
            if !REQUEST_KEYS.contains(&key.as_str()) && !key.starts_with(CONTEXT_PREFIX) {
                map.serialize_entry(key, value)?;
            }
        }
        for (key, value) in &self.context.0 {
            map.serialize_entry(&format!("{CONTEXT_PREFIX}{key}"), value)?;
        }
        map.end()
    }
}

/// How a call ended on the remote side.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplyOutcome {
    /// The method's return value.
    Result(Value),
    /// The method raised.
    Failure(RemoteFailure),
}

/// A Python exception as oslo.messaging serializes it (`serialize_remote_exception`). The
/// caller rebuilds `module.class(*args, **kwargs)` where allowed, else raises `RemoteError`.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteFailure {
    pub class: String,
    pub module: String,
    pub message: String,
    /// Traceback lines.
    pub tb: Vec<String>,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
}

impl RemoteFailure {
    /// Parses the JSON text of a failure (a reply's `failure`, or the value of a failed cells
    /// response). Absent keys get oslo's own defaults (`failure.get(key, default)`), so a
    /// terse peer's failure still arrives as a failure; wrongly typed keys are refused.
    pub fn from_json(text: &str) -> Result<Self, WireError> {
        const PART: Part = Part::Failure;
        let mut map = parse_object(PART, text)?;
        let mut text_field = |field: &'static str| match map.remove(field) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::String(text)) => Ok(text),
            Some(other) => Err(invalid(PART, field, "a string", &other)),
        };
        let class = text_field("class")?;
        let module = text_field("module")?;
        let message = text_field("message")?;
        let tb = match map.remove("tb") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(lines)) => {
                let mut tb = Vec::with_capacity(lines.len());
                for line in lines {
                    match line {
                        Value::String(line) => tb.push(line),
                        other => {
                            return Err(invalid(PART, "tb", "a list of strings", &other));
                        }
                    }
                }
                tb
            }
            Some(other) => return Err(invalid(PART, "tb", "a list of strings", &other)),
        };
        let args = match map.remove("args") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(args)) => args,
            Some(other) => return Err(invalid(PART, "args", "a list", &other)),
        };
        let kwargs = match map.remove("kwargs") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(kwargs)) => kwargs,
            Some(other) => return Err(invalid(PART, "kwargs", "an object", &other)),
        };
        Ok(RemoteFailure {
            class,
            module,
            message,
            tb,
            args,
            kwargs,
        })
    }

    /// The failure as oslo.messaging writes it: keys class, module, message, tb, args,
    /// kwargs, Python formatting.
    pub fn to_json(&self) -> String {
        encode_total(self)
    }
}

impl Serialize for RemoteFailure {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(6))?;
        map.serialize_entry("class", &self.class)?;
        map.serialize_entry("module", &self.module)?;
        map.serialize_entry("message", &self.message)?;
        map.serialize_entry("tb", &self.tb)?;
        map.serialize_entry("args", &self.args)?;
        map.serialize_entry("kwargs", &self.kwargs)?;
        map.end()
    }
}

/// The answer to a call, sent to the default exchange with the caller's `_reply_q` as
/// routing key.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub msg_id: String,
    pub outcome: ReplyOutcome,
    /// oslo.messaging 18 sends one reply with `ending: true`; older peers sent the result
    /// and the ending as separate messages.
    pub ending: bool,
}

/// Decodes a reply body of at most `limit` bytes; a bare (un-enveloped) reply is accepted as
/// for [`decode_request`].
pub fn decode_reply(body: &[u8], limit: usize) -> Result<Reply, WireError> {
    const PART: Part = Part::Reply;
    let mut map = open_envelope(body, limit, PART)?;
    let msg_id = req_string(PART, "_msg_id", map.remove("_msg_id"))?;
    // oslo reads `failure` first: a reply carrying one is a failure whatever its result.
    let outcome = match map.remove("failure") {
        None | Some(Value::Null) => {
            ReplyOutcome::Result(map.remove("result").unwrap_or(Value::Null))
        }
        Some(Value::String(text)) => ReplyOutcome::Failure(RemoteFailure::from_json(&text)?),
        Some(other) => {
            return Err(invalid(
                PART,
                "failure",
                "null or a JSON string of the remote exception",
                &other,
            ))
        }
    };
    // oslo treats a missing or null `ending` as false (`data.get('ending')`).
    let ending = match map.remove("ending") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(ending)) => ending,
        Some(other) => return Err(invalid(PART, "ending", "true, false or null", &other)),
    };
    Ok(Reply {
        msg_id,
        outcome,
        ending,
    })
}

impl Reply {
    /// The full AMQP body, as oslo.messaging 18 writes a reply.
    pub fn encode(&self) -> Vec<u8> {
        wrap_envelope(&encode_total(self))
    }

    /// A call-monitor heartbeat: no result, no failure, not the end. An oslo
    /// server sends one every `_timeout / 2` seconds while it works.
    pub fn heartbeat(msg_id: impl Into<String>) -> Reply {
        Reply {
            msg_id: msg_id.into(),
            outcome: ReplyOutcome::Result(Value::Null),
            ending: false,
        }
    }

    /// Whether this is a heartbeat rather than an answer.
    pub fn is_heartbeat(&self) -> bool {
        !self.ending && self.outcome == ReplyOutcome::Result(Value::Null)
    }
}

/// The inner reply in oslo's order: result, failure, ending, _msg_id.
impl Serialize for Reply {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(4))?;
        match &self.outcome {
            ReplyOutcome::Result(value) => {
                map.serialize_entry("result", value)?;
                map.serialize_entry("failure", &Value::Null)?;
            }
            ReplyOutcome::Failure(failure) => {
                map.serialize_entry("result", &Value::Null)?;
                map.serialize_entry("failure", &failure.to_json())?;
            }
        }
        map.serialize_entry("ending", &self.ending)?;
        map.serialize_entry("_msg_id", &self.msg_id)?;
        map.end()
    }
}

/// The envelope around an already encoded inner message.
struct Envelope<'a> {
    message: &'a str,
}

impl Serialize for Envelope<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(2))?;
        map.serialize_entry(VERSION_KEY, ENVELOPE_VERSION)?;
        map.serialize_entry(MESSAGE_KEY, self.message)?;
        map.end()
    }
}

fn wrap_envelope(inner: &str) -> Vec<u8> {
    encode_total(&Envelope { message: inner }).into_bytes()
}

/// Checks the size, parses the body and unwraps the envelope, returning the inner object.
/// `inner` names the layer expected inside, for errors about it.
fn open_envelope(body: &[u8], limit: usize, inner: Part) -> Result<Map<String, Value>, WireError> {
    if body.len() > limit {
        return Err(WireError::TooLarge {
            size: body.len(),
            limit,
        });
    }
    let text = std::str::from_utf8(body).map_err(|err| WireError::NotUtf8 {
        valid_up_to: err.valid_up_to(),
    })?;
    let mut outer = parse_object(Part::Body, text)?;
    let version = outer.remove(VERSION_KEY);
    let message = outer.remove(MESSAGE_KEY);
    let message = match (version, message) {
        // No envelope at all: the body is the message (see `decode_request`).
        (None, None) => return Ok(outer),
        (Some(version), message) => {
            match &version {
                Value::String(text) if text == ENVELOPE_VERSION => {}
                Value::String(_) => {
                    return Err(WireError::UnsupportedVersion {
                        version: describe(&version),
                    })
                }
                other => return Err(invalid(Part::Envelope, VERSION_KEY, "a string", other)),
            }
            message
        }
        (None, Some(_)) => {
            return Err(WireError::Missing {
                part: Part::Envelope,
                field: VERSION_KEY,
            })
        }
    };
    let text = match message {
        Some(Value::String(text)) => text,
        Some(other) => {
            return Err(invalid(
                Part::Envelope,
                MESSAGE_KEY,
                "a string holding the JSON message",
                &other,
            ))
        }
        None => {
            return Err(WireError::Missing {
                part: Part::Envelope,
                field: MESSAGE_KEY,
            })
        }
    };
    parse_object(inner, &text)
}

#[cfg(test)]
mod tests {
    use super::super::DEFAULT_BODY_LIMIT;
    use super::*;
    use serde_json::json;

    const CAST: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/wire/cast-process-message.json"
    ));
    const CALL: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/wire/call-request.json"
    ));
    const REPLY_OK: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/wire/reply-ok.json"
    ));
    const REPLY_FAILURE: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/wire/reply-failure.json"
    ));

    /// The `oslo.message` string of a sample, exactly as the Python peer wrote it.
    fn inner_text(body: &[u8]) -> String {
        let outer: Value = serde_json::from_slice(body).unwrap();
        outer[MESSAGE_KEY].as_str().unwrap().to_owned()
    }

    /// The samples were saved with `json.dumps(indent=1)`; oslo sends them with default
    /// arguments. The inner string has no raw newlines, so swapping the indentation for the
    /// default separators gives Python's own `json.dumps` of the same envelope.
    fn python_compact(sample: &str) -> String {
        sample
            .trim_end()
            .replace("{\n ", "{")
            .replace(",\n ", ", ")
            .replace("\n}", "}")
    }

    fn assert_reencodes(sample: &str, encoded: &[u8]) {
        assert_eq!(inner_text(encoded), inner_text(sample.as_bytes()));
        assert_eq!(String::from_utf8_lossy(encoded), python_compact(sample));
    }

    fn envelope(inner: &Value) -> Vec<u8> {
        json!({"oslo.version": "2.0", "oslo.message": inner.to_string()})
            .to_string()
            .into_bytes()
    }

    #[test]
    fn cast_sample_round_trips_byte_for_byte() {
        let request = decode_request(CAST.as_bytes(), DEFAULT_BODY_LIMIT).unwrap();
        assert_eq!(request.method, "process_message");
        assert_eq!(request.version.as_deref(), Some("1.0"));
        assert_eq!(
            request.unique_id.as_deref(),
            Some("e29ba33b09ae459f92a887dfc8401083")
        );
        assert_eq!(request.call, None);
        assert_eq!(request.namespace, None);
        assert!(request.extra.is_empty());
        assert_eq!(
            Value::Object(request.context.0.clone()),
            json!({"user_id": "u", "project_id": "p", "request_id": "req-1"})
        );
        assert_reencodes(CAST, &request.encode());

        // The cells message inside re-encodes byte for byte, and so does a cast rebuilt
        // from it the way a cell would send it on.
        let cells = request.cells_message().unwrap();
        let original = request.args["message"].as_str().unwrap();
        assert_eq!(cells.to_json(), original);
        let rebuilt = Request::process_message(
            &cells,
            request.context.clone(),
            "e29ba33b09ae459f92a887dfc8401083",
        );
        assert_eq!(rebuilt, request);
        assert_reencodes(CAST, &rebuilt.encode());
    }

    #[test]
    fn call_sample_round_trips_byte_for_byte() {
        let request = decode_request(CALL.as_bytes(), DEFAULT_BODY_LIMIT).unwrap();
        assert_eq!(request.method, "echo");
        assert_eq!(Value::Object(request.args.clone()), json!({"x": 7}));
        // This call was made without a target version, so oslo wrote none.
        assert_eq!(request.version, None);
        assert_eq!(
            request.call,
            Some(CallInfo {
                msg_id: "0a7e7995b321446fa700aad3ab16a6f6".into(),
                reply_q: "reply_5ae41120c1da455eba5c570aa1b1ebc2".into(),
                timeout: None,
            })
        );
        assert_eq!(
            Value::Object(request.context.0.clone()),
            json!({"request_id": "r2"})
        );
        assert_reencodes(CALL, &request.encode());
        let err = request.cells_message().unwrap_err();
        assert_eq!(
            err.to_string(),
            "process_message request: field `method` must be \"process_message\", got \"echo\""
        );
        assert_eq!(err.reason_code(), "bad-cells-message");
    }

    #[test]
    fn reply_ok_sample_round_trips_byte_for_byte() {
        let reply = decode_reply(REPLY_OK.as_bytes(), DEFAULT_BODY_LIMIT).unwrap();
        assert_eq!(
            reply,
            Reply {
                msg_id: "0a7e7995b321446fa700aad3ab16a6f6".into(),
                outcome: ReplyOutcome::Result(json!({"got": 7})),
                ending: true,
            }
        );
        assert_reencodes(REPLY_OK, &reply.encode());
        // Checked once against CPython's `json.dumps` output directly.
        assert_eq!(
            String::from_utf8(reply.encode()).unwrap(),
            concat!(
                r#"{"oslo.version": "2.0", "oslo.message": "{\"result\": {\"got\": 7}, "#,
                r#"\"failure\": null, \"ending\": true, "#,
                r#"\"_msg_id\": \"0a7e7995b321446fa700aad3ab16a6f6\"}"}"#
            )
        );
    }

    #[test]
    fn reply_failure_sample_round_trips_byte_for_byte() {
        let reply = decode_reply(REPLY_FAILURE.as_bytes(), DEFAULT_BODY_LIMIT).unwrap();
        let ReplyOutcome::Failure(failure) = &reply.outcome else {
            panic!("expected a failure, got {:?}", reply.outcome);
        };
        assert_eq!(failure.class, "CellTimeout");
        assert_eq!(failure.module, "nova.exception");
        assert_eq!(failure.message, "Timeout waiting for response from cell");
        assert!(failure.tb.is_empty() && failure.args.is_empty() && failure.kwargs.is_empty());
        assert!(reply.ending);
        assert_reencodes(REPLY_FAILURE, &reply.encode());
    }

    #[test]
    fn unknown_request_keys_survive_a_round_trip() {
        let inner = json!({
            "method": "m", "args": {"a": 1}, "namespace": "ns", "version": "1.3",
            "_unique_id": "id", "future_key": [1, {"k": null}], "another": "x",
            "_context_user_name": "zoë", "_context_roles": ["admin"]
        });
        let request = decode_request(&envelope(&inner), DEFAULT_BODY_LIMIT).unwrap();
        let keys: Vec<&str> = request.extra.keys().map(String::as_str).collect();
        assert_eq!(keys, ["future_key", "another"]);
        assert_eq!(request.namespace.as_deref(), Some("ns"));
        assert_eq!(request.context.0["user_name"], "zoë");
        let encoded = request.encode();
        assert_eq!(
            inner_text(&encoded),
            concat!(
                r#"{"method": "m", "args": {"a": 1}, "namespace": "ns", "version": "1.3", "#,
                r#""_unique_id": "id", "future_key": [1, {"k": null}], "another": "x", "#,
                r#""_context_user_name": "zo\u00eb", "_context_roles": ["admin"]}"#
            )
        );
        assert_eq!(
            decode_request(&encoded, DEFAULT_BODY_LIMIT).unwrap(),
            request
        );
    }

    #[test]
    fn non_ascii_is_escaped_in_both_layers() {
        let mut args = Map::new();
        args.insert("name".into(), json!("zoë 😀"));
        let request = Request::cast("m", args, Context::default(), "id");
        let body = String::from_utf8(request.encode()).unwrap();
        // Python escapes the inner text once when writing it and the backslash again when
        // writing the envelope.
        assert!(body.is_ascii());
        assert!(
            body.contains(r#"\"name\": \"zo\\u00eb \\ud83d\\ude00\""#),
            "{body}"
        );
        let back = decode_request(body.as_bytes(), DEFAULT_BODY_LIMIT).unwrap();
        assert_eq!(back.args["name"], "zoë 😀");
    }

    #[test]
    fn cast_constructor_writes_oslo_order() {
        let mut ctx = Map::new();
        ctx.insert("request_id".into(), json!("r1"));
        let mut request = Request::cast("ping", Map::new(), Context(ctx), "abc");
        request.call = Some(CallInfo {
            msg_id: "m1".into(),
            reply_q: "reply_q1".into(),
            timeout: Some(5.0),
        });
        // Shadowing keys in `extra` must not produce duplicate keys.
        request.extra.insert("method".into(), json!("evil"));
        request
            .extra
            .insert("_context_request_id".into(), json!("evil"));
        assert_eq!(
            inner_text(&request.encode()),
            concat!(
                r#"{"method": "ping", "args": {}, "version": "1.0", "_msg_id": "m1", "#,
                r#""_reply_q": "reply_q1", "_timeout": 5.0, "_unique_id": "abc", "#,
                r#""_context_request_id": "r1"}"#
            )
        );
        let back = decode_request(&request.encode(), DEFAULT_BODY_LIMIT).unwrap();
        assert_eq!(back.call, request.call);
    }

    #[test]
    fn bare_messages_are_accepted() {
        let inner = json!({"method": "m", "args": {}, "_context_a": 1});
        let request = decode_request(inner.to_string().as_bytes(), DEFAULT_BODY_LIMIT).unwrap();
        assert_eq!(request.method, "m");
        let bare_reply = json!({"result": 3, "failure": null, "ending": true, "_msg_id": "x"});
        let reply = decode_reply(bare_reply.to_string().as_bytes(), DEFAULT_BODY_LIMIT).unwrap();
        assert_eq!(reply.outcome, ReplyOutcome::Result(json!(3)));
    }

    #[test]
    fn oversized_bodies_are_refused_before_parsing() {
        // Not even JSON: the size check must come first.
        let body = vec![b'x'; 2_000_000];
        let err = decode_request(&body, DEFAULT_BODY_LIMIT).unwrap_err();
        assert_eq!(
            err.to_string(),
            "body of 2000000 bytes exceeds the 1048576-byte limit"
        );
        assert_eq!(err.reason_code(), "too-large");
        let err = decode_reply(REPLY_OK.as_bytes(), 10).unwrap_err();
        assert_eq!(
            err,
            WireError::TooLarge {
                size: REPLY_OK.len(),
                limit: 10
            }
        );
        assert!(decode_reply(REPLY_OK.as_bytes(), REPLY_OK.len()).is_ok());
    }

    #[test]
    fn bad_bodies_give_the_right_reason() {
        let cases: Vec<(Vec<u8>, &str, &str)> = vec![
            (
                vec![b'{', 0xff, b'}'],
                "not-utf8",
                "message body is not valid UTF-8 (first bad byte at offset 1)",
            ),
            (b"".to_vec(), "not-json", "message body is not valid JSON"),
            (
                b"{\"oslo.version\": ".to_vec(),
                "not-json",
                "message body is not valid JSON",
            ),
            (
                b"[1]".to_vec(),
                "not-json",
                "message body must be a JSON object, got [1]",
            ),
            (
                br#"{"oslo.version": "2.0"}"#.to_vec(),
                "bad-envelope",
                "oslo envelope: field `oslo.message` is missing",
            ),
            (
                br#"{"oslo.message": "{}"}"#.to_vec(),
                "bad-envelope",
                "oslo envelope: field `oslo.version` is missing",
            ),
            (
                br#"{"oslo.version": "2.0", "oslo.message": {"method": "m"}}"#.to_vec(),
                "bad-envelope",
                "oslo envelope: field `oslo.message` must be a string holding the JSON",
            ),
            (
                br#"{"oslo.version": "1.0", "oslo.message": "{}"}"#.to_vec(),
                "unsupported-version",
                "oslo envelope version \"1.0\" is not supported (only \"2.0\" is)",
            ),
            (
                br#"{"oslo.version": 2.0, "oslo.message": "{}"}"#.to_vec(),
                "bad-envelope",
                "oslo envelope: field `oslo.version` must be a string, got 2.0",
            ),
            (
                br#"{"oslo.version": "2.0", "oslo.message": "{nope"}"#.to_vec(),
                "bad-request",
                "oslo request is not valid JSON",
            ),
            (
                br#"{"oslo.version": "2.0", "oslo.message": "[]"}"#.to_vec(),
                "bad-request",
                "oslo request must be a JSON object, got []",
            ),
            (
                envelope(&json!({"args": {}})),
                "bad-request",
                "oslo request: field `method` is missing",
            ),
            (
                envelope(&json!({"method": 1, "args": {}})),
                "bad-request",
                "oslo request: field `method` must be a string, got 1",
            ),
            (
                envelope(&json!({"method": "m"})),
                "bad-request",
                "oslo request: field `args` is missing",
            ),
            (
                envelope(&json!({"method": "m", "args": [1]})),
                "bad-request",
                "oslo request: field `args` must be an object, got [1]",
            ),
            (
                envelope(&json!({"method": "m", "args": {}, "_msg_id": "x"})),
                "bad-request",
                "oslo request: field `_reply_q` is missing",
            ),
            (
                envelope(&json!({"method": "m", "args": {}, "_msg_id": 5})),
                "bad-request",
                "oslo request: field `_msg_id` must be a string or null, got 5",
            ),
            (
                envelope(&json!({
                    "method": "m", "args": {}, "_msg_id": "x", "_reply_q": "q",
                    "_timeout": "soon"
                })),
                "bad-request",
                "oslo request: field `_timeout` must be a non-negative number or null",
            ),
            (
                envelope(&json!({"method": "m", "args": {}, "version": 1.0})),
                "bad-request",
                "oslo request: field `version` must be a string or null, got 1.0",
            ),
        ];
        for (body, code, text) in cases {
            let err = decode_request(&body, DEFAULT_BODY_LIMIT).unwrap_err();
            assert_eq!(err.reason_code(), code, "{err}");
            assert!(err.to_string().starts_with(text), "{err}");
        }
    }

    #[test]
    fn null_call_keys_mean_a_cast_and_are_kept() {
        let inner = json!({"method": "m", "args": {}, "_msg_id": null, "_reply_q": null});
        let request = decode_request(&envelope(&inner), DEFAULT_BODY_LIMIT).unwrap();
        assert_eq!(request.call, None);
        assert_eq!(
            Value::Object(request.extra.clone()),
            json!({"_msg_id": null, "_reply_q": null})
        );
    }

    #[test]
    fn bad_cells_payloads_are_refused() {
        for (args, text) in [
            (
                json!({}),
                "process_message request: field `args.message` must be a JSON string \
                 holding the cells message, got nothing",
            ),
            (
                json!({"message": {"message_type": "targeted"}}),
                "process_message request: field `args.message` must be a JSON string \
                 holding the cells message, got {\"message_type\":\"targeted\"}",
            ),
            (
                json!({"message": "{\"message_type\": \"targeted\"}"}),
                "cells message: field `ctxt` is missing",
            ),
            (
                json!({"message": "not json"}),
                "cells message is not valid JSON",
            ),
        ] {
            let inner = json!({"method": "process_message", "args": args});
            let request = decode_request(&envelope(&inner), DEFAULT_BODY_LIMIT).unwrap();
            let err = request.cells_message().unwrap_err();
            assert_eq!(err.reason_code(), "bad-cells-message", "{err}");
            assert!(err.to_string().starts_with(text), "{err}");
        }
    }

    #[test]
    fn bad_replies_give_the_right_reason() {
        for (inner, text) in [
            (
                json!({"result": 1, "ending": true}),
                "oslo reply: field `_msg_id` is missing",
            ),
            (
                json!({"_msg_id": "x", "failure": {"class": "E"}}),
                "oslo reply: field `failure` must be null or a JSON string",
            ),
            (
                json!({"_msg_id": "x", "ending": "yes"}),
                "oslo reply: field `ending` must be true, false or null, got \"yes\"",
            ),
            (
                json!({"_msg_id": "x", "failure": "{oops"}),
                "remote failure is not valid JSON",
            ),
            (
                json!({"_msg_id": "x", "failure": "{\"class\": 3}"}),
                "remote failure: field `class` must be a string, got 3",
            ),
            (
                json!({"_msg_id": "x", "failure": "{\"tb\": [1]}"}),
                "remote failure: field `tb` must be a list of strings, got 1",
            ),
            (
                json!({"_msg_id": "x", "failure": "{\"args\": {}}"}),
                "remote failure: field `args` must be a list, got {}",
            ),
            (
                json!({"_msg_id": "x", "failure": "{\"kwargs\": []}"}),
                "remote failure: field `kwargs` must be an object, got []",
            ),
        ] {
            let err = decode_reply(&envelope(&inner), DEFAULT_BODY_LIMIT).unwrap_err();
            assert_eq!(err.reason_code(), "bad-reply", "{err}");
            assert!(err.to_string().starts_with(text), "{err}");
        }
    }

    #[test]
    fn lenient_reply_defaults_follow_oslo() {
        let inner = json!({"_msg_id": "x", "failure": "{}"});
        let reply = decode_reply(&envelope(&inner), DEFAULT_BODY_LIMIT).unwrap();
        assert!(!reply.ending);
        assert_eq!(
            reply.outcome,
            ReplyOutcome::Failure(RemoteFailure {
                class: String::new(),
                module: String::new(),
                message: String::new(),
                tb: Vec::new(),
                args: Vec::new(),
                kwargs: Map::new(),
            })
        );
        let inner = json!({"_msg_id": "x"});
        let reply = decode_reply(&envelope(&inner), DEFAULT_BODY_LIMIT).unwrap();
        assert_eq!(reply.outcome, ReplyOutcome::Result(Value::Null));
    }

    #[test]
    fn failure_round_trips_with_non_ascii() {
        let failure = RemoteFailure {
            class: "ValueError".into(),
            module: "builtins".into(),
            message: "zoë 😀".into(),
            tb: vec!["Traceback (most recent call last):\n".into()],
            args: vec![json!("zoë")],
            kwargs: Map::new(),
        };
        assert_eq!(
            failure.to_json(),
            concat!(
                r#"{"class": "ValueError", "module": "builtins", "#,
                r#""message": "zo\u00eb \ud83d\ude00", "#,
                r#""tb": ["Traceback (most recent call last):\n"], "#,
                r#""args": ["zo\u00eb"], "kwargs": {}}"#
            )
        );
        assert_eq!(
            RemoteFailure::from_json(&failure.to_json()).unwrap(),
            failure
        );
        let reply = Reply {
            msg_id: "m".into(),
            outcome: ReplyOutcome::Failure(failure),
            ending: true,
        };
        assert_eq!(
            decode_reply(&reply.encode(), DEFAULT_BODY_LIMIT).unwrap(),
            reply
        );
    }

    #[test]
    fn garbage_never_panics() {
        // A crude fuzz over truncations and byte flips of every sample.
        for sample in [CAST, CALL, REPLY_OK, REPLY_FAILURE] {
            let bytes = sample.as_bytes();
            for cut in 0..bytes.len() {
                let _ = decode_request(&bytes[..cut], DEFAULT_BODY_LIMIT);
                let _ = decode_reply(&bytes[..cut], DEFAULT_BODY_LIMIT);
                let mut flipped = bytes.to_vec();
                flipped[cut] ^= 0x5a;
                if let Ok(request) = decode_request(&flipped, DEFAULT_BODY_LIMIT) {
                    let _ = request.cells_message();
                }
                let _ = decode_reply(&flipped, DEFAULT_BODY_LIMIT);
            }
        }
    }
}
