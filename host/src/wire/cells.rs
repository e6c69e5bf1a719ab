//! The flat cells message: the JSON text Nova's cells service puts in `args.message` of a
//! `process_message` cast (SPEC §2).
//!
//! This file owns its parsing, validation and re-encoding in Nova's own key order, and the
//! one mutation every hop performs (appending the cell's name to `routing_path`). It does not
//! decide where a message goes; keys it does not know are kept in `extra` and written back,
//! so a newer Nova's fields pass through an older host untouched.

use super::json::encode_total;
use super::{
    describe_opt, invalid, opt_string, parse_object, req_object, req_string, Part, WireError,
};
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use serde_json::{Map, Value};
use std::fmt;

const PART: Part = Part::CellsMessage;

/// The three message classes of Nova's cells messaging; each has its own topic
/// (`<queue_base>.<type>`) and consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageType {
    Targeted,
    Broadcast,
    Response,
}

impl MessageType {
    /// The name on the wire and in topic names.
    pub const fn as_str(self) -> &'static str {
        match self {
            MessageType::Targeted => "targeted",
            MessageType::Broadcast => "broadcast",
            MessageType::Response => "response",
        }
    }

    /// Every type, e.g. to declare one consumer per type.
    pub const fn all() -> [MessageType; 3] {
        [
            MessageType::Targeted,
            MessageType::Broadcast,
            MessageType::Response,
        ]
    }

    /// Where this type is in [`MessageType::all`], e.g. to keep something
    /// per type in an array.
    pub const fn index(self) -> usize {
        match self {
            MessageType::Targeted => 0,
            MessageType::Broadcast => 1,
            MessageType::Response => 2,
        }
    }

    /// The type with wire name `name`, if there is one.
    pub fn from_wire(name: &str) -> Option<Self> {
        Self::all().into_iter().find(|kind| kind.as_str() == name)
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which way a message travels in the cell tree: `up` towards the API cell, `down` towards
/// the leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Up,
    Down,
}

