//! Latency of a call across cells: an application on api-cell calls a method
//! on grandchild-cell1 (two hops down, the response two hops back) in Nova's
//! eight-cell topology, one host per cell, one call at a time, on RabbitMQ and
//! on memory://. Prints median, p90, p99 and max over `CALLS` calls (default
//! 3000) after a warm-up.
//!
//!     cargo bench -p cellhost-tests --bench call_latency

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use cellhost::client::Outgoing;
use cellhost::wire::{CellResponse, ReplyOutcome};
use cellhost_tests::{Direction, Topology, Transport};

const TARGET: &str = "api-cell!child-cell2!grandchild-cell1";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let calls: usize = std::env::var("CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    for transport in [Transport::Rabbit, Transport::Memory] {
        let topo = Topology::nova(transport).await?;
        let caller = topo.caller("api-cell").await?;
        let mut samples = Vec::with_capacity(calls);
        for i in 0..calls + 200 {
            let out = Outgoing::targeted(TARGET, Direction::Down, "get_host_uptime");
            let started = Instant::now();
            let reply = topo
                .call_with(&caller, "api-cell", out, Duration::from_secs(30))
                .await?;
            let elapsed = started.elapsed();
            let ReplyOutcome::Result(value) = reply.outcome else {
                bail!("call {i} failed");
            };
            if CellResponse::from_value(&value)?.cell_name != TARGET {
                bail!("call {i} answered by the wrong cell: {value}");
            }
            if i >= 200 {
                samples.push(elapsed);
            }
        }
        samples.sort();
        let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
        let total: Duration = samples.iter().sum();
        println!(
            "{transport:?}: {} calls to {TARGET}: median {:?}, p90 {:?}, p99 {:?}, max {:?}, mean {:?}",
            samples.len(),
            at(0.5),
            at(0.9),
            at(0.99),
            samples[samples.len() - 1],
            total / samples.len() as u32,
        );
        topo.stop().await;
    }
    Ok(())
}
