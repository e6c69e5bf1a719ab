//! What the benches share: the cells messages they relay, sized to the
//! `BODY_BYTES` asked for, and the router of cell `top` that plans them
//! without a broker.
//!
//! Every body is an oslo cast of `process_message`, as an application on
//! `top` sends it, carrying a targeted cells message for `top!leaf` (a relay
//! to the child; [`local_bodies`]: for `top` itself, a local delivery) with a
//! small Nova request context. The message's kwargs are padded up to the size:
//! first with instance metadata entries (many small JSON strings, as Nova's
//! instance objects are), then with a `user_data` string for the last bytes.
//! All bodies of one size share one padding layout, so they differ in length
//! by a few bytes at most.

use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use cellhost::client::{entry_cast, Outgoing};
use cellhost::config::{Config, TransportUrl};
use cellhost::policy::LoadedPolicy;
use cellhost::router::{RouteWorker, Router};
use cellhost::topology::tree_configs;
use cellhost::wire::Direction;
use serde_json::{json, Map, Value};

/// The benches' topology: `top` and its one child `leaf`.
pub const PAIR: [(&str, Option<&str>); 2] = [("top", None), ("leaf", Some("top"))];
/// Where every bench message is headed.
pub const TARGET: &str = "top!leaf";
/// The body sizes benched when `BODY_BYTES` is not set.
pub const DEFAULT_BODY_BYTES: [usize; 2] = [1024, 4096];

/// The sizes listed in `BODY_BYTES` (`1024,4096`), or [`DEFAULT_BODY_BYTES`].
pub fn body_sizes_from_env() -> Result<Vec<usize>> {
    let Ok(listed) = std::env::var("BODY_BYTES") else {
        return Ok(DEFAULT_BODY_BYTES.to_vec());
    };
    let sizes = listed
        .split(',')
        .map(str::trim)
        .filter(|size| !size.is_empty())
        .map(|size| {
            size.parse::<usize>().with_context(|| {
                format!("BODY_BYTES={listed:?}: {size:?} is not a number of bytes")
            })
        })
        .collect::<Result<Vec<_>>>()?;
    ensure!(
        !sizes.is_empty(),
        "BODY_BYTES={listed:?} lists no size (expected e.g. 1024,4096)"
    );
    Ok(sizes)
}

/// `count` distinct bodies (each message has its own uuid) for [`TARGET`],
/// each about `body_bytes` long. Fails if `body_bytes` is below the
/// unpadded body.
pub fn bodies(count: usize, body_bytes: usize) -> Result<Vec<Vec<u8>>> {
    bodies_for(TARGET, count, body_bytes)
}

/// As [`bodies`], but for `top` itself: what `top`'s router delivers to its
/// own cell's application instead of relaying.
pub fn local_bodies(count: usize, body_bytes: usize) -> Result<Vec<Vec<u8>>> {
    bodies_for("top", count, body_bytes)
}

fn bodies_for(target: &str, count: usize, body_bytes: usize) -> Result<Vec<Vec<u8>>> {
    let padding = Padding::fitting(target, body_bytes)?;
    Ok((0..count).map(|i| body(target, i, &padding)).collect())
}

/// `top`'s config in the pair topology, on in-memory transports that are
/// never used: for deciding about messages, not sending them.
pub fn top_config() -> Config {
    tree_configs(&PAIR, |cell| TransportUrl::Memory {
        name: format!("plan-{cell}"),
    })
    .into_iter()
    .find(|c| c.cell.name == "top")
    .expect("top is in PAIR")
}

/// A router for `top` (pair topology, `policy`) on [`top_config`]'s
/// transports: [`RouteWorker::plan`] only decides, it sends nothing.
pub fn top_route_worker(policy: &Arc<LoadedPolicy>) -> RouteWorker {
    RouteWorker::new(Router::new(
        top_config(),
        policy.clone(),
        "reply_plan".into(),
    ))
}

/// How a message's kwargs are padded: `metadata` entries of
/// [`METADATA_VALUE_LEN`] characters, then a `user_data` string.
#[derive(Debug, Clone, Copy)]
struct Padding {
    metadata: usize,
    user_data: usize,
}

const METADATA_VALUE_LEN: usize = 24;
/// What `user_data` is made of: base64, as Nova carries it.
const BASE64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

impl Padding {
    /// The layout that brings a body to `body_bytes`, worked out on one
    /// probe message. Neither kind of padding needs escaping, so a body grows
    /// by a fixed amount per metadata entry and by one byte per `user_data`
    /// character, whatever JSON-in-JSON the envelope nests them in.
    fn fitting(target: &str, body_bytes: usize) -> Result<Padding> {
        let len = |metadata, user_data| {
            body(
                target,
                0,
                &Padding {
                    metadata,
                    user_data,
                },
            )
            .len()
        };
        let smallest = len(0, 0);
        ensure!(
            body_bytes >= smallest,
            "a body of {body_bytes} bytes is too small: the unpadded bench message takes {smallest}"
        );
        let per_entry = len(2, 0) - len(1, 0);
        let mut metadata = (body_bytes - smallest) / per_entry;
        // The first entry also opens the object, so the estimate may be one over.
        while metadata > 0 && len(metadata, 0) > body_bytes {
            metadata -= 1;
        }
        // `user_data` costs its key, then a byte a character. When what is
        // left is less than the key, one entry fewer leaves room for both.
        let mut before_user_data = len(metadata, 1) - 1;
        if body_bytes <= before_user_data && metadata > 0 {
            metadata -= 1;
            before_user_data = len(metadata, 1) - 1;
        }
        Ok(Padding {
            metadata,
            user_data: body_bytes.saturating_sub(before_user_data),
        })
    }
}

/// The `i`th bench body for `target`.
fn body(target: &str, i: usize, padding: &Padding) -> Vec<u8> {
    let host = format!("compute-{:02}", i % 64);
    let mut kwargs = object(json!({
        "instance": {
            "uuid": uuid::Uuid::new_v4().to_string(),
            "host": host,
        },
        "reboot_type": "SOFT",
    }));
    if padding.metadata > 0 {
        let metadata: Map<String, Value> = (0..padding.metadata)
            .map(|entry| {
                let key = format!("meta_{entry:05}");
                (key, Value::String(filler(i + entry, METADATA_VALUE_LEN)))
            })
            .collect();
        kwargs.insert("metadata".into(), Value::Object(metadata));
    }
    if padding.user_data > 0 {
        kwargs.insert(
            "user_data".into(),
            Value::String(filler(i, padding.user_data)),
        );
    }
    let mut outgoing = Outgoing::targeted(target, Direction::Down, "reboot_instance");
    outgoing.method_kwargs = kwargs;
    outgoing.ctxt = object(json!({
        "request_id": format!("req-{}", uuid::Uuid::new_v4()),
        "project_id": "0c7e3a9b5d1f4e2a8c6b4d2f0e8a6c4b",
    }));
    // Only the body is kept: each bench publishes it where its relay reads.
    entry_cast("nova", "cells.intercell", &outgoing.to_message())
        .body
        .into()
}

/// `len` base64 characters, varying with `seed`.
fn filler(seed: usize, len: usize) -> String {
    (0..len)
        .map(|j| char::from(BASE64[(seed.wrapping_mul(31) + j * 7) % BASE64.len()]))
        .collect()
}

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => unreachable!("object() is given JSON object literals"),
    }
}
