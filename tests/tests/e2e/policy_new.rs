//! A new policy author's road, end to end: `cellhost policy new` into an
//! empty folder, the crate's own `cargo test` (its unit tests, then its
//! compiled `.wasm` through the harness), `cellhost policy check` on the
//! component, and the component routing real messages in cells on RabbitMQ.
//!
//! The crate is built with a target folder under this repository's `target/`
//! so that later runs reuse its dependencies; it is written afresh each run.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cellhost::client::Outgoing;
use cellhost::config::PolicySection;
use cellhost_tests::{cellhost_bin, engine, Direction, Topology, Transport};

fn text(output: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn target_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target")
}

/// Runs `cargo` in `dir` as an author would, with only the target folder
/// moved; the outer cargo's build settings stay out of it.
fn cargo(dir: &Path, args: &[&str]) -> Output {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(dir).args(args);
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_") && key != "CARGO_HOME" || key == "RUSTFLAGS" {
            cmd.env_remove(key.as_ref());
        }
    }
    cmd.env("CARGO_TARGET_DIR", target_root().join("policy-new"));
    cmd.output().expect("cargo runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_policy_builds_tests_checks_and_routes_in_a_cell() {
    let dir = target_root().join("policy-new-crate").join("edge-policy");
    let _ = std::fs::remove_dir_all(&dir);

    let new = Command::new(cellhost_bin())
        .args(["policy", "new"])
        .arg(&dir)
        .output()
        .expect("cellhost runs");
    assert!(new.status.success(), "policy new failed:\n{}", text(&new));
    assert!(
        text(&new).contains("cargo test"),
        "it says what to run next:\n{}",
        text(&new)
    );
    for file in [
        "Cargo.toml",
        "src/lib.rs",
        "tests/harness.rs",
        "tests/corpus/expect.jsonl",
        "cellhost-guest/wit/policy.wit",
        "README.md",
    ] {
        assert!(dir.join(file).is_file(), "{file} was not written");
    }
    let again = Command::new(cellhost_bin())
        .args(["policy", "new"])
        .arg(&dir)
        .output()
        .expect("cellhost runs");
    assert!(
        !again.status.success() && text(&again).contains("not empty"),
        "a second `policy new` must not write over the first:\n{}",
        text(&again)
    );

    // The crate's own tests: natively, then the .wasm through this binary
    // (its .cargo/config.toml names the binary that wrote it).
    let tested = cargo(&dir, &["test"]);
    let report = text(&tested);
    assert!(
        tested.status.success(),
        "the new crate's tests failed:\n{report}"
    );
    for test in [
        "a_targeted_message_goes_down_one_hop_at_a_time",
        "the_corpus_gets_the_decisions_it_expects",
        "messages_built_in_a_line_route_through_the_component",
    ] {
        assert!(
            report.contains(&format!("{test} ... ok")),
            "{test} did not pass:\n{report}"
        );
    }

    let wasm = target_root().join("policy-new/wasm32-wasip2/release/edge_policy.wasm");
    let check = Command::new(cellhost_bin())
        .args(["policy", "check", "--no-cache"])
        .arg(&wasm)
        .output()
        .expect("cellhost runs");
    assert!(
        check.status.success(),
        "policy check failed:\n{}",
        text(&check)
    );
    assert!(text(&check).contains("init      ok"), "{}", text(&check));

    // Loaded as a cell loads it, and routing real traffic.
    let section = PolicySection {
        path: Some(wasm),
        config: "refuse=delete_instance".into(),
        ..Default::default()
    };
    let policy = cellhost::plugins::load(&engine(), &section).expect("the new policy loads");
    let mut topo = Topology::start(
        Transport::Rabbit,
        &cellhost::topology::NOVA_TOPOLOGY,
        policy,
    )
    .await
    .expect("topology starts");
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
    assert_eq!(got[0].cell, "grandchild-cell1");
    assert_eq!(got[0].routing_path, "api-cell!child-cell2!grandchild-cell1");

    // The operator's config reached init: a refused method is dead-lettered
    // at the first cell with the policy's error.
    let before = topo.counts();
    topo.send(
        "api-cell",
        Outgoing::targeted("api-cell!child-cell1", Direction::Down, "delete_instance"),
    )
    .await
    .expect("sent");
    let dead = topo.dead_letter("api-cell").await.expect("dead-lettered");
    assert!(
        dead.reason.contains("MethodRefused"),
        "reason: {}",
        dead.reason
    );
    assert_eq!(topo.counts().relayed, before.relayed, "nothing was relayed");
    topo.stop().await;
}

/// The componentize-py venv scripts/build-python-policy makes (or reuses).
fn componentize_venv() -> PathBuf {
    cellhost_tests::python_policy_wasm();
    target_root().join("componentize-venv")
}

/// Runs `program` in `dir` and fails the test, with its output, unless it
/// succeeds.
fn run_in(dir: &Path, program: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let output = Command::new(program)
        .current_dir(dir)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("{} does not run: {e}", program.display()));
    assert!(
        output.status.success(),
        "{} {args:?} failed:\n{}",
        program.display(),
        text(&output)
    );
    text(&output)
}

#[test]
fn a_new_python_policy_tests_builds_and_decides_its_corpus() {
    let venv = componentize_venv();
    let dir = target_root().join("policy-new-crate").join("py-policy");
    let _ = std::fs::remove_dir_all(&dir);
    let new = Command::new(cellhost_bin())
        .args(["policy", "new", "--python"])
        .arg(&dir)
        .output()
        .expect("cellhost runs");
    assert!(
        new.status.success(),
        "policy new --python failed:\n{}",
        text(&new)
    );

    // The README's commands, in its order: bindings, the native unit tests,
    // the component, its corpus and its check.
    let componentize = venv.join("bin/componentize-py");
    let wit = ["--wit-path", "wit/policy.wit", "--world", "policy"];
    run_in(
        &dir,
        &componentize,
        &[&wit[..], &["bindings", "bindings"]].concat(),
        &[],
    );
    let unit = run_in(
        &dir,
        &venv.join("bin/python"),
        &["-m", "unittest", "-v"],
        &[("PYTHONPATH", "bindings")],
    );
    assert!(unit.contains("OK"), "{unit}");
    run_in(
        &dir,
        &componentize,
        &[&wit[..], &["componentize", "app", "-o", "policy.wasm"]].concat(),
        &[],
    );
    let limits = ["--config", "debug_ping", "--memory-mib", "64"];
    let corpus = run_in(
        &dir,
        &cellhost_bin(),
        &[
            &[
                "policy",
                "test",
                "policy.wasm",
                "--topology",
                "topology.toml",
            ][..],
            &["--messages", "messages.jsonl", "--expect", "expect.jsonl"],
            &limits,
        ]
        .concat(),
        &[],
    );
    assert!(
        corpus.contains("drop:"),
        "the config's drop is in the corpus:\n{corpus}"
    );
    let check = run_in(
        &dir,
        &cellhost_bin(),
        &[&["policy", "check", "policy.wasm"][..], &limits].concat(),
        &[],
    );
    assert!(check.contains("init      ok"), "{check}");
}
