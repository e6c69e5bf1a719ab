//! Duplicates by message `uuid` (issue 9): a copy of a message that was
//! carried out is acknowledged and counted, never carried out again; a message
//! that was dead-lettered is carried out when an operator replays it; and a
//! call retried with the same uuid gets its answer every time. Each scenario
//! runs on a real RabbitMQ (one vhost per cell) and on memory://.

use std::time::Duration;

use cellhost::client::{call_into, entry_cast, Outgoing};
use cellhost::router::Stats;
use cellhost::transport::{Broker, Outcome, Publication};
use cellhost::wire::{CellResponse, CellsMessage, MessageType, ReplyOutcome};
use cellhost_tests::{plugin, Direction, Topology, Transport, PATIENCE};
use futures::StreamExt;
use serde_json::{json, Value};

const CALL_TIMEOUT: Duration = Duration::from_secs(10);

const PAIR: [(&str, Option<&str>); 2] = [("top", None), ("leaf", Some("top"))];

fn duplicates_of(topo: &mut Topology, cell: &str) -> u64 {
    Stats::get(&topo.host_mut(cell).router().stats.duplicates)
}

/// Waits, within the test's patience, until `cell` has counted `count`
/// duplicates.
async fn duplicates_reach(topo: &mut Topology, cell: &str, count: u64) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while duplicates_of(topo, cell) < count {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{cell} counted {} duplicates, expected {count}",
            duplicates_of(topo, cell)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(duplicates_of(topo, cell), count, "{cell}");
}

/// Publishes `message` onto `cell`'s intercell topic `times` times, as a
/// sender that sent it again would.
async fn send_times(topo: &Topology, cell: &str, message: &CellsMessage, times: usize) {
    let config = topo.config(cell);
    let publication = entry_cast(
        &config.cell.control_exchange,
        &config.cell.queue_base,
        message,
    );
    for _ in 0..times {
        topo.publish_raw(cell, publication.clone())
            .await
            .expect("published");
    }
}

/// Takes the next message from `cell`'s dead-letter queue, as an operator's
/// tool would, on either transport.
async fn take_dead_letter(topo: &Topology, cell: &str) -> Vec<u8> {
    let config = topo.config(cell);
    let broker = Broker::connect(
        &config.cell.transport_url,
        &config.oslo_messaging_rabbit,
        "test-operator",
    )
    .await
    .expect("connects to the cell's broker");
    let queue = format!("{}.dead", config.cell.queue_base);
    let mut inbox = broker
        .consume(std::slice::from_ref(&queue), 1, "test-operator")
        .await
        .expect("consumes the dead-letter queue");
    let dead = tokio::time::timeout(PATIENCE, inbox.next())
        .await
        .unwrap_or_else(|_| panic!("no dead letter reached {queue} on {cell}"))
        .expect("the dead-letter queue stays open");
    let body = dead.body.clone();
    dead.settle(Outcome::Ack);
    drop(inbox);
    broker.close().await;
    body
}

fn response_of(reply: cellhost::wire::Reply) -> CellResponse {
    match reply.outcome {
        ReplyOutcome::Result(v) => CellResponse::from_value(&v).expect("a response object"),
        ReplyOutcome::Failure(f) => panic!("expected a response, got failure {f:?}"),
    }
}

fn cell_names(reply: cellhost::wire::Reply) -> Vec<String> {
    match reply.outcome {
        ReplyOutcome::Result(Value::Array(items)) => {
            let mut names: Vec<String> = items
                .iter()
                .map(|v| {
                    let r = CellResponse::from_value(v).expect("a response object");
                    assert!(!r.failure, "{r:?}");
                    r.cell_name
                })
                .collect();
            names.sort();
            names
        }
        other => panic!("expected a list of responses, got {other:?}"),
    }
}

async fn a_message_sent_twice_is_carried_out_once(t: Transport) {
    let mut topo = Topology::nova(t).await.expect("topology starts");
    let target = "api-cell!child-cell2!grandchild-cell1";

    // The application sends it twice.
    let mut out = Outgoing::targeted(target, Direction::Down, "reboot_instance");
    out.method_kwargs
        .insert("instance".into(), json!("9f8c2a52"));
    let message = out.to_message();
    send_times(&topo, "api-cell", &message, 2).await;
    let got = topo.processed(&message.uuid, 1).await.expect("delivered");
    assert_eq!(got[0].cell, "grandchild-cell1");
    duplicates_reach(&mut topo, "api-cell", 1).await;

    // A relay arrives twice, as after a lost confirm: child-cell2 carries it
    // out once.
    let mut relayed = Outgoing::targeted(target, Direction::Down, "resize").to_message();
    relayed.routing_path = "api-cell".into();
    relayed.hop_count = 1;
    send_times(&topo, "child-cell2", &relayed, 2).await;
    let got = topo.processed(&relayed.uuid, 1).await.expect("delivered");
    assert_eq!(got[0].routing_path, target);
    duplicates_reach(&mut topo, "child-cell2", 1).await;

    // A later message on the same road arrives, and nothing else did.
    let marker = topo
        .send(
            "api-cell",
            Outgoing::targeted(target, Direction::Down, "marker"),
        )
        .await
        .expect("sent");
    topo.processed(&marker, 1).await.expect("delivered");
    let leaf = topo.counts_of("grandchild-cell1");
    assert_eq!(leaf.received, 3, "{leaf:?}");
    assert_eq!(leaf.delivered_local, 3, "{leaf:?}");
    assert_eq!(duplicates_of(&mut topo, "grandchild-cell1"), 0);
    assert_eq!(topo.counts().dead_lettered, 0);
    topo.stop().await;
}

