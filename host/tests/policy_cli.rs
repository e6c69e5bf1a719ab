//! `cellhost policy check | test | bench`, run as an operator runs them: on
//! the nova-cells policy, and on inputs that must be refused with a reason
//! (not WebAssembly, a core module, a component of another world or another
//! version of the WIT, one over the sandbox's memory cap, an init that
//! fails), and a corpus whose expected decisions are wrong.
//!
//! Every test gets its own cache folder through `XDG_CACHE_HOME`, so none
//! writes to the user's cache or depends on what another test cached.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A fresh folder for one test's files and cache.
fn workdir(test: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("cellhost-policy-cli-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// The `cellhost` binary with `args`, its cache under `dir`.
fn cellhost_command(dir: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cellhost"));
    command
        .args(args)
        .env("XDG_CACHE_HOME", dir.join("cache"))
        .env_remove("RUST_LOG");
    command
}

fn cellhost(dir: &Path, args: &[&str]) -> Output {
    cellhost_command(dir, args)
        .output()
        .expect("the cellhost binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn plugin(name: &str) -> String {
    let path = cellhost::plugins::built_path(name);
    path.to_str().expect("utf-8 plugin path").to_string()
}

fn write(dir: &Path, name: &str, contents: impl AsRef<[u8]>) -> String {
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("file written");
    path.to_str().expect("utf-8 path").to_string()
}

/// Runs `policy check` on a file that must be refused; returns stderr.
fn check_refuses(dir: &Path, file: &str, extra: &[&str]) -> String {
    let mut args = vec!["policy", "check", file];
    args.extend_from_slice(extra);
    let out = cellhost(dir, &args);
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success(),
        "must be refused; stdout: {}",
        text(&out.stdout)
    );
    assert!(stderr.contains(file), "names the file: {stderr}");
    stderr
}

#[test]
fn check_shows_the_world_the_limits_and_then_uses_the_cache() {
    let dir = workdir("check");
    let nova = plugin("nova_cells");
    let out = cellhost(&dir, &["policy", "check", &nova, "--deadline-ms", "7"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}{stdout}", text(&out.stderr));
    for expected in [
        "cellhost:policy/host@0.1.0",
        "init ",
        "route ",
        "route deadline    7ms",
        "16 MiB",
        "compiled  compiled in",
    ] {
        assert!(stdout.contains(expected), "{expected:?} in:\n{stdout}");
    }

    let again = cellhost(&dir, &["policy", "check", &nova]);
    let stdout = text(&again.stdout);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(stdout.contains("from the disk cache"), "{stdout}");

    let uncached = cellhost(&dir, &["policy", "check", &nova, "--no-cache"]);
    let stdout = text(&uncached.stdout);
    assert!(
        stdout.contains("compiled in") && stdout.contains("no disk cache"),
        "{stdout}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_refuses_what_is_not_a_policy_and_says_why() {
    let dir = workdir("refuse");

    let junk = write(&dir, "junk.wasm", "this is not WebAssembly\n");
    let err = check_refuses(&dir, &junk, &[]);
    assert!(err.contains("not WebAssembly"), "{err}");

    // The smallest core module: header and version 1, nothing else.
    let core = write(&dir, "core.wasm", b"\0asm\x01\0\0\0");
    let err = check_refuses(&dir, &core, &[]);
    assert!(
        err.contains("core WebAssembly module, not a component"),
        "{err}"
    );

    let core_text = write(&dir, "core.wat", "(module)");
    let err = check_refuses(&dir, &core_text, &[]);
    assert!(err.contains("not a valid WebAssembly component"), "{err}");

    // A well-formed component exporting a `route` of the wrong type and no `init`.
    let other_world = write(
        &dir,
        "other.wat",
        r#"(component
             (core module $m (func (export "f") (result i32) i32.const 1))
             (core instance $i (instantiate $m))
             (func (export "route") (result u32) (canon lift (core func $i "f"))))"#,
    );
    let err = check_refuses(&dir, &other_world, &[]);
    assert!(err.contains("export init: missing"), "{err}");
    assert!(
        err.contains("export route: expects (message, cell) -> result<list<action>, string>, the component's takes 0 parameters"),
        "{err}"
    );

    let greedy = write(
        &dir,
        "greedy.wat",
        r#"(component (import "wasi:sockets/tcp@0.2.6" (instance (export "connect" (func)))))"#,
    );
    let err = check_refuses(&dir, &greedy, &[]);
    assert!(
        err.contains("import wasi:sockets/tcp@0.2.6: not granted"),
        "{err}"
    );

    let adversary = plugin("adversary");
    let err = check_refuses(&dir, &adversary, &["--config", "fail-init"]);
    assert!(err.contains("init refused the configuration"), "{err}");

    let missing = dir.join("nowhere.wasm");
    let err = check_refuses(&dir, missing.to_str().expect("utf-8"), &[]);
    assert!(err.contains("cannot read policy"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A hand-written policy of this host's world (see the file); the cases
/// below are edits of it.
const GREEDY: &str = include_str!("components/greedy.wat");

#[test]
fn check_names_the_version_a_component_was_built_for() {
    let dir = workdir("version");
    // The same policy, built against an older cellhost:policy.
    let older = GREEDY.replace("cellhost:policy/types@0.1.0", "cellhost:policy/types@0.0.9");
    let older = older.replacen(
        "  (alias export $types",
        "  (import \"cellhost:policy/host@0.0.9\" (instance (export \"now-ms\" (func (result u64)))))\n  (alias export $types",
        1,
    );
    let file = write(&dir, "older.wat", older);
    let err = check_refuses(&dir, &file, &[]);
    assert!(
        err.contains(
            "targets cellhost:policy@0.0.9 (imports cellhost:policy/types@0.0.9, cellhost:policy/host@0.0.9); \
             this host implements cellhost:policy@0.1.0"
        ),
        "{err}"
    );

    // `route` without its `cell` parameter.
    let narrower = GREEDY.replace(
        r#"(param "message" $message) (param "cell" $cell)"#,
        r#"(param "message" $message)"#,
    );
    assert_ne!(narrower, GREEDY);
    let file = write(&dir, "narrower.wat", narrower);
    let err = check_refuses(&dir, &file, &[]);
    assert!(
        err.contains(
            "export route: expects (message, cell) -> result<list<action>, string>, \
             the component's takes 1 parameter (message: record)"
        ),
        "{err}"
    );
    assert!(!err.contains("export init"), "init is as expected: {err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_says_when_a_component_is_of_another_world() {
    let dir = workdir("world");
    let command = write(
        &dir,
        "command.wat",
        r#"(component
             (core module $m (func (export "run")))
             (core instance $i (instantiate $m))
             (func (export "run") (canon lift (core func $i "run"))))"#,
    );
    let err = check_refuses(&dir, &command, &[]);
    for expected in [
        "was not built for cellhost:policy: it imports no cellhost:policy interface and exports run; \
         this host implements cellhost:policy@0.1.0",
        "export init: missing",
        "export route: missing",
    ] {
        assert!(err.contains(expected), "{expected:?} in {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_shows_how_much_of_the_budget_a_policy_uses() {
    let dir = workdir("budget");
    let greedy = write(&dir, "greedy.wat", GREEDY);
    let out = cellhost(&dir, &["policy", "check", &greedy]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}{stdout}", text(&out.stderr));
    for expected in [
        "memory            16 MiB per instance, all its linear memories together (12",
        "table elements    262144 per instance, all its tables together (1 after init)",
        "counts            at most 100 core instances, 8 memories and 64 tables per instance",
    ] {
        assert!(stdout.contains(expected), "{expected:?} in:\n{stdout}");
    }

    // Both memories at 12 MiB: each under the cap, together over it.
    let heavier = GREEDY.replace(
        r#"(memory $main (export "memory") 1)"#,
        r#"(memory $main (export "memory") 192)"#,
    );
    let file = write(&dir, "heavier.wat", heavier);
    let err = check_refuses(&dir, &file, &[]);
    assert!(
        err.contains("memory limit: the instance's linear memories would hold 24 MiB in all, over its cap of 16 MiB"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

const TOPOLOGY: &str = r#"
[[cell]]
name = "top"
[[cell]]
name = "mid"
parent = "top"
[[cell]]
name = "mid2"
parent = "top"
[[cell]]
name = "leaf"
parent = "mid"
"#;

/// One message followed along its route, a broadcast, a target that does
/// not exist and a message out of hops. Lines without "cell" go to `--cell top`.
const MESSAGES: &str = r#"{"message_type": "targeted", "ctxt": {}, "method_name": "reboot", "method_kwargs": {}, "direction": "down", "need_response": false, "fanout": false, "uuid": "m-target", "routing_path": null, "hop_count": 0, "max_hop_count": 10, "target_cell": "top!mid!leaf"}
{"cell": "mid", "message_type": "targeted", "ctxt": {}, "method_name": "reboot", "method_kwargs": {}, "direction": "down", "need_response": false, "fanout": false, "uuid": "m-target", "routing_path": "top", "hop_count": 1, "max_hop_count": 10, "target_cell": "top!mid!leaf"}
{"cell": "leaf", "message_type": "targeted", "ctxt": {}, "method_name": "reboot", "method_kwargs": {}, "direction": "down", "need_response": false, "fanout": false, "uuid": "m-target", "routing_path": "top!mid", "hop_count": 2, "max_hop_count": 10, "target_cell": "top!mid!leaf"}

{"message_type": "broadcast", "ctxt": {}, "method_name": "sync", "method_kwargs": {}, "direction": "down", "need_response": false, "fanout": false, "uuid": "m-broadcast", "routing_path": null, "hop_count": 0, "max_hop_count": 10}
{"message_type": "targeted", "ctxt": {}, "method_name": "reboot", "method_kwargs": {}, "direction": "down", "need_response": false, "fanout": false, "uuid": "m-astray", "routing_path": null, "hop_count": 0, "max_hop_count": 10, "target_cell": "top!nowhere"}
{"cell": "mid", "message_type": "targeted", "ctxt": {}, "method_name": "reboot", "method_kwargs": {}, "direction": "down", "need_response": false, "fanout": false, "uuid": "m-hops", "routing_path": "top", "hop_count": 1, "max_hop_count": 2, "target_cell": "top!mid!leaf"}
"#;

const EXPECTED: &str = r#"{"uuid": "m-target", "cell": "top", "decision": ["relay:mid"]}
{"uuid": "m-target", "cell": "mid", "decision": ["relay:leaf"]}
{"uuid": "m-target", "decision": ["process-here"]}
{"uuid": "m-broadcast", "decision": ["process-here", "relay:mid", "relay:mid2"]}
{"uuid": "m-astray", "decision": ["reply-error:CellRoutingInconsistency: Inconsistency in cell routing: Unknown child when routing to top!nowhere"]}
{"uuid": "m-hops", "decision": ["reply-error:CellMaxHopCountReached: Cell message has reached maximum hop count: 2"]}
"#;

fn policy_test(dir: &Path, expected: &str) -> Output {
    let topology = write(dir, "topology.toml", TOPOLOGY);
    let messages = write(dir, "messages.jsonl", MESSAGES);
    let expect = write(dir, "expected.jsonl", expected);
    cellhost(
        dir,
        &[
            "policy",
            "test",
            &plugin("nova_cells"),
            "--topology",
            &topology,
            "--messages",
            &messages,
            "--cell",
            "top",
            "--expect",
            &expect,
        ],
    )
}

#[test]
fn test_decisions_match_the_corpus() {
    let dir = workdir("corpus");
    let out = policy_test(&dir, EXPECTED);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}{stdout}", text(&out.stderr));
    assert!(stdout.contains("m-target  mid  relay:leaf"), "{stdout}");
    assert!(
        stdout.contains("m-broadcast  top  process-here, relay:mid, relay:mid2"),
        "{stdout}"
    );
    assert!(!stdout.contains("DIFFERS"), "{stdout}");
    assert!(text(&out.stderr).contains("all 6 decisions match"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn test_fails_on_a_wrong_expectation_and_shows_it() {
    let dir = workdir("wrong");
    let wrong = EXPECTED.replace(r#"["relay:leaf"]"#, r#"["relay:mid2"]"#);
    let out = policy_test(&dir, &wrong);
    let stdout = text(&out.stdout);
    assert!(!out.status.success(), "a wrong corpus must fail:\n{stdout}");
    assert!(
        stdout.contains("DIFFERS uuid m-target\n  expected  at mid: [\"relay:mid2\"]\n  got       at mid: [\"relay:leaf\"]"),
        "{stdout}"
    );
    assert_eq!(stdout.matches("DIFFERS").count(), 1, "{stdout}");
    assert!(
        text(&out.stderr).contains("1 difference"),
        "{}",
        text(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn test_output_as_json_is_a_valid_corpus() {
    let dir = workdir("json");
    let topology = write(&dir, "topology.toml", TOPOLOGY);
    let messages = write(&dir, "messages.jsonl", MESSAGES);
    let nova = plugin("nova_cells");
    let args = [
        "policy",
        "test",
        &nova,
        "--topology",
        &topology,
        "--messages",
        &messages,
        "--cell",
        "top",
    ];
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let out = cellhost(&dir, &json_args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let corpus = write(&dir, "recorded.jsonl", &out.stdout);
    let mut expect_args = args.to_vec();
    expect_args.extend(["--expect", &corpus]);
    let out = cellhost(&dir, &expect_args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn test_names_the_file_and_line_of_a_bad_message() {
    let dir = workdir("badline");
    let topology = write(&dir, "topology.toml", TOPOLOGY);
    let messages = write(
        &dir,
        "messages.jsonl",
        format!(
            "{}\n{{\"cell\": \"top\", \"uuid\": \"x\"}}\n",
            MESSAGES.lines().next().unwrap_or_default()
        ),
    );
    let out = cellhost(
        &dir,
        &[
            "policy",
            "test",
            &plugin("nova_cells"),
            "--topology",
            &topology,
            "--messages",
            &messages,
            "--cell",
            "top",
        ],
    );
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("messages.jsonl line 2") && stderr.contains("message_type"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bench_with_perf_map_names_the_policys_functions_for_perf() {
    let dir = workdir("bench-perf-map");
    let child = cellhost_command(
        &dir,
        &[
            "policy",
            "bench",
            &plugin("nova_cells"),
            "--iterations",
            "100",
            "--perf-map",
        ],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .expect("the cellhost binary runs");
    // wasmtime names the file after the process that compiled the policy.
    let map = PathBuf::from(format!("/tmp/perf-{}.map", child.id()));
    let out = child.wait_with_output().expect("the bench finishes");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let names = std::fs::read_to_string(&map).unwrap_or_default();
    let _ = std::fs::remove_file(&map);
    // `start size name` lines, the policy's exports among the names.
    let named = |function: &str| {
        names.lines().any(|line| {
            line.splitn(3, ' ')
                .nth(2)
                .is_some_and(|name| name.ends_with(&format!("::{function}")))
        })
    };
    assert!(
        named("route") && named("cabi_realloc"),
        "perf map at {}:\n{names}",
        map.display()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bench_reports_latency_and_throughput() {
    let dir = workdir("bench");
    let out = cellhost(
        &dir,
        &[
            "policy",
            "bench",
            &plugin("nova_cells"),
            "--iterations",
            "300",
        ],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        stdout.contains("median") && stdout.contains("p99") && stdout.contains("calls/s"),
        "{stdout}"
    );
    assert!(stdout.contains("relay:grandchild-cell2"), "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}
