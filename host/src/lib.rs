//! cellhost: a WebAssembly-pluggable message host for hierarchical cells.
//!
//! One message takes one road through these modules:
//!
//! ```text
//! broker --(transport: amqp | memory)--> wire codec --> router --> policy (Wasm) --> actions
//!       <--(transport publish, confirmed)------------ router <-------------------------'
//!                    then the source is acked
//! ```
//!
//! - [`transport`]: brokers, queues, confirms, acks; nothing of cells.
//! - [`wire`]: the oslo envelope and the cells message JSON; nothing of AMQP.
//! - [`policy`]: wasmtime and the `cellhost:policy` world; nothing of brokers.
//! - [`router`]: cells semantics and the host's invariants.
//! - [`links`]: the own and the neighbours' brokers; parking relays for a
//!   neighbour that cannot take them, and draining them when it can.
//! - [`responses`]: waiting for answers and sending them on.
//! - [`reload`]: swapping a cell's policy while it runs; [`file_watch`]:
//!   noticing that a file it reads (policy, neighbours) changed.
//! - [`admin`]: health, policy state, reload requests and metrics over HTTP.
//! - [`host`]: one running cell, wiring the above together.
//! - [`client`]: what an application does to send into the network.
//! - [`config`], [`demo`], [`plugins`]: configuration, the in-memory demo,
//!   and the policies built with this crate.
//! - [`policy_tools`]: `cellhost policy check | test | bench`, a policy on
//!   the bench with no broker.
//! - [`sched`]: the scheduling class the binary puts its threads in.

pub mod admin;
pub mod client;
pub mod config;
pub mod demo;
pub mod file_watch;
pub mod host;
pub mod lanes;
pub mod links;
pub mod neighbours;
pub mod plugins;
pub mod policy;
pub mod policy_tools;
pub mod reload;
pub mod responses;
pub mod router;
pub mod sched;
pub mod topology;
pub mod transport;
pub mod wire;

/// The allocator cellhost's binaries install (`#[global_allocator]`): the
/// relay allocates a few buffers per message on several threads, which
/// mimalloc serves with less work than the system allocator.
pub use mimalloc::MiMalloc as Allocator;

pub use config::Config;
pub use host::CellHost;

/// Locks `m`. No code here panics while holding one of the host's locks,
/// so a poisoned lock still guards consistent data: recover it.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A fresh oslo `_unique_id` (also used for reply queues and call ids): a
/// uuid4 in hex, as oslo.messaging makes them.
pub fn new_unique_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}
