//! `cellhost policy bench`: how fast a policy decides, measured where the
//! host pays for it.
//!
//! This file owns the sample messages and the measurement. Each sample is a
//! message arriving at a cell of Nova's eight-cell topology; the policy's
//! view of it is built once, outside the timing, and only
//! `PolicyInstance::route` on one reused instance is timed, call by call,
//! after a warm-up. What it reports: calls per second (calls over the time
//! spent inside them) and the median, 99th percentile and worst call.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};

use super::{decision_notation, policy_view, BenchArgs};
use crate::config::TransportUrl;
use crate::policy::{Cell, EngineOptions, LoadedPolicy, Message, PolicyInstance};
use crate::topology::{tree_configs, NOVA_TOPOLOGY};
use crate::wire::CellsMessage;

/// A sample: what it is, the cell receiving it, and the message as sent to
/// that cell (routing path and hop count as the previous hop left them).
const SAMPLES: [(&str, &str, &str); 3] = [
    (
        "targeted to a grandchild",
        "child-cell3",
        r#"{"message_type": "targeted", "ctxt": {"request_id": "req-bench"}, "method_name": "reboot_instance", "method_kwargs": {"instance": "9f8c2a52"}, "direction": "down", "need_response": false, "fanout": false, "uuid": "bench-targeted", "routing_path": "api-cell", "hop_count": 1, "max_hop_count": 10, "target_cell": "api-cell!child-cell3!grandchild-cell2"}"#,
    ),
    (
        "broadcast down from the top",
        "api-cell",
        r#"{"message_type": "broadcast", "ctxt": {"request_id": "req-bench"}, "method_name": "sync_instances", "method_kwargs": {}, "direction": "down", "need_response": false, "fanout": false, "uuid": "bench-broadcast", "routing_path": null, "hop_count": 0, "max_hop_count": 10}"#,
    ),
    (
        "response on its way up",
        "child-cell2",
        r#"{"message_type": "response", "ctxt": {"request_id": "req-bench"}, "method_name": "parse_responses", "method_kwargs": {"response": {"result": "ok"}}, "direction": "up", "need_response": false, "fanout": false, "uuid": "bench-response", "routing_path": "grandchild-cell1", "hop_count": 1, "max_hop_count": 10, "target_cell": "grandchild-cell1!child-cell2!api-cell", "response_uuid": "bench-targeted"}"#,
    ),
];

struct Sample {
    label: &'static str,
    cell: &'static str,
    view: Message,
    cell_view: Cell,
    /// Per-call times, in nanoseconds.
    timings: Vec<u64>,
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let (_, policy) = args.policy.load(EngineOptions {
        concurrency_support: args.concurrency_support,
        perf_map: args.perf_map,
        ..EngineOptions::default()
    })?;
    let url = TransportUrl::Memory {
        name: "policy-bench".to_string(),
    };
    let configs = tree_configs(&NOVA_TOPOLOGY, |_| url.clone());
    let mut samples = Vec::with_capacity(SAMPLES.len());
    for (label, cell, text) in SAMPLES {
        let config = configs
            .iter()
            .find(|c| c.cell.name == cell)
            .with_context(|| format!("sample {label:?}: no cell {cell} in Nova's topology"))?;
        let message = CellsMessage::from_json(text)
            .map_err(|e| anyhow!("sample {label:?} does not decode: {e}"))?;
        let (view, cell_view) = policy_view(config, message);
        samples.push(Sample {
            label,
            cell,
            view,
            cell_view,
            timings: Vec::new(),
        });
    }

    let mut instance = fresh_instance(&policy)?;
    let mut decisions = Vec::with_capacity(samples.len());
    for sample in &samples {
        let result = instance.route(&sample.view, &sample.cell_view);
        decisions.push(decision_notation(&result).join(", "));
        result.map_err(|e| anyhow!("policy failed on sample {:?}: {e}", sample.label))?;
    }