impl Direction {
    /// The name on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            Direction::Up => "up",
            Direction::Down => "down",
        }
    }

    /// The opposite direction: a response travels back the way its request came.
    pub const fn flipped(self) -> Self {
        match self {
            Direction::Up => Direction::Down,
            Direction::Down => Direction::Up,
        }
    }

    /// The direction with wire name `name`, if there is one.
    pub fn from_wire(name: &str) -> Option<Self> {
        match name {
            "up" => Some(Direction::Up),
            "down" => Some(Direction::Down),
            _ => None,
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One cells message as Nova's `_BaseMessage.to_json` writes it.
#[derive(Debug, Clone, PartialEq)]
pub struct CellsMessage {
    pub message_type: MessageType,
    pub ctxt: Map<String, Value>,
    pub method_name: String,
    pub method_kwargs: Map<String, Value>,
    pub direction: Direction,
    pub need_response: bool,
    pub fanout: bool,
    pub uuid: String,
    /// Cell names joined by `!` in travel order; empty when the message enters from an
    /// application rather than from another cell (Nova may send `null` then).
    pub routing_path: String,
    pub hop_count: u32,
    pub max_hop_count: u32,
    /// Present for targeted and response messages.
    pub target_cell: Option<String>,
    /// Present for response messages: the `uuid` of the request being answered.
    pub response_uuid: Option<String>,
    /// Every key this codec does not know, in arrival order, written back unchanged.
    pub extra: Map<String, Value>,
}

/// Keys the codec writes itself; an `extra` entry with one of these names is never written,
/// since Python keeps the last of duplicate keys and it would override the typed field.
pub(super) const KNOWN_KEYS: [&str; 13] = [
    "message_type",
    "ctxt",
    "method_name",
    "method_kwargs",
    "direction",
    "need_response",
    "fanout",
    "uuid",
    "routing_path",
    "hop_count",
    "max_hop_count",
    "target_cell",
    "response_uuid",
];

impl CellsMessage {
    /// Parses and validates the text of `args.message`.
    pub fn from_json(text: &str) -> Result<Self, WireError> {
        Self::from_map(parse_object(PART, text)?)
    }

    /// Validates an already parsed cells message object.
    pub fn from_map(map: Map<String, Value>) -> Result<Self, WireError> {
        let mut message_type = None;
        let mut ctxt = None;
        let mut method_name = None;
        let mut method_kwargs = None;
        let mut direction = None;
        let mut need_response = None;
        let mut fanout = None;
        let mut uuid = None;
        let mut routing_path = None;
        let mut hop_count = None;
        let mut max_hop_count = None;
        let mut target_cell = None;
        let mut response_uuid = None;
        let mut extra = Map::new();

        // One pass in arrival order, so `extra` keeps the sender's order.
        for (key, value) in map {
            match key.as_str() {
                "message_type" => message_type = Some(value),
                "ctxt" => ctxt = Some(value),
                "method_name" => method_name = Some(value),
                "method_kwargs" => method_kwargs = Some(value),
                "direction" => direction = Some(value),
                "need_response" => need_response = Some(value),
                "fanout" => fanout = Some(value),
                "uuid" => uuid = Some(value),
                "routing_path" => routing_path = Some(value),
                "hop_count" => hop_count = Some(value),
                "max_hop_count" => max_hop_count = Some(value),
                "target_cell" => target_cell = Some(value),
                "response_uuid" => response_uuid = Some(value),
                _ => {
                    extra.insert(key, value);
                }
            }
        }

        let message_type = match message_type {
            Some(Value::String(name)) => match MessageType::from_wire(&name) {
                Some(kind) => kind,
                None => {
                    return Err(invalid(
                        PART,
                        "message_type",
                        "one of \"targeted\", \"broadcast\", \"response\"",
                        &Value::String(name),
                    ))
                }
            },
            Some(other) => {
                return Err(invalid(
                    PART,
                    "message_type",
                    "one of \"targeted\", \"broadcast\", \"response\"",
                    &other,
                ))
            }
            None => {
                return Err(WireError::Missing {
                    part: PART,
                    field: "message_type",
                })
            }
        };
        // Checked in Nova's key order, so the first problem reported is the first on the wire.
        let ctxt = req_object(PART, "ctxt", ctxt)?;
        let method_name = req_string(PART, "method_name", method_name)?;
        let method_kwargs = req_object(PART, "method_kwargs", method_kwargs)?;
        let direction = match direction {
            Some(Value::String(name)) => match Direction::from_wire(&name) {
                Some(direction) => direction,
                None => {
                    return Err(invalid(
                        PART,
                        "direction",
                        "\"up\" or \"down\"",
                        &Value::String(name),
                    ))
                }
            },
            Some(other) => return Err(invalid(PART, "direction", "\"up\" or \"down\"", &other)),
            None => {
                return Err(WireError::Missing {
                    part: PART,
                    field: "direction",
                })
            }
        };
        let need_response = req_bool("need_response", need_response)?;
        let fanout = req_bool("fanout", fanout)?;
        let uuid = req_string(PART, "uuid", uuid)?;
        let routing_path = match routing_path {
            // The key is always written by Nova, but `None` at entry into the tree.
            Some(Value::Null) => String::new(),
            other => req_string(PART, "routing_path", other)?,
        };
        let hop_count = req_count("hop_count", hop_count)?;
        let max_hop_count = req_count("max_hop_count", max_hop_count)?;
        // Nova's targeted and response classes always carry these; without them the message
        // cannot be routed or matched to its request, so refuse it here rather than later.
        if message_type != MessageType::Broadcast && matches!(target_cell, None | Some(Value::Null))
        {
            return Err(WireError::Invalid {
                part: PART,
                field: "target_cell",
                expected: "a string in a targeted or response message",
                got: describe_opt(target_cell.as_ref()),
            });
        }
        if message_type == MessageType::Response
            && matches!(response_uuid, None | Some(Value::Null))
        {
            return Err(WireError::Invalid {
                part: PART,
                field: "response_uuid",
                expected: "a string in a response message",
                got: describe_opt(response_uuid.as_ref()),
            });
        }
        let target_cell = opt_string(PART, "target_cell", target_cell)?;
        let response_uuid = opt_string(PART, "response_uuid", response_uuid)?;

        Ok(CellsMessage {
            message_type,
            ctxt,
            method_name,
            method_kwargs,
            direction,
            need_response,
            fanout,
            uuid,
            routing_path,
            hop_count,
            max_hop_count,
            target_cell,
            response_uuid,
            extra,
        })
    }

    /// The message as Nova writes it: its key order, Python's separators and escapes. A
    /// message parsed from Nova's text re-encodes to the very same bytes.
    pub fn to_json(&self) -> String {
        encode_total(self)
    }

    /// Records that the message reached `cell_name`: `a!b` + `c` = `a!b!c`, an empty path
    /// becomes `c`; the hop count grows by one (saturating, so a hostile count cannot wrap).
    pub fn append_hop(&mut self, cell_name: &str) {
        if !self.routing_path.is_empty() {
            self.routing_path.push('!');
        }
        self.routing_path.push_str(cell_name);
        self.hop_count = self.hop_count.saturating_add(1);
    }

    /// Whether a broadcast should also run in the cell it starts from: Nova's `run_locally`,
    /// which travels as an ordinary key and so lives in `extra`. Anything but a boolean there
    /// means Nova's default, `true`.
    pub fn run_locally(&self) -> bool {
        self.extra
            .get("run_locally")
            .and_then(Value::as_bool)
            .unwrap_or(true)
    }
}

/// Writes the message as a JSON object in Nova's key order; `to_json` is this plus Python
/// formatting.
impl Serialize for CellsMessage {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("message_type", self.message_type.as_str())?;
        map.serialize_entry("ctxt", &self.ctxt)?;
        map.serialize_entry("method_name", &self.method_name)?;
        map.serialize_entry("method_kwargs", &self.method_kwargs)?;
        map.serialize_entry("direction", self.direction.as_str())?;
        map.serialize_entry("need_response", &self.need_response)?;
        map.serialize_entry("fanout", &self.fanout)?;
        map.serialize_entry("uuid", &self.uuid)?;
        map.serialize_entry("routing_path", &self.routing_path)?;
        map.serialize_entry("hop_count", &self.hop_count)?;
        map.serialize_entry("max_hop_count", &self.max_hop_count)?;
        if let Some(target_cell) = &self.target_cell {
            map.serialize_entry("target_cell", target_cell)?;
        }
        if let Some(response_uuid) = &self.response_uuid {
            map.serialize_entry("response_uuid", response_uuid)?;
        }
        for (key, value) in &self.extra {
            if !KNOWN_KEYS.contains(&key.as_str()) {
                map.serialize_entry(key, value)?;
            }
        }
        map.end()
    }
}

fn req_bool(field: &'static str, value: Option<Value>) -> Result<bool, WireError> {
    match value {
        Some(Value::Bool(flag)) => Ok(flag),
        Some(other) => Err(invalid(PART, field, "true or false", &other)),
        None => Err(WireError::Missing { part: PART, field }),
    }
}

/// A hop counter: a JSON integer from 0 to `u32::MAX`. Floats such as `1.0` are refused too;
/// Nova only ever writes integers, so anything else is a broken or forged message.
fn req_count(field: &'static str, value: Option<Value>) -> Result<u32, WireError> {
    let Some(value) = value else {
        return Err(WireError::Missing { part: PART, field });
    };
    match value.as_u64() {
        Some(count) => {
            u32::try_from(count).map_err(|_| invalid(PART, field, "at most 4294967295", &value))
        }
        None => Err(invalid(PART, field, "a non-negative integer", &value)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn each_message_type_is_at_its_index_in_all() {
        for (at, kind) in MessageType::all().into_iter().enumerate() {
            assert_eq!(kind.index(), at, "{kind:?}");
        }
    }

    /// The cells message inside the observed cast sample, as Nova wrote it.
    fn sample_text() -> String {
        let body = include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/wire/cast-process-message.json"
        ));
        let outer: Value = serde_json::from_str(body).unwrap();
        let inner: Value = serde_json::from_str(outer["oslo.message"].as_str().unwrap()).unwrap();
        inner["args"]["message"].as_str().unwrap().to_owned()
    }

    fn minimal() -> Value {
        json!({
            "message_type": "broadcast", "ctxt": {}, "method_name": "m",
            "method_kwargs": {}, "direction": "down", "need_response": false,
            "fanout": false, "uuid": "u", "routing_path": "a", "hop_count": 0,
            "max_hop_count": 10
        })
    }

    fn with(change: impl FnOnce(&mut Map<String, Value>)) -> Result<CellsMessage, WireError> {
        let mut value = minimal();
        if let Value::Object(map) = &mut value {
            change(map);
        }
        CellsMessage::from_json(&value.to_string())
    }

    #[test]
    fn sample_decodes_and_reencodes_byte_for_byte() {
        let text = sample_text();
        let message = CellsMessage::from_json(&text).unwrap();
        assert_eq!(message.message_type, MessageType::Targeted);
        assert_eq!(message.method_name, "run_compute_api_method");
        assert_eq!(message.direction, Direction::Down);
        assert_eq!(message.routing_path, "api-cell");
        assert_eq!(message.hop_count, 1);
        assert_eq!(message.max_hop_count, 10);
        assert_eq!(message.target_cell.as_deref(), Some("api-cell!child-cell2"));
        assert_eq!(message.response_uuid, None);
        assert!(message.extra.is_empty());
        assert_eq!(message.to_json(), text);
    }

    #[test]
    fn unknown_keys_survive_in_order() {
        let text = concat!(
            r#"{"zeta": 1, "message_type": "response", "ctxt": {"b": 1, "a": 2}, "#,
            r#""method_name": "m", "method_kwargs": {}, "alpha": [true], "#,
            r#""direction": "up", "need_response": false, "fanout": false, "uuid": "u", "#,
            r#""routing_path": "x!y", "hop_count": 2, "max_hop_count": 10, "#,
            r#""response_uuid": "r", "target_cell": "x", "run_locally": false}"#
        );
        let message = CellsMessage::from_json(text).unwrap();
        let keys: Vec<&str> = message.extra.keys().map(String::as_str).collect();
        assert_eq!(keys, ["zeta", "alpha", "run_locally"]);
        assert_eq!(
            message.to_json(),
            concat!(
                r#"{"message_type": "response", "ctxt": {"b": 1, "a": 2}, "#,
                r#""method_name": "m", "method_kwargs": {}, "direction": "up", "#,
                r#""need_response": false, "fanout": false, "uuid": "u", "#,
                r#""routing_path": "x!y", "hop_count": 2, "max_hop_count": 10, "#,
                r#""target_cell": "x", "response_uuid": "r", "#,
                r#""zeta": 1, "alpha": [true], "run_locally": false}"#
            )
        );
        assert_eq!(
            CellsMessage::from_json(&message.to_json()).unwrap(),
            message
        );
    }

    #[test]
    fn extra_never_shadows_a_typed_field() {
        let mut message = with(|_| {}).unwrap();
        message.extra.insert("uuid".into(), json!("forged"));
        let text = message.to_json();
        assert_eq!(text.matches("\"uuid\"").count(), 1);
        assert!(!text.contains("forged"));
    }

    #[test]
    fn non_ascii_is_written_as_python_does() {
        let mut message = with(|_| {}).unwrap();
        message.ctxt.insert("user_name".into(), json!("zoë 😀"));
        assert!(message
            .to_json()
            .contains(r#""user_name": "zo\u00eb \ud83d\ude00""#));
        let back = CellsMessage::from_json(&message.to_json()).unwrap();
        assert_eq!(back.ctxt["user_name"], "zoë 😀");
    }

    #[test]
    fn null_routing_path_and_target_cell_are_accepted() {
        let message = with(|map| {
            map.insert("routing_path".into(), Value::Null);
            map.insert("target_cell".into(), Value::Null);
        })
        .unwrap();
        assert_eq!(message.routing_path, "");
        assert_eq!(message.target_cell, None);
        // A broadcast without target_cell is written without the key, as Nova does.
        assert!(!message.to_json().contains("target_cell"));
        assert!(message.to_json().contains(r#""routing_path": """#));
    }

    #[test]
    fn append_hop_extends_the_path() {
        let mut message = with(|_| {}).unwrap();
        message.routing_path = "a!b".into();
        message.hop_count = 1;
        message.append_hop("c");
        assert_eq!(message.routing_path, "a!b!c");
        assert_eq!(message.hop_count, 2);

        message.routing_path.clear();
        message.append_hop("c");
        assert_eq!(message.routing_path, "c");
        assert_eq!(message.hop_count, 3);

        message.hop_count = u32::MAX;
        message.append_hop("d");
        assert_eq!(message.routing_path, "c!d");
        assert_eq!(message.hop_count, u32::MAX);
    }

    #[test]
    fn run_locally_defaults_to_true() {
        assert!(with(|_| {}).unwrap().run_locally());
        let explicit_false = with(|map| {
            map.insert("run_locally".into(), json!(false));
        })
        .unwrap();
        assert!(!explicit_false.run_locally());
        let explicit_true = with(|map| {
            map.insert("run_locally".into(), json!(true));
        })
        .unwrap();
        assert!(explicit_true.run_locally());
        let not_a_bool = with(|map| {
            map.insert("run_locally".into(), json!("no"));
        })
        .unwrap();
        assert!(not_a_bool.run_locally());
    }

    #[test]
    fn bad_hop_counts_are_refused_naming_the_field() {
        for (bad, got) in [
            (json!("x"), "\"x\""),
            (json!(-1), "-1"),
            (json!(1.0), "1.0"),
            (json!(1.5), "1.5"),
            (Value::Null, "null"),
        ] {
            for field in ["hop_count", "max_hop_count"] {
                let err = with(|map| {
                    map.insert(field.into(), bad.clone());
                })
                .unwrap_err();
                assert_eq!(
                    err.to_string(),
                    format!(
                        "cells message: field `{field}` must be a non-negative integer, got {got}"
                    )
                );
                assert_eq!(err.reason_code(), "bad-cells-message");
            }
        }
        let err = with(|map| {
            map.insert("hop_count".into(), json!(4_294_967_296u64));
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "cells message: field `hop_count` must be at most 4294967295, got 4294967296"
        );
        let max = with(|map| {
            map.insert("max_hop_count".into(), json!(4_294_967_295u64));
        })
        .unwrap();
        assert_eq!(max.max_hop_count, u32::MAX);
    }

    #[test]
    fn missing_required_fields_are_named() {
        for field in [
            "message_type",
            "ctxt",
            "method_name",
            "method_kwargs",
            "direction",
            "need_response",
            "fanout",
            "uuid",
            "routing_path",
            "hop_count",
            "max_hop_count",
        ] {
            let err = with(|map| {
                map.shift_remove(field);
            })
            .unwrap_err();
            assert_eq!(
                err,
                WireError::Missing {
                    part: Part::CellsMessage,
                    field
                },
                "{field}"
            );
            assert_eq!(
                err.to_string(),
                format!("cells message: field `{field}` is missing")
            );
        }
    }

    #[test]
    fn wrongly_typed_fields_are_refused() {
        let cases: [(&str, Value); 11] = [
            ("message_type", json!("unicast")),
            ("message_type", json!(1)),
            ("ctxt", json!([])),
            ("ctxt", Value::Null),
            ("method_name", json!(5)),
            ("method_kwargs", json!("{}")),
            ("direction", json!("sideways")),
            ("need_response", json!("false")),
            ("fanout", json!(0)),
            ("uuid", Value::Null),
            ("routing_path", json!(["a"])),
        ];
        for (field, bad) in cases {
            let err = with(|map| {
                map.insert(field.into(), bad.clone());
            })
            .unwrap_err();
            match &err {
                WireError::Invalid { field: named, .. } => assert_eq!(*named, field),
                other => panic!("{field}: unexpected {other:?}"),
            }
            assert!(err.to_string().contains(&super::super::describe(&bad)));
        }
    }

    #[test]
    fn targeted_and_response_need_their_keys() {
        let err = with(|map| {
            map.insert("message_type".into(), json!("targeted"));
        })
        .unwrap_err();
        assert!(err.to_string().contains("`target_cell`"), "{err}");

        let err = with(|map| {
            map.insert("message_type".into(), json!("response"));
            map.insert("target_cell".into(), json!("a"));
        })
        .unwrap_err();
        assert!(err.to_string().contains("`response_uuid`"), "{err}");

        let err = with(|map| {
            map.insert("target_cell".into(), json!(7));
        })
        .unwrap_err();
        assert!(err.to_string().contains("`target_cell`"), "{err}");
    }

    #[test]
    fn non_object_and_non_json_are_refused() {
        let err = CellsMessage::from_json("[1, 2]").unwrap_err();
        assert_eq!(
            err.to_string(),
            "cells message must be a JSON object, got [1,2]"
        );
        assert_eq!(err.reason_code(), "bad-cells-message");
        for text in ["", "{", "{\"a\": }", "nope", "\"str\""] {
            let err = CellsMessage::from_json(text).unwrap_err();
            assert_eq!(err.reason_code(), "bad-cells-message", "{text}");
        }
    }

    #[test]
    fn enums_round_trip_their_names() {
        for kind in MessageType::all() {
            assert_eq!(MessageType::from_wire(kind.as_str()), Some(kind));
        }
        assert_eq!(
            MessageType::all().map(MessageType::as_str),
            ["targeted", "broadcast", "response"]
        );
        assert_eq!(MessageType::from_wire("Targeted"), None);
        assert_eq!(Direction::Up.flipped(), Direction::Down);
        assert_eq!(Direction::Down.flipped(), Direction::Up);
        assert_eq!(Direction::from_wire("up"), Some(Direction::Up));
        assert_eq!(Direction::Down.to_string(), "down");
    }
}
