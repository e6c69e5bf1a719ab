//! The neighbours file edited while a cell serves (issue 9): a new neighbour
//! gets traffic, a removed one gets none, and a bad file is refused while the
//! current set keeps serving. Real RabbitMQ, one vhost per cell, the
//! nova-cells policy, the harness's local workers.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cellhost::client::Outgoing;
use cellhost_tests::{Direction, Topology, Transport};
use serde_json::json;

/// How long a change to the file may take to apply.
const APPLY_PATIENCE: Duration = Duration::from_secs(10);

/// Replaces `path` the way a deploy tool does: a new file renamed over it.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write the new neighbours file");
    std::fs::rename(&tmp, path).expect("rename it over the old one");
}

/// Nova's `cells_config` JSON listing `children` of `top`, each on its vhost.
fn cells_config(topo: &Topology, children: &[&str]) -> String {
    let mut cells = serde_json::Map::new();
    for child in children {
        cells.insert(
            child.to_string(),
            json!({
                "name": child,
                "api_url": "http://127.0.0.1:8774/",
                "transport_url": format!("rabbit://guest:guest@127.0.0.1:5672/{}", topo.vhost(child)),
                "weight_offset": 0.0,
                "weight_scale": 1.0,
                "is_parent": false,
            }),
        );
    }
    serde_json::Value::Object(cells).to_string()
}

/// Waits, bounded, until `done` holds for `top`'s host.
async fn until(topo: &mut Topology, what: &str, done: impl Fn(&cellhost::host::CellHost) -> bool) {
    let deadline = tokio::time::Instant::now() + APPLY_PATIENCE;
    while !done(topo.host_mut("top")) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "top: {what} not seen within {APPLY_PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Broadcasts down from `top`; returns the cells that processed it once
/// `count` did, sorted.
async fn broadcast(topo: &mut Topology, count: usize) -> Vec<String> {
    let uuid = topo
        .send(
            "top",
            Outgoing::broadcast(Direction::Down, "sync_instances"),
        )
        .await
        .expect("sent");
    let got = topo.processed(&uuid, count).await.expect("delivered");
    got.into_iter().map(|p| p.cell).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn neighbours_file_edited_while_serving() {
    let dir: PathBuf =
        std::env::temp_dir().join(format!("cellhost-nbrs-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("temp folder");
    let file = dir.join("cells.json");
    let file_for_config = file.clone();
    // `top` starts with `a` only, listed in the file; `b` runs but is no
    // neighbour of `top` yet.
    let mut topo = Topology::prepare(
        Transport::Rabbit,
        &[("top", None), ("a", Some("top")), ("b", Some("top"))],
        move |config| {
            if config.cell.name == "top" {
                config.neighbours.retain(|n| n.name == "a");
                config.cell.neighbours_file = Some(file_for_config.clone());
            }
        },
    )
    .expect("vhosts and configs");
    std::fs::write(&file, cells_config(&topo, &["a"])).expect("first neighbours file");
    topo.start_hosts(
        cellhost_tests::plugin("nova_cells", "").expect("policy"),
        true,
    )
    .await
    .expect("hosts start");

    assert_eq!(broadcast(&mut topo, 2).await, vec!["a", "top"]);

    // `a` out, `b` in.
    replace(&file, &cells_config(&topo, &["b"]));
    until(&mut topo, "the new neighbour set", |h| {
        let set = h.router().neighbours();
        set.names.contains("b") && !set.names.contains("a")
    })
    .await;
    let (a_before, top_before) = (topo.counts_of("a"), topo.counts_of("top"));
    assert_eq!(broadcast(&mut topo, 2).await, vec!["b", "top"]);
    // `top` relayed once (to `b`), and `a` was sent nothing.
    assert_eq!(topo.counts_of("top").relayed - top_before.relayed, 1);
    assert_eq!(topo.counts_of("a").received, a_before.received);
    // The removed neighbour's link is no longer reported.
    let links: Vec<String> = topo
        .host_mut("top")
        .router()
        .link_states()
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    assert!(!links.contains(&"a".to_string()), "{links:?}");

    // A file that is not JSON is refused with its reason; `b` keeps serving.
    replace(&file, "{ this is not json");
    until(&mut topo, "the bad file refused", |h| {
        h.neighbours().last_error().is_some()
    })
    .await;
    let reason = topo
        .host_mut("top")
        .neighbours()
        .last_error()
        .unwrap_or_default();
    assert!(reason.contains("cells.json"), "{reason}");
    assert!(reason.contains("not a JSON object"), "{reason}");
    assert!(topo
        .host_mut("top")
        .router()
        .neighbours()
        .names
        .contains("b"));
    assert_eq!(broadcast(&mut topo, 2).await, vec!["b", "top"]);

    // A set breaking the config's checks (the cell's own name) is refused too.
    let own = json!({"top": {"name": "x", "transport_url": "rabbit://guest:guest@127.0.0.1:5672/x"},
                     "x2": {"name": "top!x", "transport_url": "rabbit://guest:guest@127.0.0.1:5672/x"}});
    replace(&file, &own.to_string());
    let refused = topo.host_mut("top").reload_neighbours().await;
    let error = format!("{:#}", refused.expect_err("a name with `!` is refused"));
    assert!(error.contains("contains `!`"), "{error}");
    assert!(topo
        .host_mut("top")
        .router()
        .neighbours()
        .names
        .contains("b"));

    topo.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
