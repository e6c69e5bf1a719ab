//! The counters a cell's router keeps, read by the admin endpoint, the
//! metrics and the tests.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters a host exposes.
#[derive(Debug, Default)]
pub struct Stats {
    pub received: AtomicU64,
    pub delivered_local: AtomicU64,
    pub relayed: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub dropped: AtomicU64,
    pub duplicates: AtomicU64,
    pub policy_failures: AtomicU64,
    pub publish_failures: AtomicU64,
    /// Responses that came after their waiter had given up.
    pub late_responses: AtomicU64,
    /// Times a failing policy version was unloaded for the previous one.
    pub fallbacks: AtomicU64,
    /// Policy instances replaced between calls because their memory had
    /// grown past their renewal mark (see `PolicyInstance::worn_out`).
    pub instances_renewed: AtomicU64,
    /// Messages the shadow policy was asked about, and how many it decided
    /// differently from the active one.
    pub shadow_compared: AtomicU64,
    pub shadow_differences: AtomicU64,
    /// Relays parked for a neighbour that could not take them, and parked
    /// relays moved on to their neighbour since.
    pub parked: AtomicU64,
    pub unparked: AtomicU64,
    /// Publications no queue took, dead-lettered.
    pub unroutable: AtomicU64,
}

impl Stats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
