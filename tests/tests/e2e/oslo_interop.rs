//! Interoperation with the real oslo.messaging (18.3.1, from PyPI, in the
//! virtualenv `scripts/test` prepares at target/oslo-venv): a Python
//! RPC client casts and calls into a cell, and a Python RPC server is the
//! application behind the destination cell. Two cells on RabbitMQ.

use cellhost::client::Outgoing;
use cellhost_tests::oslo::{oslo_client, oslo_url as url, OsloProcess};
use cellhost_tests::{plugin, Direction, Topology, Transport};
use serde_json::{json, Value};

const PAIR: [(&str, Option<&str>); 2] = [("top", None), ("leaf", Some("top"))];

fn entering(method: &str, kwargs: Value, need_response: bool) -> Value {
    let mut m = Outgoing::targeted("top!leaf", Direction::Down, method).to_message();
    m.need_response = need_response;
    m.ctxt.insert("request_id".into(), json!("req-oslo"));
    m.ctxt.insert("user_id".into(), json!("u-1"));
    if let Value::Object(k) = kwargs {
        m.method_kwargs = k;
    }
    serde_json::from_str(&m.to_json()).expect("our JSON parses")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oslo_messaging_clients_and_servers_work_through_cellhost() {
    let policy = plugin("nova_cells", "").expect("policy");
    let topo = Topology::start_with(Transport::Rabbit, &PAIR, policy, false)
        .await
        .expect("topology starts");
    let (top, leaf) = (url(&topo, "top"), url(&topo, "leaf"));
    let worker = OsloProcess::start_worker(&leaf, "leaf");

    // A cast from a Python client reaches the Python server behind leaf.
    let cast = entering(
        "reboot_instance",
        json!({"instance": "9f8c", "reboot_type": "SOFT"}),
        false,
    );
    oslo_client(&top, "cast", &cast);
    let processed: Value = serde_json::from_str(&worker.next_line()).expect("JSON line");
    assert_eq!(processed["method"], json!("reboot_instance"));
    assert_eq!(
        processed["kwargs"],
        json!({"instance": "9f8c", "reboot_type": "SOFT"})
    );
    assert_eq!(processed["ctxt"]["request_id"], json!("req-oslo"));
    assert_eq!(processed["ctxt"]["cell_routing_path"], json!("top!leaf"));
    assert_eq!(processed["ctxt"]["cell_message_uuid"], cast["uuid"]);

    // A call: the Python client gets the response object as its result.
    let call = entering("get_host_uptime", json!({}), true);
    let result: Value = serde_json::from_str(&oslo_client(&top, "call", &call)).expect("JSON");
    assert_eq!(
        result,
        json!({"cell_name": "top!leaf", "value": "uptime of leaf", "failure": false})
    );
    let _ = worker.next_line();

    // The server raises: a failure response carrying oslo's exception record.
    let call = entering("explode", json!({}), true);
    let result: Value = serde_json::from_str(&oslo_client(&top, "call", &call)).expect("JSON");
    assert_eq!(result["cell_name"], json!("top!leaf"));
    assert_eq!(result["failure"], json!(true));
    let failure: Value =
        serde_json::from_str(result["value"].as_str().expect("failure as JSON text"))
            .expect("JSON");
    assert_eq!(failure["class"], json!("ValueError"));
    assert_eq!(failure["message"], json!("boom in leaf"));

    drop(worker);
    topo.stop().await;
}
