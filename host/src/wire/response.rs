//! A cell's answer to a message that wanted one: `{"cell_name", "value",
//! "failure"}`, as Nova's `Response` serializes it. A failure's value is the
//! JSON text of the remote exception (`class`, `module`, `message`, ...).
//!
//! Nova puts each response on the wire as a JSON *string* inside the
//! `responses` list of a `parse_responses` message; both that form and a plain
//! object are read.

use serde_json::{Map, Value};

use super::{json::value_to_python_json, Part, RemoteFailure, WireError};

/// One cell's response.
#[derive(Debug, Clone, PartialEq)]
pub struct CellResponse {
    /// The responder's routing path, e.g. `api-cell!child-cell2`.
    pub cell_name: String,
    pub value: Value,
    pub failure: bool,
}

impl CellResponse {
    pub fn ok(cell_name: impl Into<String>, value: Value) -> CellResponse {
        CellResponse {
            cell_name: cell_name.into(),
            value,
            failure: false,
        }
    }

    pub fn failed(cell_name: impl Into<String>, failure: &RemoteFailure) -> CellResponse {
        CellResponse {
            cell_name: cell_name.into(),
            value: Value::String(failure.to_json()),
            failure: true,
        }
    }

    /// The response as a JSON object, keys in Nova's order.
    pub fn to_value(&self) -> Value {
        let mut map = Map::new();
        map.insert("cell_name".into(), Value::String(self.cell_name.clone()));
        map.insert("value".into(), self.value.clone());
        map.insert("failure".into(), Value::Bool(self.failure));
        Value::Object(map)
    }

    /// The response as the JSON text Nova sends.
    pub fn to_json(&self) -> String {
        value_to_python_json(&self.to_value())
    }

    /// Reads a response given as an object or as JSON text holding one.
    pub fn from_value(value: &Value) -> Result<CellResponse, WireError> {
        let parsed;
        let object = match value {
            Value::String(text) => {
                parsed = serde_json::from_str::<Value>(text).map_err(|e| WireError::NotJson {
                    part: Part::CellsMessage,
                    detail: format!("response: {e}"),
                })?;
                &parsed
            }
            other => other,
        };
        let Value::Object(map) = object else {
            return Err(WireError::Invalid {
                part: Part::CellsMessage,
                field: "responses",
                expected: "response objects",
                got: short(object),
            });
        };
        let cell_name = match map.get("cell_name") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(WireError::Invalid {
                    part: Part::CellsMessage,
                    field: "cell_name",
                    expected: "a string",
                    got: short(other),
                })
            }
            None => {
                return Err(WireError::Missing {
                    part: Part::CellsMessage,
                    field: "cell_name",
                })
            }
        };
        let failure = match map.get("failure") {
            Some(Value::Bool(b)) => *b,
            None | Some(Value::Null) => false,
            Some(other) => {
                return Err(WireError::Invalid {
                    part: Part::CellsMessage,
                    field: "failure",
                    expected: "a boolean",
                    got: short(other),
                })
            }
        };
        Ok(CellResponse {
            cell_name,
            value: map.get("value").cloned().unwrap_or(Value::Null),
            failure,
        })
    }
}

/// A failure in the terms of Nova's exceptions (module `nova.exception`).
pub fn nova_failure(class: &str, message: impl Into<String>) -> RemoteFailure {
    RemoteFailure {
        class: class.to_string(),
        module: "nova.exception".to_string(),
        message: message.into(),
        tb: Vec::new(),
        args: Vec::new(),
        kwargs: Map::new(),
    }
}

fn short(v: &Value) -> String {
    v.to_string().chars().take(60).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_reads_back_from_nova_string_form_and_object_form() {
        let r = CellResponse::ok("api-cell!child-cell2", serde_json::json!({"x": [1, 2]}));
        assert_eq!(
            r.to_json(),
            r#"{"cell_name": "api-cell!child-cell2", "value": {"x": [1, 2]}, "failure": false}"#
        );
        assert_eq!(
            CellResponse::from_value(&Value::String(r.to_json())).ok(),
            Some(r.clone())
        );
        assert_eq!(CellResponse::from_value(&r.to_value()).ok(), Some(r));
    }

    #[test]
    fn a_failure_carries_the_exception_as_json_text() {
        let f = nova_failure("CellTimeout", "Timeout waiting for response from cell");
        let r = CellResponse::failed("api-cell", &f);
        assert!(r.failure);
        let text = r.value.as_str().expect("a JSON string");
        let back = RemoteFailure::from_json(text).expect("parses");
        assert_eq!(back.class, "CellTimeout");
        assert_eq!(back.module, "nova.exception");
    }

    #[test]
    fn malformed_responses_are_errors() {
        assert!(CellResponse::from_value(&serde_json::json!(3)).is_err());
        assert!(CellResponse::from_value(&serde_json::json!({"value": 1})).is_err());
        assert!(CellResponse::from_value(&Value::String("{".into())).is_err());
    }
}
