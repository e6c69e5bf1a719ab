//! The nova-cells corpus (plugins/corpus: Nova's eight-cell tree, messages
//! covering every branch of Nova's routing, and the decisions expected of
//! them) run through `cellhost policy test` as an operator runs it: the Rust
//! nova-cells must decide every message as expected, and the Python
//! nova-cells (plugins/nova-cells-py, built by scripts/build-python-policy)
//! must decide every message exactly as the Rust one does.
//!
//! The Python policy runs with the limits its README documents.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The limits plugins/nova-cells-py/README.md gives for the Python policy.
const PYTHON_MEMORY_MIB: &str = "64";
const PYTHON_DEADLINE_MS: &str = "5";

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ sits in the repository")
}

fn corpus(file: &str) -> String {
    let path = repo_root().join("plugins/corpus").join(file);
    path.to_str().expect("utf-8 path").to_string()
}

/// A fresh folder for one test's compiled-policy cache.
fn workdir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cellhost-corpus-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn cellhost(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cellhost"))
        .args(args)
        .env("XDG_CACHE_HOME", dir.join("cache"))
        .env_remove("RUST_LOG")
        .output()
        .expect("the cellhost binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Builds the Python component if its inputs changed (the script skips the
/// build otherwise) and returns its fixed path under target/.
fn python_policy_wasm() -> &'static str {
    static BUILT: OnceLock<String> = OnceLock::new();
    BUILT.get_or_init(|| {
        let script = repo_root().join("scripts/build-python-policy");
        let out = Command::new(&script)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed; run it by hand to see why:\n{}{}",
            script.display(),
            text(&out.stdout),
            text(&out.stderr)
        );
        let wasm = repo_root().join("target/plugins-py/nova_cells_py.wasm");
        assert!(
            wasm.is_file(),
            "{} is missing after scripts/build-python-policy",
            wasm.display()
        );
        wasm.to_str().expect("utf-8 path").to_string()
    })
}

fn rust_policy_wasm() -> String {
    let path = cellhost::plugins::built_path("nova_cells");
    path.to_str().expect("utf-8 plugin path").to_string()
}

/// `policy test` of `plugin` on the corpus, compared with expect.jsonl;
/// returns the decisions as JSON lines.
fn run_corpus(dir: &Path, plugin: &str, limits: &[&str]) -> String {
    let (topology, messages, expect) = (
        corpus("topology.toml"),
        corpus("messages.jsonl"),
        corpus("expect.jsonl"),
    );
    let mut args = vec![
        "policy",
        "test",
        plugin,
        "--topology",
        &topology,
        "--messages",
        &messages,
        "--expect",
        &expect,
        "--json",
    ];
    args.extend_from_slice(limits);
    let out = cellhost(dir, &args);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "{plugin} differs from the corpus:\n{stdout}{stderr}"
    );
    assert!(stderr.contains("decisions match"), "{stderr}");
    stdout
}

#[test]
fn corpus_covers_every_kind_of_nova_decision() {
    let expect = std::fs::read_to_string(corpus("expect.jsonl")).expect("expect.jsonl");
    let lines: Vec<&str> = expect.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 40, "only {} messages", lines.len());
    for decision in [
        "\"process-here\"",
        "\"relay:child-cell",
        "\"relay:grandchild-cell",
        "\"relay:api-cell\"",
        "reply-error:CellRoutingInconsistency: Inconsistency in cell routing: destination is",
        "reply-error:CellRoutingInconsistency: Inconsistency in cell routing: Unknown child",
        "reply-error:CellRoutingInconsistency: Inconsistency in cell routing: Unknown parent",
        "reply-error:CellMaxHopCountReached: Cell message has reached maximum hop count",
        "\"decision\":[]",
    ] {
        assert!(
            expect.contains(decision),
            "no expected decision has {decision}"
        );
    }
}

#[test]
fn rust_nova_cells_decides_the_corpus_as_expected() {
    let dir = workdir("rust");
    run_corpus(&dir, &rust_policy_wasm(), &[]);
}

#[test]
fn python_nova_cells_decides_the_corpus_as_the_rust_one() {
    let dir = workdir("python");
    let python = run_corpus(
        &dir,
        python_policy_wasm(),
        &[
            "--memory-mib",
            PYTHON_MEMORY_MIB,
            "--deadline-ms",
            PYTHON_DEADLINE_MS,
        ],
    );
    let rust = run_corpus(&dir, &rust_policy_wasm(), &[]);
    assert_eq!(python, rust, "the same decisions, line for line");
}