async fn a_dead_lettered_message_replayed_by_an_operator_is_carried_out(t: Transport) {
    // The adversary refuses `fail` with a policy error: a dead letter.
    let policy = plugin("adversary", "").expect("adversary plugin loads");
    let mut topo = Topology::start(t, &PAIR, policy)
        .await
        .expect("topology starts");
    let uuid = topo
        .send(
            "top",
            Outgoing::targeted("top!leaf", Direction::Down, "fail"),
        )
        .await
        .expect("sent");
    let body = take_dead_letter(&topo, "top").await;
    assert!(String::from_utf8_lossy(&body).contains(&uuid));
    assert_eq!(topo.counts_of("top").dead_lettered, 1);

    // The operator fixes the policy and replays the dead letter as it was.
    let fixed = plugin("nova_cells", "").expect("nova-cells plugin loads");
    for cell in ["top", "leaf"] {
        topo.host_mut(cell).router().swap_policy(fixed.clone());
    }
    let config = topo.config("top");
    let topic = format!(
        "{}.{}",
        config.cell.queue_base,
        MessageType::Targeted.as_str()
    );
    let replay = Publication::new(config.cell.control_exchange.clone(), topic, body);
    topo.publish_raw("top", replay.clone())
        .await
        .expect("replayed");

    let got = topo.processed(&uuid, 1).await.expect("carried out");
    assert_eq!(
        (got[0].cell.as_str(), got[0].routing_path.as_str()),
        ("leaf", "top!leaf")
    );
    assert_eq!(got[0].method, "fail");
    assert_eq!(duplicates_of(&mut topo, "top"), 0);
    assert_eq!(topo.counts_of("top").dead_lettered, 1);

    // Carried out, it is remembered now: a second replay is a duplicate.
    topo.publish_raw("top", replay)
        .await
        .expect("replayed again");
    duplicates_reach(&mut topo, "top", 1).await;
    topo.stop().await;
}

async fn a_call_retried_with_the_same_uuid_gets_its_answer_both_times(t: Transport) {
    let mut topo = Topology::nova(t).await.expect("topology starts");
    let caller = topo.caller("api-cell").await.expect("caller");
    let config = topo.config("api-cell").clone();
    let call = |message: CellsMessage| {
        let (caller, config) = (&caller, &config);
        async move {
            call_into(
                caller,
                &config.cell.control_exchange,
                &config.cell.queue_base,
                &message,
                CALL_TIMEOUT,
            )
            .await
            .expect("the call is answered")
        }
    };

    // A targeted call, then the same message again with a new `_msg_id`.
    let target = "api-cell!child-cell2!grandchild-cell1";
    let message = Outgoing::targeted(target, Direction::Down, "get_host_uptime").to_message();
    for attempt in 1..=2 {
        let r = response_of(call(message.clone()).await);
        assert_eq!(r.cell_name, target, "attempt {attempt}");
        assert_eq!(r.value, json!("grandchild-cell1"), "attempt {attempt}");
        assert!(!r.failure, "attempt {attempt}");
    }
    let got = topo.processed(&message.uuid, 2).await.expect("both");
    assert!(got.iter().all(|p| p.cell == "grandchild-cell1"));

    // A broadcast call gathers at every hop: each hop carries the retry out.
    let broadcast = Outgoing::broadcast(Direction::Down, "list_instances").to_message();
    for attempt in 1..=2 {
        let names = cell_names(call(broadcast.clone()).await);
        assert_eq!(names.len(), 8, "attempt {attempt}: {names:?}");
    }
    for cell in ["api-cell", "child-cell2", "grandchild-cell1"] {
        assert_eq!(duplicates_of(&mut topo, cell), 0, "{cell}");
    }
    topo.stop().await;
}

cellhost_tests::on_both_transports!(
    a_message_sent_twice_is_carried_out_once,
    a_dead_lettered_message_replayed_by_an_operator_is_carried_out,
    a_call_retried_with_the_same_uuid_gets_its_answer_both_times,
);
