//! The compiled component, run by the `cellhost` binary exactly as a cell and
//! its promotion gate run it: same engine, sandbox limits and routing.
//!
//! The first test to need it builds the crate for `wasm32-wasip2`; the
//! binary is `$CELLHOST` (set in `.cargo/config.toml` by `cellhost policy
//! new`) or `cellhost` on the `PATH`.

use std::path::PathBuf;
use std::sync::OnceLock;

use cellhost_guest::harness::Harness;
use cellhost_guest::{Direction, Message};

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| match Harness::build(env!("CARGO_MANIFEST_DIR")) {
        Ok(harness) => harness,
        Err(e) => panic!("{e}"),
    })
}

fn corpus(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(file)
}

#[test]
fn it_loads_as_a_cell_loads_it() {
    let report = harness().check().unwrap_or_else(|e| panic!("{e}"));
    assert!(report.contains("init      ok"), "{report}");
}

#[test]
fn the_corpus_gets_the_decisions_it_expects() {
    let harness = harness()
        .clone()
        .topology_file(corpus("topology.toml"))
        .unwrap_or_else(|e| panic!("{e}"));
    if let Err(e) = harness.corpus(corpus("messages.jsonl"), corpus("expect.jsonl")) {
        panic!("{e}");
    }
}

#[test]
fn messages_built_in_a_line_route_through_the_component() {
    let decisions = harness()
        .route_all(&[
            Message::targeted("api-cell!child-cell2!grandchild-cell1").method("reboot"),
            Message::broadcast(Direction::Up).at("api-cell!child-cell2"),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(decisions[0], ["relay:child-cell2"]);
    assert_eq!(decisions[1], ["process-here", "relay:api-cell"]);
}

#[test]
fn the_operator_config_reaches_init() {
    let harness = harness().clone().config("refuse=delete");
    let decision = harness
        .route(&Message::targeted("api-cell").method("delete"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        decision,
        ["reply-error:MethodRefused: delete is not run through api-cell"]
    );
}
