//! The admin listener: health, the policy each cell runs, a reload request,
//! and Prometheus metrics. Bound to loopback unless the operator says
//! otherwise (`[admin] listen`).
//!
//! - `GET /health`: 200 when every cell consumes all of its topics, 503 not.
//! - `GET /policy`: per cell, the active version (content hash, source, when
//!   loaded), the shadow and its difference count, the last reload error.
//! - `POST /reload`: reloads every cell's policy from its file.
//! - `GET /metrics`: the hosts' counters in Prometheus' text format.
//!
//! It reads what the routers and reloaders expose; it routes nothing.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use serde_json::{json, Value};

use crate::policy::LoadedPolicy;
use crate::reload::{PolicyReloader, Reloaded};
use crate::router::{Router, Stats, OWN_LINK};

/// What the admin listener can see of one cell.
#[derive(Clone)]
pub struct AdminCell {
    pub router: Arc<Router>,
    pub reloader: Option<Arc<PolicyReloader>>,
}

type Cells = Arc<Vec<AdminCell>>;

/// A counter family: name, help text, and how to read it from a router's stats.
type Counter = (&'static str, &'static str, fn(&Stats) -> u64);

/// Binds `listen` and serves the admin API until the process ends.
pub async fn serve(listen: SocketAddr, cells: Vec<AdminCell>) -> Result<SocketAddr> {
    let app = axum::Router::new()
        .route("/health", get(health))
        .route("/policy", get(policy))
        .route("/reload", post(reload))
        .route("/metrics", get(metrics))
        .with_state(Arc::new(cells));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("admin listener: cannot bind {listen}"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "admin listener stopped");
        }
    });
    tracing::info!(%bound, "admin listener up");
    Ok(bound)
}

