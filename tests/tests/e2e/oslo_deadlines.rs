//! Call deadlines and call monitoring as a real oslo.messaging 18.3.1 carries
//! them: the caller's timeout in the AMQP `expiration`, the call-monitor
//! timeout in `_timeout`, heartbeats as replies with `ending` false.
//!
//! The callers and the workers behind the cells are real oslo.messaging
//! processes; a hung worker is one that sleeps longer than anyone waits.

use std::time::Duration;

use cellhost::client::Outgoing;
use cellhost_tests::oslo::{oslo_call, oslo_url, OsloCall, OsloProcess};
use cellhost_tests::{plugin, Behaviour, Direction, Topology, Transport, NOVA};
use serde_json::{json, Value};

const PAIR: [(&str, Option<&str>); 2] = [("top", None), ("leaf", Some("top"))];
const CHAIN: [(&str, Option<&str>); 3] =
    [("top", None), ("mid", Some("top")), ("leaf", Some("mid"))];

/// Longer than any caller in these tests waits.
const HUNG: Duration = Duration::from_secs(30);

async fn rabbit_cells(topology: &[(&str, Option<&str>)]) -> Topology {
    let policy = plugin("nova_cells", "").expect("the nova-cells policy loads");
    Topology::start_with(Transport::Rabbit, topology, policy, false)
        .await
        .expect("the cells start")
}

/// One oslo worker per cell, each with its delay; they boot together.
fn oslo_workers(topo: &Topology, cells: &[&str], slow: &[(&str, Duration)]) -> Vec<OsloProcess> {
    let delay = |cell: &str| {
        slow.iter()
            .find(|(c, _)| *c == cell)
            .map(|(_, d)| *d)
            .unwrap_or_default()
    };
    let spawned: Vec<OsloProcess> = cells
        .iter()
        .map(|cell| OsloProcess::worker(&oslo_url(topo, cell), cell, delay(cell)))
        .collect();
    spawned.into_iter().map(OsloProcess::ready).collect()
}

/// A message as an application hands it to `process_message`.
fn entering(outgoing: Outgoing) -> Value {
    let mut m = outgoing.to_message();
    m.need_response = true;
    m.ctxt.insert("request_id".into(), json!("req-deadline"));
    serde_json::from_str(&m.to_json()).expect("our JSON parses")
}

/// Calls with a real oslo client, off the runtime's threads.
async fn call(url: String, message: Value, timeout: f64, monitor: Option<f64>) -> OsloCall {
    tokio::task::spawn_blocking(move || oslo_call(&url, &message, timeout, monitor))
        .await
        .expect("the oslo client's thread")
}

fn last_part(path: &str) -> &str {
    path.rsplit('!').next().unwrap_or(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_call_with_a_hung_cell_answers_before_the_caller_gives_up() {
    let topo = rabbit_cells(&NOVA).await;
    let cells: Vec<&str> = NOVA.iter().map(|(c, _)| *c).collect();
    let workers = oslo_workers(&topo, &cells, &[("grandchild-cell2", HUNG)]);

    let message = entering(Outgoing::broadcast(Direction::Down, "service_get_all"));
    let call = call(oslo_url(&topo, "api-cell"), message, 20.0, None).await;

    eprintln!(
        "broadcast call with a hung cell answered in {:?}",
        call.elapsed
    );
    let entries = call
        .result
        .as_array()
        .unwrap_or_else(|| panic!("the call returned the list of responses: {}", call.result));
    assert_eq!(entries.len(), 8, "one entry per cell: {entries:?}");
    for entry in entries {
        let path = entry["cell_name"].as_str().expect("cell_name is text");
        let cell = last_part(path);
        if cell == "grandchild-cell2" {
            assert_eq!(
                entry["failure"],
                json!(true),
                "the hung cell failed: {entry}"
            );
            let value = entry["value"].as_str().expect("a failure's value is text");
            assert!(
                value.contains("CellTimeout"),
                "the hung cell's failure is a CellTimeout: {value}"
            );
            assert_eq!(path, "api-cell!child-cell3!grandchild-cell2");
        } else {
            assert_eq!(
                entry,
                &json!({"cell_name": path, "value": format!("services of {cell}"), "failure": false}),
            );
        }
    }
    assert!(call.elapsed < Duration::from_secs(20));
    drop(workers);
    topo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targeted_call_to_a_hung_worker_fails_before_the_caller_gives_up() {
    let topo = rabbit_cells(&PAIR).await;
    let workers = oslo_workers(&topo, &["leaf"], &[("leaf", HUNG)]);

    let message = entering(Outgoing::targeted(
        "top!leaf",
        Direction::Down,
        "get_host_uptime",
    ));
    let call = call(oslo_url(&topo, "top"), message, 10.0, None).await;

    eprintln!(
        "targeted call to a hung worker answered in {:?}",
        call.elapsed
    );
    assert_eq!(
        call.result["error"],
        json!("RemoteError"),
        "the caller got a failure reply, not its own timeout: {}",
        call.result
    );
    assert_eq!(call.result["exc_type"], json!("CellTimeout"));
    assert!(call.elapsed < Duration::from_secs(10));
    drop(workers);
    topo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_monitored_call_outlives_its_monitor_timeout_through_two_hops() {
    let topo = rabbit_cells(&CHAIN).await;
    let worker_takes = Duration::from_secs(12);
    let workers = oslo_workers(&topo, &["leaf"], &[("leaf", worker_takes)]);

    let message = entering(Outgoing::targeted(
        "top!mid!leaf",
        Direction::Down,
        "get_host_uptime",
    ));
    // The client gives up after 5 s without a heartbeat, after 60 s in all.
    let call = call(oslo_url(&topo, "top"), message, 60.0, Some(5.0)).await;

    eprintln!("monitored call answered in {:?}", call.elapsed);
    assert_eq!(
        call.result,
        json!({"cell_name": "top!mid!leaf", "value": "uptime of leaf", "failure": false})
    );
    assert!(
        call.elapsed >= worker_takes,
        "the answer is the worker's, given after it worked"
    );
    drop(workers);
    topo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeating_worker_is_answered_by_its_final_reply() {
    let policy = plugin("nova_cells", "").expect("policy");
    let topo = Topology::start(Transport::Rabbit, &PAIR, policy)
        .await
        .expect("the cells start");
    topo.set_behaviour("leaf", Behaviour::HeartbeatsFirst(5));

    let outgoing = Outgoing::targeted("top!leaf", Direction::Down, "get_host_uptime");
    let reply = topo
        .call("top", outgoing, Duration::from_secs(20))
        .await
        .expect("the call is answered");

    assert_eq!(
        reply.outcome,
        cellhost::wire::ReplyOutcome::Result(
            json!({"cell_name": "top!leaf", "value": "leaf", "failure": false})
        ),
        "the worker's answer, not one of its heartbeats"
    );
    topo.stop().await;
}
