//! The `cellhost` binary's promises to an operator that need no broker: a bad
//! config is refused before anything connects, with the file, the key and
//! what is wrong; bad arguments to `send` say which flag is wrong.

use std::path::PathBuf;
use std::process::{Command, Output};

fn cellhost(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cellhost"))
        .args(args)
        .output()
        .expect("the cellhost binary runs")
}

fn config_file(test: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cellhost-cli-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("cell.toml");
    std::fs::write(&path, text).expect("config written");
    path
}

fn refused(test: &str, text: &str) -> String {
    let path = config_file(test, text);
    let out = cellhost(&["run", "--config", path.to_str().expect("utf-8 path")]);
    assert!(!out.status.success(), "a bad config must be refused");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        stderr.contains(path.to_str().expect("utf-8")),
        "names the file: {stderr}"
    );
    stderr
}

// The broker URL points at a port nothing listens on: a config error must
// come before any connection attempt.
const CELL: &str = "[cell]\nname = \"c\"\ntransport_url = \"rabbit://guest:guest@127.0.0.1:1/c\"\n";

#[test]
fn a_mistyped_key_is_refused_naming_the_key() {
    let err = refused("mistyped", &format!("{CELL}max_hop_count = \"ten\"\n"));
    assert!(err.contains("max_hop_count"), "{err}");
}

#[test]
fn an_unknown_key_is_refused_naming_the_key() {
    let err = refused("unknown", &format!("{CELL}max_hops = 3\n"));
    assert!(err.contains("max_hops"), "{err}");
}

#[test]
fn a_bad_transport_url_is_refused() {
    let err = refused(
        "url",
        "[cell]\nname = \"c\"\ntransport_url = \"http://127.0.0.1/c\"\n",
    );
    assert!(
        err.contains("transport_url") && err.contains("unsupported scheme"),
        "{err}"
    );
}

#[test]
fn a_missing_policy_file_is_refused() {
    let err = refused(
        "policy",
        &format!("{CELL}[policy]\npath = \"nowhere.wasm\"\n"),
    );
    assert!(
        err.contains("policy.path") && err.contains("nowhere.wasm"),
        "{err}"
    );
}

#[test]
fn a_neighbour_named_like_the_cell_is_refused() {
    let err = refused(
        "neighbour",
        &format!("{CELL}[[neighbours]]\nname = \"c\"\ntransport_url = \"memory://x\"\n"),
    );
    assert!(err.contains("neighbours[0].name"), "{err}");
}

#[test]
fn confirm_window_must_stay_below_prefetch() {
    let err = refused(
        "window",
        &CELL.replace("[cell]\n", "[cell]\nprefetch = 100\nconfirm_window = 100\n"),
    );
    assert!(err.contains("confirm_window"), "{err}");
}

#[test]
fn send_rejects_kwargs_that_are_not_an_object() {
    let out = cellhost(&[
        "send",
        "--url",
        "memory://x",
        "--target",
        "a!b",
        "--method",
        "m",
        "--kwargs",
        "[1]",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--kwargs must be a JSON object"),
        "{stderr}"
    );
}

#[test]
fn the_demo_routes_nova_messages_in_memory() {
    let out = cellhost(&["demo"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(
            "processed in grandchild-cell1  route api-cell -> child-cell2 -> grandchild-cell1"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "processed in api-cell          route grandchild-cell3 -> child-cell3 -> api-cell"
        ),
        "{stdout}"
    );
    // The broadcast down reached all eight cells.
    let broadcast = stdout
        .split("3. broadcast down")
        .nth(1)
        .and_then(|s| s.split("4.").next())
        .unwrap_or("");
    assert_eq!(broadcast.matches("processed in").count(), 8, "{stdout}");
}
