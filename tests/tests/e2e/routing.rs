//! Nova's routing semantics end to end: Nova's eight-cell topology, one host
//! per cell, the nova-cells policy, and a local worker behind every cell.
//! Each scenario runs on a real RabbitMQ (one vhost per cell) and on memory://.

use cellhost::client::Outgoing;
use cellhost_tests::{Direction, Topology, Transport};
use serde_json::{json, Value};

fn path_of(p: &cellhost::demo::Processed) -> (&str, &str) {
    (p.cell.as_str(), p.routing_path.as_str())
}

async fn targeted_to_grandchild_goes_through_child_cell2_only(t: Transport) {
    let mut topo = Topology::nova(t).await.expect("topology starts");
    let before = topo.counts();
    let mut out = Outgoing::targeted(
        "api-cell!child-cell2!grandchild-cell1",
        Direction::Down,
        "reboot_instance",
    );
    out.method_kwargs.insert(
        "instance".into(),
        json!({"uuid": "9f8c2a52", "flavor": [1, 2]}),
    );
    out.method_kwargs
        .insert("reboot_type".into(), json!("SOFT"));
    out.ctxt.insert("request_id".into(), json!("req-42"));
    out.ctxt.insert("roles".into(), json!(["admin"]));
    let uuid = topo.send("api-cell", out).await.expect("sent");

    let got = topo.processed(&uuid, 1).await.expect("delivered");
    let p = &got[0];
    assert_eq!(
        path_of(p),
        ("grandchild-cell1", "api-cell!child-cell2!grandchild-cell1")
    );
    assert_eq!(p.method, "reboot_instance");
    assert_eq!(
        p.kwargs.get("instance"),
        Some(&json!({"uuid": "9f8c2a52", "flavor": [1, 2]}))
    );
    assert_eq!(p.kwargs.get("reboot_type"), Some(&json!("SOFT")));
    assert_eq!(p.context.get("request_id"), Some(&json!("req-42")));
    assert_eq!(p.context.get("roles"), Some(&json!(["admin"])));
    assert_eq!(
        p.context.get("cell_message_uuid"),
        Some(&Value::String(uuid.clone()))
    );

    // Three hosts saw it (api-cell, child-cell2, grandchild-cell1), two relays,
    // one local delivery: no other cell was involved.
    let after = topo.counts();
    assert_eq!(after.received - before.received, 3);
    assert_eq!(after.relayed - before.relayed, 2);
    assert_eq!(after.delivered_local - before.delivered_local, 1);
    assert_eq!(after.dead_lettered, before.dead_lettered);
    topo.stop().await;
}

async fn targeted_to_self_to_a_child_and_up_to_the_top(t: Transport) {
    let mut topo = Topology::nova(t).await.expect("topology starts");
    let uuid = topo
        .send(
            "api-cell",
            Outgoing::targeted("api-cell", Direction::Down, "to_self"),
        )
        .await
        .expect("sent");
    let got = topo.processed(&uuid, 1).await.expect("delivered");
    assert_eq!(path_of(&got[0]), ("api-cell", "api-cell"));

    let uuid = topo
        .send(
            "api-cell",
            Outgoing::targeted("api-cell!child-cell4", Direction::Down, "to_child"),
        )
        .await
        .expect("sent");
    let got = topo.processed(&uuid, 1).await.expect("delivered");
    assert_eq!(path_of(&got[0]), ("child-cell4", "api-cell!child-cell4"));

    let uuid = topo
        .send(
            "grandchild-cell1",
            Outgoing::targeted(
                "grandchild-cell1!child-cell2!api-cell",
                Direction::Up,
                "to_top",
            ),
        )
        .await
        .expect("sent");
    let got = topo.processed(&uuid, 1).await.expect("delivered");
    assert_eq!(
        path_of(&got[0]),
        ("api-cell", "grandchild-cell1!child-cell2!api-cell")
    );
    assert_eq!(topo.counts().delivered_local, 3);
    topo.stop().await;
}

async fn broadcast_down_is_processed_in_every_cell(t: Transport) {
    let mut topo = Topology::nova(t).await.expect("topology starts");
    let uuid = topo
        .send(
            "api-cell",
            Outgoing::broadcast(Direction::Down, "sync_instances"),
        )
        .await
        .expect("sent");
    let got = topo
        .processed(&uuid, 8)
        .await
        .expect("delivered everywhere");
    let paths: Vec<_> = got.iter().map(path_of).collect();
    assert_eq!(
        paths,
        vec![
            ("api-cell", "api-cell"),
            ("child-cell1", "api-cell!child-cell1"),
            ("child-cell2", "api-cell!child-cell2"),
            ("child-cell3", "api-cell!child-cell3"),
            ("child-cell4", "api-cell!child-cell4"),
            ("grandchild-cell1", "api-cell!child-cell2!grandchild-cell1"),
            ("grandchild-cell2", "api-cell!child-cell3!grandchild-cell2"),
            ("grandchild-cell3", "api-cell!child-cell3!grandchild-cell3"),
        ]
    );

    let before = topo.counts();
    let mut out = Outgoing::broadcast(Direction::Down, "not_at_origin");
    out.run_locally = false;
    let uuid = topo.send("api-cell", out).await.expect("sent");
    let got = topo
        .processed(&uuid, 7)
        .await
        .expect("delivered below the origin");
    assert!(got.iter().all(|p| p.cell != "api-cell"), "{got:?}");
    // Every host received it, seven processed it: none at the origin.
    let after = topo.counts();
    assert_eq!(after.received - before.received, 8);
    assert_eq!(after.delivered_local - before.delivered_local, 7);
    topo.stop().await;
}

