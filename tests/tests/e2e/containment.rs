//! What must not take a cell down: policies that trap, loop or eat memory,
//! components whose memories or tables outgrow the sandbox, and input that
//! is not a cells message. Each bad message is dead-lettered
//! with its reason, and the next good one is routed as usual.

use cellhost::client::Outgoing;
use cellhost::transport::Publication;
use cellhost_tests::{plugin, plugin_with, Direction, Topology, Transport};

const PAIR: [(&str, Option<&str>); 2] = [("top", None), ("leaf", Some("top"))];

async fn adversary_pair(t: Transport) -> Topology {
    let policy = plugin("adversary", "").expect("adversary plugin loads");
    Topology::start(t, &PAIR, policy)
        .await
        .expect("topology starts")
}

/// Sends a normal message and checks it is routed: the host still serves.
async fn still_routes(topo: &mut Topology, method: &str) {
    let uuid = topo
        .send(
            "top",
            Outgoing::targeted("top!leaf", Direction::Down, method),
        )
        .await
        .expect("sent");
    let got = topo
        .processed(&uuid, 1)
        .await
        .expect("the next message is routed");
    assert_eq!(got[0].cell, "leaf");
    assert_eq!(got[0].routing_path, "top!leaf");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trapping_policy_fails_only_that_message() {
    let mut topo = adversary_pair(Transport::Rabbit).await;
    let uuid = topo
        .send(
            "top",
            Outgoing::targeted("top!leaf", Direction::Down, "trap"),
        )
        .await
        .expect("sent");
    let dead = topo.dead_letter("top").await.expect("dead-lettered");
    assert_eq!(dead.code, "policy-trap", "{dead:?}");
    // The guest's panic message reaches the reason.
    assert!(
        dead.reason.contains("adversary: trap requested"),
        "{dead:?}"
    );
    assert!(String::from_utf8_lossy(&dead.body).contains(&uuid));
    still_routes(&mut topo, "after_trap").await;
    topo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_that_loops_forever_is_stopped_at_its_deadline() {
    let mut topo = adversary_pair(Transport::Rabbit).await;
    topo.send(
        "top",
        Outgoing::targeted("top!leaf", Direction::Down, "spin"),
    )
    .await
    .expect("sent");
    let dead = topo.dead_letter("top").await.expect("dead-lettered");
    assert_eq!(dead.code, "policy-deadline", "{dead:?}");
    assert!(dead.reason.contains("deadline"), "{dead:?}");
    still_routes(&mut topo, "after_spin").await;
    topo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_that_grows_memory_without_bound_hits_its_cap() {
    // A deadline long enough that only the 16 MiB cap can stop it.
    let policy = plugin_with("adversary", "", |p| p.deadline_ms = 2_000).expect("loads");
    let mut topo = Topology::start(Transport::Rabbit, &PAIR, policy)
        .await
        .expect("topology starts");
    topo.send(
        "top",
        Outgoing::targeted("top!leaf", Direction::Down, "hog"),
    )
    .await
    .expect("sent");
    let dead = topo.dead_letter("top").await.expect("dead-lettered");
    assert_eq!(dead.code, "policy-trap", "{dead:?}");
    assert!(
        dead.reason.to_lowercase().contains("memory"),
        "{}",
        dead.reason
    );
    still_routes(&mut topo, "after_hog").await;
    topo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_policies_are_contained_on_memory_too() {
    let mut topo = adversary_pair(Transport::Memory).await;
    for (i, method) in ["trap", "spin", "hog"].into_iter().enumerate() {
        topo.send(
            "top",
            Outgoing::targeted("top!leaf", Direction::Down, method),
        )
        .await
        .expect("sent");
        still_routes(&mut topo, &format!("after_{method}")).await;
        assert_eq!(topo.counts().dead_lettered, i as u64 + 1);
    }
    topo.stop().await;
}

fn cast_body(message_json: &str) -> Vec<u8> {
    let inner = serde_json::json!({
        "method": "process_message",
        "args": {"message": message_json},
        "version": "1.0",
        "_unique_id": "0123456789abcdef0123456789abcdef",
    });
    serde_json::json!({"oslo.version": "2.0", "oslo.message": inner.to_string()})
        .to_string()
        .into_bytes()
}

fn cells_json(mutate: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> String {
    let mut m = Outgoing::targeted("top!leaf", Direction::Down, "x").to_message();
    m.routing_path.clear();
    let mut value: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&m.to_json()).expect("our own JSON parses");
    mutate(&mut value);
    serde_json::Value::Object(value).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_is_dead_lettered_and_the_host_keeps_serving() {
    let policy = plugin("nova_cells", "").expect("policy loads");
    let mut topo = Topology::start(Transport::Rabbit, &PAIR, policy)
        .await
        .expect("topology starts");
    let oversized = {
        let mut body = cast_body(&cells_json(|_| {}));
        body.extend(std::iter::repeat_n(b' ', 1 << 20));
        body
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("not JSON", b"this is not json {".to_vec(), "not-json"),
        (
            "wrong envelope",
            br#"{"oslo.version": "2.0", "payload": "{}"}"#.to_vec(),
            "bad-envelope",
        ),
        (
            "inner message not a string",
            br#"{"oslo.version": "2.0", "oslo.message": {"method": "process_message"}}"#.to_vec(),
            "bad-envelope",
        ),
        (
            "missing field",
            cast_body(&cells_json(|m| {
                m.remove("direction");
            })),
            "bad-cells-message",
        ),
        (
            "mistyped field",
            cast_body(&cells_json(|m| {
                m.insert("hop_count".into(), serde_json::json!("three"));
            })),
            "bad-cells-message",
        ),
        (
            "cells message not JSON",
            cast_body("{{{"),
            "bad-cells-message",
        ),
        ("body over the size limit", oversized, "too-large"),
    ];
    for (what, body, code) in cases {
        topo.publish_raw(
            "top",
            Publication::new("nova", "cells.intercell.targeted", body.clone()),
        )
        .await
        .expect("published");
        let dead = topo
            .dead_letter("top")
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(dead.code, code, "{what}: {dead:?}");
        assert!(!dead.reason.is_empty(), "{what}");
        assert_eq!(dead.body, body, "{what}: the original body is kept");
        still_routes(&mut topo, "after_bad_input").await;
    }
    topo.stop().await;
}

/// Sends `method` to the adversary at `top` and returns its dead letter.
async fn provoke(topo: &Topology, method: &str) -> cellhost_tests::DeadLetter {
    topo.send(
        "top",
        Outgoing::targeted("top!leaf", Direction::Down, method),
    )
    .await
    .expect("sent");
    topo.dead_letter("top").await.expect("dead-lettered")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_recursion_traps_and_is_contained() {
    let mut topo = adversary_pair(Transport::Rabbit).await;
    let dead = provoke(&topo, "recurse").await;
    // Rust keeps its stack in linear memory: running off its bottom is an
    // out-of-bounds access there, or wasm's own stack overflow, by frame size.
    assert_eq!(dead.code, "policy-trap", "{dead:?}");
    assert!(
        dead.reason.contains("out of bounds memory access")
            || dead.reason.contains("stack overflow"),
        "{}",
        dead.reason
    );
    still_routes(&mut topo, "after_recurse").await;
    topo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_action_list_is_refused_whole() {
    // Building 100 000 actions takes longer than the default deadline, which
    // would stop it first; with time enough, the action cap must.
    let policy = plugin_with("adversary", "", |p| p.deadline_ms = 2_000).expect("loads");
    let mut topo = Topology::start(Transport::Rabbit, &PAIR, policy)
        .await
        .expect("topology starts");
    let before = topo.counts();
    let dead = provoke(&topo, "flood").await;
    assert_eq!(dead.code, "policy-too-many-actions", "{dead:?}");
    assert!(dead.reason.contains("100000 actions"), "{}", dead.reason);
    // Not one of the 100 000 relays was carried out.
    assert_eq!(topo.counts().relayed, before.relayed);
    still_routes(&mut topo, "after_flood").await;
    topo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relaying_to_a_cell_that_is_no_neighbour_is_refused() {
    let mut topo = adversary_pair(Transport::Rabbit).await;
    let dead = provoke(&topo, "stray").await;
    assert_eq!(dead.code, "policy-unknown-neighbour", "{dead:?}");
    assert!(dead.reason.contains("no-such-cell"), "{}", dead.reason);
    still_routes(&mut topo, "after_stray").await;
    topo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_sees_no_files_and_no_environment() {
    let mut topo = adversary_pair(Transport::Rabbit).await;
    // The adversary reports what it could reach as its error.
    let dead = provoke(&topo, "read-file").await;
    assert_eq!(dead.code, "policy-error", "{dead:?}");
    assert!(
        dead.reason.contains("reading /etc/hostname failed"),
        "{}",
        dead.reason
    );
    let dead = provoke(&topo, "read-env").await;
    assert!(
        dead.reason
            .contains("0 environment variables visible, HOME visible: false"),
        "{}",
        dead.reason
    );
    still_routes(&mut topo, "after_snooping").await;
    topo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_granted_data_folder_is_readable_and_nothing_more() {
    let dir = std::env::temp_dir().join(format!("cellhost-data-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("greeting.txt"), "routing table v7\n").expect("written");
    let granted = dir.clone();
    let policy = plugin_with("adversary", "", |p| p.data_dir = Some(granted)).expect("loads");
    let mut topo = Topology::start(Transport::Rabbit, &PAIR, policy)
        .await
        .expect("topology starts");
    let dead = provoke(&topo, "read-data").await;
    assert!(
        dead.reason
            .contains(r#"/data/greeting.txt says \"routing table v7\""#)
            || dead.reason.contains(r#"says "routing table v7""#),
        "{}",
        dead.reason
    );
    let dead = provoke(&topo, "write-data").await;
    assert!(
        dead.reason.contains("writing /data/graffiti.txt failed"),
        "{}",
        dead.reason
    );
    assert!(!dir.join("graffiti.txt").exists(), "the grant is read-only");
    // Outside the grant, still nothing.
    let dead = provoke(&topo, "read-file").await;
    assert!(
        dead.reason.contains("reading /etc/hostname failed"),
        "{}",
        dead.reason
    );
    still_routes(&mut topo, "after_data").await;
    topo.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_that_sleeps_is_refused_not_waited_for() {
    let mut topo = adversary_pair(Transport::Rabbit).await;
    let dead = provoke(&topo, "sleep").await;
    assert_eq!(dead.code, "policy-trap", "{dead:?}");
    assert!(!dead.reason.contains("slept 30 s"), "{}", dead.reason);
    still_routes(&mut topo, "after_sleep").await;
    topo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_too_large_in_bytes_is_refused() {
    // Building a MiB of text can pass the 5 ms deadline on a loaded CI
    // machine; this test is about the size of the answer, not its time.
    let policy = plugin_with("adversary", "", |p| p.deadline_ms = 2_000).expect("loads");
    let mut topo = Topology::start(Transport::Rabbit, &PAIR, policy)
        .await
        .expect("topology starts");
    let dead = provoke(&topo, "bloat").await;
    assert_eq!(dead.code, "policy-actions-too-large", "{dead:?}");
    assert!(
        dead.reason.contains("1048576 bytes of actions"),
        "{}",
        dead.reason
    );
    still_routes(&mut topo, "after_bloat").await;
    topo.stop().await;
}

/// A hand-written component policy (text form) that routes every message to
/// its own cell, except `grow-memory` (a second core module already holds
/// 12 MiB; it grows its own memory to 12 MiB more) and `grow-table` (grows
/// a table without end).
const GREEDY: &str = include_str!("../../../host/tests/components/greedy.wat");

const SOLO: [(&str, Option<&str>); 1] = [("solo", None)];

async fn greedy_cell(t: Transport) -> Topology {
    // A deadline long enough that only the sandbox's limits can stop it.
    let section = cellhost::config::PolicySection {
        deadline_ms: 2_000,
        ..Default::default()
    };
    let policy = cellhost_tests::engine()
        .load(
            "greedy.wat",
            GREEDY.as_bytes(),
            "",
            cellhost::plugins::limits(&section),
        )
        .expect("the greedy policy loads");
    Topology::start(t, &SOLO, policy)
        .await
        .expect("topology starts")
}

/// Sends a message the greedy policy routes to `solo` itself, and checks
/// it arrives.
async fn solo_still_routes(topo: &mut Topology, method: &str) {
    let uuid = topo
        .send("solo", Outgoing::targeted("solo", Direction::Down, method))
        .await
        .expect("sent");
    let got = topo
        .processed(&uuid, 1)
        .await
        .expect("the next message is routed");
    assert_eq!(got[0].cell, "solo");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memories_that_together_pass_the_cap_are_contained() {
    let mut topo = greedy_cell(Transport::Rabbit).await;
    solo_still_routes(&mut topo, "before").await;
    topo.send(
        "solo",
        Outgoing::targeted("solo", Direction::Down, "grow-memory"),
    )
    .await
    .expect("sent");
    let dead = topo.dead_letter("solo").await.expect("dead-lettered");
    assert_eq!(dead.code, "policy-trap", "{dead:?}");
    assert!(
        dead.reason.contains("memory limit") && dead.reason.contains("24 MiB"),
        "{}",
        dead.reason
    );
    solo_still_routes(&mut topo, "after_grow_memory").await;
    topo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_grown_without_end_is_contained() {
    let mut topo = greedy_cell(Transport::Rabbit).await;
    topo.send(
        "solo",
        Outgoing::targeted("solo", Direction::Down, "grow-table"),
    )
    .await
    .expect("sent");
    let dead = topo.dead_letter("solo").await.expect("dead-lettered");
    assert_eq!(dead.code, "policy-trap", "{dead:?}");
    assert!(dead.reason.contains("table limit"), "{}", dead.reason);
    solo_still_routes(&mut topo, "after_grow_table").await;
    topo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_components_are_contained_on_memory_too() {
    let mut topo = greedy_cell(Transport::Memory).await;
    for (i, method) in ["grow-memory", "grow-table"].into_iter().enumerate() {
        topo.send("solo", Outgoing::targeted("solo", Direction::Down, method))
            .await
            .expect("sent");
        solo_still_routes(&mut topo, &format!("after_{method}")).await;
        assert_eq!(topo.counts().dead_lettered, i as u64 + 1);
    }
    topo.stop().await;
}

/// A policy whose memory grows a MiB with every message (as a runtime that
/// keeps a little per call does, only faster): without renewal its instance
/// would trap at the 16 MiB cap about every fifteenth message and cost it.
/// The host renews the instance at its mark instead, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_whose_memory_creeps_up_is_renewed_and_loses_nothing() {
    let mut topo = adversary_pair(Transport::Memory).await;
    let mut uuids = Vec::new();
    for _ in 0..40 {
        let uuid = topo
            .send(
                "top",
                Outgoing::targeted("top!leaf", Direction::Down, "leak"),
            )
            .await
            .expect("sent");
        uuids.push(uuid);
    }
    for uuid in &uuids {
        let got = topo.processed(uuid, 1).await.expect("processed");
        assert_eq!(got[0].cell, "leaf");
    }
    assert_eq!(topo.counts().dead_lettered, 0, "no message was lost");
    let renewed: u64 = ["top", "leaf"]
        .iter()
        .map(|cell| {
            let host = topo.host_mut(cell);
            cellhost::router::Stats::get(&host.router().stats.instances_renewed)
        })
        .sum();
    assert!(renewed >= 4, "instances renewed: {renewed}");
    topo.stop().await;
}