/// 503 while a cell does not consume or its own broker's link is down; a
/// neighbour's link that is down makes the cell degraded, not unhealthy
/// (its relays are parked), and is named in the body either way.
async fn health(State(cells): State<Cells>) -> Response {
    let mut unhealthy = Vec::new();
    let mut degraded = Vec::new();
    for c in cells.iter() {
        let cell = c.router.cell_name();
        if !c.router.consuming() {
            unhealthy.push(format!("{cell}: not consuming"));
        }
        for (link, state) in c.router.link_states() {
            if state.up {
                continue;
            }
            let why = state.last_error.unwrap_or_else(|| "connecting".into());
            if link == OWN_LINK {
                unhealthy.push(format!("{cell}: link to its own broker down: {why}"));
            } else {
                degraded.push(format!(
                    "{cell}: link to neighbour {link} down (relays are parked): {why}"
                ));
            }
        }
    }
    let mut body = String::new();
    for line in unhealthy.iter().chain(&degraded) {
        let _ = writeln!(body, "{line}");
    }
    if unhealthy.is_empty() {
        if body.is_empty() {
            body.push_str("ok\n");
        }
        (StatusCode::OK, body).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

fn version(p: &LoadedPolicy) -> Value {
    let loaded = p
        .loaded_at()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    json!({"hash": p.hash(), "version": p.version(), "source": p.source(), "loaded_at_unix": loaded})
}

async fn policy(State(cells): State<Cells>) -> Json<Value> {
    let report: Vec<Value> = cells
        .iter()
        .map(|c| {
            let s = &c.router.stats;
            json!({
                "cell": c.router.cell_name(),
                "active": version(&c.router.active_policy()),
                "shadow": c.router.shadow_policy().map(|p| json!({
                    "policy": version(&p),
                    "compared": Stats::get(&s.shadow_compared),
                    "differences": Stats::get(&s.shadow_differences),
                })),
                "reloads": c.reloader.as_ref().map(|r| r.swaps()),
                "last_reload_error": c.reloader.as_ref().and_then(|r| r.last_error()),
                "fallbacks": Stats::get(&s.fallbacks),
                "instances_renewed": Stats::get(&s.instances_renewed),
                "neighbours": sorted(&c.router.neighbours().names),
                "last_neighbours_error": c.router.neighbours_error(),
            })
        })
        .collect();
    Json(Value::Array(report))
}

async fn reload(State(cells): State<Cells>) -> Response {
    let mut report = Vec::new();
    let mut failed = false;
    for c in cells.iter() {
        let outcome = match &c.reloader {
            None => json!({"error": "reloading is not enabled"}),
            Some(r) => match r.reload().await {
                Ok(Reloaded::Swapped { hash }) => json!({"swapped": hash}),
                Ok(Reloaded::Unchanged) => json!({"unchanged": c.router.active_policy().hash()}),
                Err(e) => {
                    failed = true;
                    json!({"error": format!("{e:#}")})
                }
            },
        };
        report.push(json!({"cell": c.router.cell_name(), "outcome": outcome}));
    }
    let status = if failed {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::OK
    };
    (status, Json(Value::Array(report))).into_response()
}

async fn metrics(State(cells): State<Cells>) -> Response {
    // The counters already live in each router; the text format is a few
    // lines per family, so they are written out directly.
    let counters: [Counter; 16] = [
        (
            "received",
            "Messages received on the intercell topics",
            |s| Stats::get(&s.received),
        ),
        (
            "delivered_local",
            "Messages delivered to the cell's application",
            |s| Stats::get(&s.delivered_local),
        ),
        ("relayed", "Relays to neighbour cells", |s| {
            Stats::get(&s.relayed)
        }),
        (
            "dead_lettered",
            "Messages sent to the dead-letter queue",
            |s| Stats::get(&s.dead_lettered),
        ),
        ("dropped", "Messages the policy chose to drop", |s| {
            Stats::get(&s.dropped)
        }),
        ("duplicates", "Duplicate messages dropped by uuid", |s| {
            Stats::get(&s.duplicates)
        }),
        (
            "policy_failures",
            "Policy calls that trapped, timed out or returned an error",
            |s| Stats::get(&s.policy_failures),
        ),
        (
            "publish_failures",
            "Messages requeued because a publication failed",
            |s| Stats::get(&s.publish_failures),
        ),
        (
            "late_responses",
            "Responses that came after their request stopped waiting",
            |s| Stats::get(&s.late_responses),
        ),
        (
            "policy_fallbacks",
            "Failing policy versions unloaded for the previous one",
            |s| Stats::get(&s.fallbacks),
        ),
        (
            "policy_instances_renewed",
            "Policy instances replaced between calls before their memory ran out",
            |s| Stats::get(&s.instances_renewed),
        ),
        (
            "shadow_compared",
            "Messages the shadow policy was asked about",
            |s| Stats::get(&s.shadow_compared),
        ),
        (
            "shadow_differences",
            "Messages the shadow policy decided differently",
            |s| Stats::get(&s.shadow_differences),
        ),
        (
            "parked",
            "Relays parked for a neighbour that could not take them",
            |s| Stats::get(&s.parked),
        ),
        (
            "unparked",
            "Parked relays moved on to their neighbour",
            |s| Stats::get(&s.unparked),
        ),
        (
            "unroutable",
            "Publications no queue took, dead-lettered",
            |s| Stats::get(&s.unroutable),
        ),
    ];
    let mut out = String::new();
    for (name, help, read) in counters {
        let _ = writeln!(out, "# HELP cellhost_{name}_total {help}.");
        let _ = writeln!(out, "# TYPE cellhost_{name}_total counter");
        for c in cells.iter() {
            let _ = writeln!(
                out,
                "cellhost_{name}_total{{cell=\"{}\"}} {}",
                c.router.cell_name(),
                read(&c.router.stats)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP cellhost_policy_reload_errors 1 while the last reload failed."
    );
    let _ = writeln!(out, "# TYPE cellhost_policy_reload_errors gauge");
    for c in cells.iter() {
        let failing = c
            .reloader
            .as_ref()
            .is_some_and(|r| r.last_error().is_some());
        let _ = writeln!(
            out,
            "cellhost_policy_reload_errors{{cell=\"{}\"}} {}",
            c.router.cell_name(),
            failing as u8
        );
    }
    let _ = writeln!(
        out,
        "# HELP cellhost_link_up 1 while the link to a broker (own, or a neighbour's) is up."
    );
    let _ = writeln!(out, "# TYPE cellhost_link_up gauge");
    for c in cells.iter() {
        for (link, state) in c.router.link_states() {
            let _ = writeln!(
                out,
                "cellhost_link_up{{cell=\"{}\",link=\"{link}\"}} {}",
                c.router.cell_name(),
                state.up as u8
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP cellhost_link_connections_total Connections opened on a link (1 plus its reconnections)."
    );
    let _ = writeln!(out, "# TYPE cellhost_link_connections_total counter");
    for c in cells.iter() {
        for (link, state) in c.router.link_states() {
            let _ = writeln!(
                out,
                "cellhost_link_connections_total{{cell=\"{}\",link=\"{link}\"}} {}",
                c.router.cell_name(),
                state.generation
            );
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

fn sorted(names: &std::collections::HashSet<String>) -> Vec<&String> {
    let mut names: Vec<_> = names.iter().collect();
    names.sort();
    names
}