    let warm_up = (args.iterations / 10).max(100);
    let count = samples.len() as u64;
    for i in 0..warm_up {
        let sample = &samples[(i % count) as usize];
        // Each sample routed once above; a failure now is the machine's
        // doing (see below), so only a poisoned instance needs handling.
        if let Err(e) = instance.route(&sample.view, &sample.cell_view) {
            if e.poisons_instance() {
                instance = fresh_instance(&policy)?;
            }
        }
    }
    for sample in &mut samples {
        sample
            .timings
            .reserve((args.iterations / count + 1) as usize);
    }
    // Failures during the run are counted, not fatal: one call that misses
    // its deadline (a fresh instance faulting in its memory, say) should not
    // throw away the measurement. Their time is kept in the
    // figures; it was spent.
    let mut failures: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut renewals = 0u64;
    for i in 0..args.iterations {
        let sample = &mut samples[(i % count) as usize];
        let started = Instant::now();
        let result = instance.route(&sample.view, &sample.cell_view);
        let elapsed = started.elapsed();
        sample
            .timings
            .push(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX));
        // The actions are dropped only after the clock has stopped.
        if let Err(e) = result {
            *failures.entry(e.reason_code()).or_default() += 1;
            if e.poisons_instance() {
                // As the router does: a poisoned instance is replaced.
                instance = fresh_instance(&policy)?;
            }
        } else if instance.worn_out() {
            // As the router does: renewed before its memory runs out.
            renewals += 1;
            instance = fresh_instance(&policy)?;
        }
    }

    let mut out = String::new();
    let _ = writeln!(
        out,
        "policy       {} ({})",
        policy.source(),
        policy.version()
    );
    let _ = writeln!(
        out,
        "engine       component-model concurrency support {}",
        if args.concurrency_support {
            "ON"
        } else {
            "off (as the host runs)"
        }
    );
    let _ = writeln!(
        out,
        "calls        {} timed after {warm_up} warm-up calls, one reused instance, Nova's eight cells",
        args.iterations
    );
    if renewals > 0 {
        let _ = writeln!(
            out,
            "renewals     {renewals} (instances replaced between calls, their memory past the renewal mark)"
        );
    }
    if !failures.is_empty() {
        let counts: Vec<String> = failures
            .iter()
            .map(|(code, n)| format!("{n} {code}"))
            .collect();
        let _ = writeln!(
            out,
            "failures     {} (included in the figures)",
            counts.join(", ")
        );
    }
    for (sample, decision) in samples.iter().zip(&decisions) {
        let _ = writeln!(
            out,
            "sample       {} at {}: {decision}",
            sample.label, sample.cell
        );
    }
    let _ = writeln!(
        out,
        "\n{:<32} {:>10} {:>10} {:>10} {:>12}",
        "", "median", "p99", "max", "calls/s"
    );
    let mut all = Vec::with_capacity(args.iterations as usize);
    for sample in &mut samples {
        all.extend_from_slice(&sample.timings);
        write_row(&mut out, sample.label, &mut sample.timings);
    }
    write_row(&mut out, "all", &mut all);
    print!("{out}");
    Ok(())
}

fn fresh_instance(policy: &Arc<LoadedPolicy>) -> Result<PolicyInstance> {
    policy
        .instantiate()
        .map_err(|e| e.context(format!("policy {}: cannot instantiate", policy.source())))
}

fn write_row(out: &mut String, label: &str, timings: &mut [u64]) {
    let Some(stats) = Stats::of(timings) else {
        return;
    };
    let _ = writeln!(
        out,
        "{label:<32} {:>10} {:>10} {:>10} {:>12.0}",
        format!("{:.2?}", stats.median),
        format!("{:.2?}", stats.p99),
        format!("{:.2?}", stats.max),
        stats.calls_per_second
    );
}

struct Stats {
    median: Duration,
    p99: Duration,
    max: Duration,
    calls_per_second: f64,
}

impl Stats {
    /// Summarises per-call times in nanoseconds (sorting them); `None` when empty.
    fn of(timings: &mut [u64]) -> Option<Stats> {
        timings.sort_unstable();
        let n = timings.len();
        let max = *timings.last()?;
        // Nearest-rank percentiles: the smallest time at least that share of calls took.
        let rank = |p: usize| timings[(n * p).div_ceil(100).clamp(1, n) - 1];
        let total: u64 = timings.iter().sum();
        Some(Stats {
            median: Duration::from_nanos(rank(50)),
            p99: Duration::from_nanos(rank(99)),
            max: Duration::from_nanos(max),
            calls_per_second: n as f64 / (total.max(1) as f64 / 1e9),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut timings: Vec<u64> = (1..=200).rev().collect();
        let stats = Stats::of(&mut timings).expect("not empty");
        assert_eq!(stats.median, Duration::from_nanos(100));
        assert_eq!(stats.p99, Duration::from_nanos(198));
        assert_eq!(stats.max, Duration::from_nanos(200));
        assert!(Stats::of(&mut []).is_none());
        let mut one = [7];
        assert_eq!(
            Stats::of(&mut one).expect("one").p99,
            Duration::from_nanos(7)
        );
    }
}
