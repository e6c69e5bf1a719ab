//! Calls across cells (issue: responses): an application calls
//! `process_message` on its cell and gets the response(s) as the call's
//! result, with Nova's semantics, and without Nova's all-or-nothing timeouts.
//! Nova's eight-cell topology, one host per cell, on RabbitMQ and memory://.

use std::collections::BTreeSet;
use std::time::Duration;

use cellhost::client::Outgoing;
use cellhost::wire::{CellResponse, RemoteFailure, Reply, ReplyOutcome};
use cellhost_tests::{Behaviour, Direction, Topology, Transport};
use serde_json::{json, Value};

const CALL_TIMEOUT: Duration = Duration::from_secs(10);

fn one_response(reply: Reply) -> CellResponse {
    match reply.outcome {
        ReplyOutcome::Result(v) => CellResponse::from_value(&v).expect("a response object"),
        ReplyOutcome::Failure(f) => panic!("expected a response, got failure {f:?}"),
    }
}

fn response_list(reply: Reply) -> Vec<CellResponse> {
    match reply.outcome {
        ReplyOutcome::Result(Value::Array(items)) => items
            .iter()
            .map(|v| CellResponse::from_value(v).expect("a response object"))
            .collect(),
        other => panic!("expected a list of responses, got {other:?}"),
    }
}

fn failure_of(r: &CellResponse) -> RemoteFailure {
    assert!(r.failure, "expected a failure: {r:?}");
    RemoteFailure::from_json(r.value.as_str().expect("failure value is JSON text")).expect("parses")
}

fn fail(message: &str) -> Behaviour {
    Behaviour::Fail {
        class: "ValueError".into(),
        message: message.into(),
    }
}

const ALL_PATHS: [&str; 8] = [
    "api-cell",
    "api-cell!child-cell1",
    "api-cell!child-cell2",
    "api-cell!child-cell3",
    "api-cell!child-cell4",
    "api-cell!child-cell2!grandchild-cell1",
    "api-cell!child-cell3!grandchild-cell2",
    "api-cell!child-cell3!grandchild-cell3",
];

async fn a_call_to_a_grandchild_returns_its_value(t: Transport) {
    let topo = Topology::nova(t).await.expect("topology starts");
    let out = Outgoing::targeted(
        "api-cell!child-cell2!grandchild-cell1",
        Direction::Down,
        "get_host_uptime",
    );
    let r = one_response(
        topo.call("api-cell", out, CALL_TIMEOUT)
            .await
            .expect("reply"),
    );
    assert_eq!(r.cell_name, "api-cell!child-cell2!grandchild-cell1");
    assert_eq!(r.value, json!("grandchild-cell1"));
    assert!(!r.failure);
    topo.stop().await;
}

async fn a_call_whose_worker_raises_returns_a_failure(t: Transport) {
    let topo = Topology::nova(t).await.expect("topology starts");
    topo.set_behaviour("grandchild-cell1", fail("disk full on host7"));
    let out = Outgoing::targeted(
        "api-cell!child-cell2!grandchild-cell1",
        Direction::Down,
        "resize",
    );
    let r = one_response(
        topo.call("api-cell", out, CALL_TIMEOUT)
            .await
            .expect("reply"),
    );
    assert_eq!(r.cell_name, "api-cell!child-cell2!grandchild-cell1");
    let f = failure_of(&r);
    assert_eq!(f.class, "ValueError");
    assert_eq!(f.message, "disk full on host7");
    topo.stop().await;
}

async fn a_broadcast_call_gathers_one_response_per_cell(t: Transport) {
    let topo = Topology::nova(t).await.expect("topology starts");
    let call = |max_hops: u32| {
        let mut out = Outgoing::broadcast(Direction::Down, "service_get_all");
        out.max_hop_count = max_hops;
        out
    };
    let all = response_list(
        topo.call("api-cell", call(10), CALL_TIMEOUT)
            .await
            .expect("reply"),
    );
    let names: BTreeSet<&str> = all.iter().map(|r| r.cell_name.as_str()).collect();
    assert_eq!(names, ALL_PATHS.into_iter().collect());
    for r in &all {
        // Each responder's value is its own name, the last part of its path.
        assert_eq!(
            r.value,
            json!(r.cell_name.rsplit('!').next().unwrap_or_default())
        );
        assert!(!r.failure);
    }

    let shallow = response_list(
        topo.call("api-cell", call(2), CALL_TIMEOUT)
            .await
            .expect("reply"),
    );
    assert_eq!(shallow.len(), 5, "{shallow:?}");
    assert!(shallow
        .iter()
        .all(|r| r.cell_name.matches('!').count() <= 1));

    for (cell, _) in cellhost_tests::NOVA {
        topo.set_behaviour(cell, fail("everything is broken"));
    }
    let failed = response_list(
        topo.call("api-cell", call(10), CALL_TIMEOUT)
            .await
            .expect("reply"),
    );
    assert_eq!(failed.len(), 8);
    assert!(failed
        .iter()
        .all(|r| failure_of(r).message == "everything is broken"));

    for (cell, _) in cellhost_tests::NOVA {
        topo.set_behaviour(cell, Behaviour::CellName);
    }
    topo.set_behaviour("child-cell2", fail("child-cell2 is down"));
    topo.set_behaviour("grandchild-cell3", fail("grandchild-cell3 is down"));
    let mixed = response_list(
        topo.call("api-cell", call(10), CALL_TIMEOUT)
            .await
            .expect("reply"),
    );
    let failures: BTreeSet<&str> = mixed
        .iter()
        .filter(|r| r.failure)
        .map(|r| r.cell_name.as_str())
        .collect();
    assert_eq!(
        failures,
        [
            "api-cell!child-cell2",
            "api-cell!child-cell3!grandchild-cell3"
        ]
        .into_iter()
        .collect()
    );
    assert_eq!(mixed.iter().filter(|r| !r.failure).count(), 6);
    topo.stop().await;
}

