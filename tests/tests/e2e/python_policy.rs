//! The Python nova-cells policy (plugins/nova-cells-py, built by
//! scripts/build-python-policy) serving real cells: a small tree whose every
//! host loads the Python component with the limits its README documents,
//! on a real RabbitMQ (one vhost per cell) and on memory://. A targeted
//! message and broadcasts must be processed exactly where Nova's routing
//! puts them. (Its decisions, message by message, are compared with the
//! Rust nova-cells' in host/tests/policy_corpus.rs.)

use std::sync::{Arc, OnceLock};

use cellhost::client::Outgoing;
use cellhost::config::PolicySection;
use cellhost::policy::LoadedPolicy;
use cellhost_tests::{python_policy_wasm, Direction, Topology, Transport};

/// The limits plugins/nova-cells-py/README.md gives for the Python policy.
const MEMORY_MIB: u64 = 64;
const DEADLINE_MS: u64 = 5;

/// api-cell with two children, and a grandchild under child-cell2.
const TREE: [(&str, Option<&str>); 4] = [
    ("api-cell", None),
    ("child-cell1", Some("api-cell")),
    ("child-cell2", Some("api-cell")),
    ("grandchild-cell1", Some("child-cell2")),
];

/// The `[policy]` section of every cell in these tests.
fn policy_section() -> PolicySection {
    PolicySection {
        path: Some(python_policy_wasm().to_path_buf()),
        memory_mib: MEMORY_MIB,
        deadline_ms: DEADLINE_MS,
        ..PolicySection::default()
    }
}

/// The Python policy, compiled once for all the tests here (an 18 MB
/// component takes seconds to compile).
fn python_policy() -> Arc<LoadedPolicy> {
    static LOADED: OnceLock<Arc<LoadedPolicy>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            cellhost::plugins::load(&cellhost_tests::engine(), &policy_section())
                .expect("the Python policy loads within its documented limits")
        })
        .clone()
}

async fn start(t: Transport) -> Topology {
    let section = policy_section();
    Topology::start_configured(t, &TREE, python_policy(), true, |config| {
        config.policy = section.clone();
    })
    .await
    .expect("topology starts")
}

fn cells_and_paths(processed: &[cellhost::demo::Processed]) -> Vec<(&str, &str)> {
    processed
        .iter()
        .map(|p| (p.cell.as_str(), p.routing_path.as_str()))
        .collect()
}

async fn python_policy_routes_targeted_and_broadcast_traffic(t: Transport) {
    let mut topo = start(t).await;

    let uuid = topo
        .send(
            "api-cell",
            Outgoing::targeted(
                "api-cell!child-cell2!grandchild-cell1",
                Direction::Down,
                "reboot_instance",
            ),
        )
        .await
        .expect("sent");
    let got = topo.processed(&uuid, 1).await.expect("delivered");
    assert_eq!(
        cells_and_paths(&got),
        [("grandchild-cell1", "api-cell!child-cell2!grandchild-cell1")]
    );
    // api-cell and child-cell2 relayed it; only grandchild-cell1 processed it.
    let counts = topo.counts();
    assert_eq!((counts.relayed, counts.delivered_local), (2, 1));

    // Not run at its origin: every other cell processes it, once.
    let mut down = Outgoing::broadcast(Direction::Down, "sync_instances");
    down.run_locally = false;
    let uuid = topo.send("api-cell", down).await.expect("sent");
    let got = topo
        .processed(&uuid, 3)
        .await
        .expect("delivered below api-cell");
    assert_eq!(
        cells_and_paths(&got),
        [
            ("child-cell1", "api-cell!child-cell1"),
            ("child-cell2", "api-cell!child-cell2"),
            ("grandchild-cell1", "api-cell!child-cell2!grandchild-cell1"),
        ]
    );

    // Up from the grandchild, run locally (Nova's default): every ancestor and
    // the origin, and neither child-cell1 nor anything below it.
    let uuid = topo
        .send(
            "grandchild-cell1",
            Outgoing::broadcast(Direction::Up, "instance_update_at_top"),
        )
        .await
        .expect("sent");
    let got = topo
        .processed(&uuid, 3)
        .await
        .expect("delivered up the tree");
    assert_eq!(
        cells_and_paths(&got),
        [
            ("api-cell", "grandchild-cell1!child-cell2!api-cell"),
            ("child-cell2", "grandchild-cell1!child-cell2"),
            ("grandchild-cell1", "grandchild-cell1"),
        ]
    );

    let counts = topo.counts();
    assert_eq!(counts.delivered_local, 7, "no extra delivery anywhere");
    assert_eq!(counts.dead_lettered, 0);
    topo.stop().await;
}

cellhost_tests::on_both_transports!(python_policy_routes_targeted_and_broadcast_traffic);