async fn broadcast_up_reaches_every_ancestor(t: Transport) {
    let mut topo = Topology::nova(t).await.expect("topology starts");
    let before = topo.counts();
    let uuid = topo
        .send(
            "grandchild-cell3",
            Outgoing::broadcast(Direction::Up, "bw_usage_update_at_top"),
        )
        .await
        .expect("sent");
    let got = topo.processed(&uuid, 3).await.expect("delivered");
    let paths: Vec<_> = got.iter().map(path_of).collect();
    assert_eq!(
        paths,
        vec![
            ("api-cell", "grandchild-cell3!child-cell3!api-cell"),
            ("child-cell3", "grandchild-cell3!child-cell3"),
            ("grandchild-cell3", "grandchild-cell3"),
        ]
    );
    let after = topo.counts();
    assert_eq!(after.received - before.received, 3);
    assert_eq!(after.relayed - before.relayed, 2);
    topo.stop().await;
}

async fn max_hop_count_two_stops_deep_messages(t: Transport) {
    let mut topo = Topology::nova(t).await.expect("topology starts");
    let mut out = Outgoing::broadcast(Direction::Down, "shallow_broadcast");
    out.max_hop_count = 2;
    let before = topo.counts();
    let uuid = topo.send("api-cell", out).await.expect("sent");
    let got = topo
        .processed(&uuid, 5)
        .await
        .expect("delivered to two levels");
    let cells: Vec<_> = got.iter().map(|p| p.cell.as_str()).collect();
    assert_eq!(
        cells,
        [
            "api-cell",
            "child-cell1",
            "child-cell2",
            "child-cell3",
            "child-cell4"
        ]
    );
    // The children received it at hop 2 and, silently as Nova, relayed nothing.
    let after = topo.counts();
    assert_eq!(after.relayed - before.relayed, 4);
    assert_eq!(after.dead_lettered, before.dead_lettered);

    let mut out = Outgoing::targeted(
        "api-cell!child-cell2!grandchild-cell1",
        Direction::Down,
        "too_deep",
    );
    out.max_hop_count = 2;
    let uuid = topo.send("api-cell", out).await.expect("sent");
    if t == Transport::Rabbit {
        let dead = topo
            .dead_letter("child-cell2")
            .await
            .expect("dead-lettered");
        assert_eq!(dead.cell, "child-cell2");
        assert!(dead.reason.contains("CellMaxHopCountReached"), "{dead:?}");
        assert!(String::from_utf8_lossy(&dead.body).contains(&uuid));
    } else {
        wait_for(|| topo.counts().dead_lettered == after.dead_lettered + 1).await;
    }
    assert_eq!(topo.counts().delivered_local, after.delivered_local);
    topo.stop().await;
}

async fn inconsistent_targets_and_unknown_hops_are_dead_lettered(t: Transport) {
    let topo = Topology::nova(t).await.expect("topology starts");
    // The target does not extend the path api-cell.
    let uuid = topo
        .send(
            "api-cell",
            Outgoing::targeted("child-cell2!grandchild-cell1", Direction::Down, "lost"),
        )
        .await
        .expect("sent");
    if t == Transport::Rabbit {
        let dead = topo.dead_letter("api-cell").await.expect("dead-lettered");
        assert!(dead.reason.contains("CellRoutingInconsistency"), "{dead:?}");
        assert!(
            dead.reason.contains("child-cell2!grandchild-cell1"),
            "{dead:?}"
        );
        assert!(String::from_utf8_lossy(&dead.body).contains(&uuid));
    } else {
        wait_for(|| topo.counts().dead_lettered == 1).await;
    }
    // The next hop is no child of api-cell.
    let uuid = topo
        .send(
            "api-cell",
            Outgoing::targeted("api-cell!child-cell9", Direction::Down, "lost"),
        )
        .await
        .expect("sent");
    if t == Transport::Rabbit {
        let dead = topo.dead_letter("api-cell").await.expect("dead-lettered");
        assert!(dead.reason.contains("Unknown child"), "{dead:?}");
        assert!(String::from_utf8_lossy(&dead.body).contains(&uuid));
    } else {
        wait_for(|| topo.counts().dead_lettered == 2).await;
    }
    assert_eq!(topo.counts().delivered_local, 0);
    topo.stop().await;
}

/// Waits for a condition on host counters, which change as hosts plan messages.
async fn wait_for(cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + cellhost_tests::PATIENCE;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met in time"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

cellhost_tests::on_both_transports!(
    targeted_to_grandchild_goes_through_child_cell2_only,
    targeted_to_self_to_a_child_and_up_to_the_top,
    broadcast_down_is_processed_in_every_cell,
    broadcast_up_reaches_every_ancestor,
    max_hop_count_two_stops_deep_messages,
    inconsistent_targets_and_unknown_hops_are_dead_lettered,
);
