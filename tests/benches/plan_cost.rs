//! The in-process cost of relaying one message: cellhost's router planning
//! the relay of a cells message from `top` to `leaf` (decode the oslo body,
//! run the nova-cells policy, decide, encode the body for the next hop), with
//! no broker and no I/O. The bodies are those of the relay throughput bench,
//! at each size in `BODY_BYTES` (default `1024,4096`). With `DELIVERY=local`
//! the messages are for `top` itself, and the plan is their delivery to
//! `top`'s own application (the oslo cast of the method, the context and
//! where the message came from written out) instead of a relay.
//!
//! Run as a bench, it prints the wall time per plan. It is meant above all to
//! be run under callgrind, collecting only inside `measured`, which plans
//! `PLANS` messages (default 20 000) after a warm-up: the instructions
//! callgrind counts there, divided by `PLANS`, are the instructions cellhost
//! spends per relayed message, a figure that does not move with the load on
//! the machine. The plan's claim on the message's uuid is dropped, which lets
//! the uuid go, as the relay throughput bench's "plan alone" does.
//! `scripts/plan-instructions` builds this bench and does the counting:
//!
//!     cargo bench -p cellhost-tests --bench plan_cost
//!     scripts/plan-instructions
//!     BODY_BYTES=1024 PLANS=2000 valgrind --tool=callgrind --collect-atstart=no \
//!         --toggle-collect='plan_cost::measured' target/release/deps/plan_cost-<hash>

use std::hint::black_box;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use cellhost::router::Disposition;
use cellhost::router::RouteWorker;
use cellhost_tests::bench::{bodies, body_sizes_from_env, local_bodies, top_route_worker};

/// Plans before the measured ones: the first instantiate the policy and
/// warm the caches.
const WARM_UP: usize = 500;

#[global_allocator]
static ALLOCATOR: cellhost::Allocator = cellhost::Allocator;

fn main() -> Result<()> {
    let plans = match std::env::var("PLANS") {
        Ok(value) => value
            .parse::<usize>()
            .with_context(|| format!("PLANS={value:?} is not a number"))?,
        Err(_) => 20_000,
    };
    ensure!(plans > 0, "PLANS must be positive");
    let local = match std::env::var("DELIVERY").as_deref() {
        Ok("local") => true,
        Ok("relay") | Err(_) => false,
        Ok(other) => anyhow::bail!("DELIVERY={other:?}: expected relay or local"),
    };
    let sizes = body_sizes_from_env()?;
    let policy = cellhost_tests::plugin("nova_cells", "")?;
    for body_bytes in sizes {
        let mut worker = top_route_worker(&policy);
        // A body for every plan: each message has a uuid of its own, as in a
        // real backlog.
        let all = if local {
            local_bodies(WARM_UP + plans, body_bytes)?
        } else {
            bodies(WARM_UP + plans, body_bytes)?
        };
        let (warm_up, bodies) = all.split_at(WARM_UP);
        for body in warm_up {
            let plan = worker.plan(body, None);
            // What is measured is the delivery asked for, nothing else.
            match &plan.disposition {
                Disposition::Routed {
                    local: here,
                    relays,
                    ..
                } if *here == local && relays.len() == usize::from(!local) => {}
                other => anyhow::bail!("a warm-up plan was not the delivery asked for: {other:?}"),
            }
        }
        let mean = bodies.iter().map(Vec::len).sum::<usize>() / bodies.len();
        let started = Instant::now();
        let outcome = measured(&mut worker, bodies);
        let took = started.elapsed();
        ensure!(
            outcome.odd_plans == 0,
            "{} of {plans} plans were not one publication",
            outcome.odd_plans
        );
        println!(
            "BODY_BYTES={body_bytes}: {plans} plans ({}) of {mean}-byte bodies, \
             {:.2} µs per plan ({} bytes published on average)",
            if local { "local deliveries" } else { "relays" },
            took.as_secs_f64() * 1e6 / plans as f64,
            outcome.published_bytes / plans,
        );
    }
    Ok(())
}

/// What the measured plans produced, so none of it can be optimised away.
#[derive(Debug, Default)]
struct Outcome {
    published_bytes: usize,
    /// Plans that were not exactly one publication.
    odd_plans: usize,
}

/// Plans the relay of every body: the code callgrind counts
/// (`--toggle-collect='plan_cost::measured'`), kept out of line so it has a
/// symbol of its own.
#[inline(never)]
fn measured(worker: &mut RouteWorker, bodies: &[Vec<u8>]) -> Outcome {
    let mut outcome = Outcome::default();
    for body in bodies {
        let plan = worker.plan(black_box(body), None);
        if plan.sends.len() != 1 {
            outcome.odd_plans += 1;
        }
        for (_, publication) in &plan.sends {
            outcome.published_bytes += black_box(publication.body.len());
        }
    }
    black_box(outcome)
}