async fn a_silent_cell_costs_one_failure_entry_not_the_whole_broadcast(t: Transport) {
    let topo = Topology::nova(t).await.expect("topology starts");
    topo.set_behaviour("grandchild-cell2", Behaviour::Silent);
    // The application's own timeout: the answer must come before it.
    let timeout = Duration::from_secs(4);
    let out = Outgoing::broadcast(Direction::Down, "service_get_all");
    let all = response_list(
        topo.call("api-cell", out, timeout)
            .await
            .expect("a reply within the deadline"),
    );
    assert_eq!(all.len(), 8, "{all:?}");
    let failed: Vec<&CellResponse> = all.iter().filter(|r| r.failure).collect();
    assert_eq!(failed.len(), 1, "{all:?}");
    assert_eq!(failed[0].cell_name, "api-cell!child-cell3!grandchild-cell2");
    let f = failure_of(failed[0]);
    assert_eq!(f.class, "CellTimeout");
    assert_eq!(all.iter().filter(|r| !r.failure).count(), 7);
    topo.stop().await;
}

async fn a_call_beyond_max_hop_count_returns_cell_max_hop_count_reached(t: Transport) {
    let topo = Topology::nova(t).await.expect("topology starts");
    let mut out = Outgoing::targeted(
        "api-cell!child-cell2!grandchild-cell1",
        Direction::Down,
        "too_far",
    );
    out.max_hop_count = 2;
    let r = one_response(
        topo.call("api-cell", out, CALL_TIMEOUT)
            .await
            .expect("reply"),
    );
    assert_eq!(
        r.cell_name, "api-cell!child-cell2",
        "the cell that refused answers"
    );
    let f = failure_of(&r);
    assert_eq!(f.class, "CellMaxHopCountReached");
    assert_eq!(f.module, "nova.exception");

    // A routing inconsistency found at the origin itself is answered too.
    let out = Outgoing::targeted("api-cell!child-cell9", Direction::Down, "lost");
    let r = one_response(
        topo.call("api-cell", out, CALL_TIMEOUT)
            .await
            .expect("reply"),
    );
    assert_eq!(failure_of(&r).class, "CellRoutingInconsistency");
    topo.stop().await;
}

async fn hundreds_of_calls_in_flight_get_their_own_answers(t: Transport) {
    let topo = Topology::nova(t).await.expect("topology starts");
    for (cell, _) in cellhost_tests::NOVA {
        topo.set_behaviour(cell, Behaviour::Echo);
    }
    let caller = topo.caller("api-cell").await.expect("caller");
    let targets = [
        "api-cell",
        "api-cell!child-cell1",
        "api-cell!child-cell4",
        "api-cell!child-cell2!grandchild-cell1",
        "api-cell!child-cell3!grandchild-cell3",
    ];
    let calls = (0..300).map(|n| {
        let target = targets[n % targets.len()];
        let mut out = Outgoing::targeted(target, Direction::Down, "echo");
        out.method_kwargs.insert("n".into(), json!(n));
        let (topo, caller) = (&topo, &caller);
        async move {
            let reply = topo
                .call_with(caller, "api-cell", out, Duration::from_secs(60))
                .await
                .unwrap_or_else(|e| panic!("call {n}: {e:#}"));
            (n, target, one_response(reply))
        }
    });
    let results = futures::future::join_all(calls).await;
    assert_eq!(results.len(), 300);
    for (n, target, r) in results {
        assert_eq!(r.cell_name, target, "call {n}");
        assert_eq!(
            r.value["kwargs"]["n"],
            json!(n),
            "call {n} got another call's answer"
        );
    }
    topo.stop().await;
}

cellhost_tests::on_both_transports!(
    a_call_to_a_grandchild_returns_its_value,
    a_call_whose_worker_raises_returns_a_failure,
    a_broadcast_call_gathers_one_response_per_cell,
    a_silent_cell_costs_one_failure_entry_not_the_whole_broadcast,
    a_call_beyond_max_hop_count_returns_cell_max_hop_count_reached,
    hundreds_of_calls_in_flight_get_their_own_answers,
);
