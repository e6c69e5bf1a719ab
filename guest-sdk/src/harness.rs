//! Runs a policy's compiled `.wasm` in the policy crate's own tests, through
//! the `cellhost` binary (feature `harness`, native targets only).
//!
//! The harness owns three things: building the crate's component
//! (`cargo build --release --target wasm32-wasip2`), finding the `cellhost`
//! binary, and turning [`Message`]s and a [`Tree`] into the files
//! `cellhost policy test` reads. The loading, the sandbox limits and the
//! routing are the binary's: the same engine, loader and replay that a cell
//! and its promotion gate use, so a policy that passes here loads and decides
//! the same in a cell.
//!
//! ```no_run
//! use cellhost_guest::harness::Harness;
//! use cellhost_guest::{Message, Tree};
//!
//! let harness = Harness::build(env!("CARGO_MANIFEST_DIR"))?.tree(Tree::nova());
//! let decision = harness.route(&Message::targeted("api-cell!child-cell2").method("reboot"))?;
//! assert_eq!(decision, ["relay:child-cell2"]);
//! # Ok::<(), cellhost_guest::harness::HarnessError>(())
//! ```
//!
//! The binary is `$CELLHOST` when set (crates written by `cellhost policy new`
//! set it in `.cargo/config.toml` to the binary that wrote them), else
//! `cellhost` on the `PATH`.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{json, Map, Value};

use crate::{path_parts, Direction, Message, MessageType, Tree};

/// Why the harness could not run or the policy did not pass.
#[derive(Debug)]
pub struct HarnessError(String);

impl fmt::Display for HarnessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HarnessError {}

fn fail<T>(message: impl Into<String>) -> Result<T, HarnessError> {
    Err(HarnessError(message.into()))
}

/// A compiled policy, the tree it is tested in and the `cellhost` binary
/// that runs it.
#[derive(Debug, Clone)]
pub struct Harness {
    wasm: PathBuf,
    cellhost: PathBuf,
    topology: String,
    config: String,
    limits: Vec<String>,
}

impl Harness {
    /// Builds the policy crate at `manifest_dir` (pass
    /// `env!("CARGO_MANIFEST_DIR")`) for `wasm32-wasip2` in release mode and
    /// returns a harness for the component it produced, in Nova's test tree.
    pub fn build(manifest_dir: &str) -> Result<Harness, HarnessError> {
        let wasm = build_component(Path::new(manifest_dir))?;
        Ok(Harness::new(wasm))
    }

    /// A harness for an existing component, in Nova's test tree.
    pub fn new(wasm: impl Into<PathBuf>) -> Harness {
        Harness {
            wasm: wasm.into(),
            cellhost: cellhost_binary(),
            topology: Tree::nova().to_topology_toml(),
            config: String::new(),
            limits: Vec::new(),
        }
    }

    /// The component under test.
    pub fn wasm(&self) -> &Path {
        &self.wasm
    }

    /// Routes in `tree` instead of Nova's test tree.
    pub fn tree(mut self, tree: Tree) -> Harness {
        self.topology = tree.to_topology_toml();
        self
    }

    /// Routes in the tree of a topology file, as `cellhost policy test
    /// --topology` reads it.
    pub fn topology_file(mut self, path: impl AsRef<Path>) -> Result<Harness, HarnessError> {
        let path = path.as_ref();
        self.topology = std::fs::read_to_string(path)
            .map_err(|e| HarnessError(format!("cannot read {}: {e}", path.display())))?;
        Ok(self)
    }

    /// The string handed to the policy's `init` (`[policy] config`).
    pub fn config(mut self, config: &str) -> Harness {
        self.config = config.to_string();
        self
    }

    /// Runs with these sandbox limits instead of a cell's defaults.
    pub fn limits(mut self, deadline_ms: u64, memory_mib: u64) -> Harness {
        self.limits = vec![
            "--deadline-ms".into(),
            deadline_ms.to_string(),
            "--memory-mib".into(),
            memory_mib.to_string(),
        ];
        self
    }

    /// Loads the component as a cell would (`cellhost policy check`) and
    /// returns the report: imports, exports and the sandbox it runs in.
    pub fn check(&self) -> Result<String, HarnessError> {
        let output = self.run(&["check"], &[])?;
        success(&output, "cellhost policy check")
    }

    /// The decision for one message at the cell that ends its routing path,
    /// in the notation `cellhost policy test` prints: `process-here`,
    /// `relay:CELL`, `reply-error:CLASS: MESSAGE`, `drop:REASON`, or
    /// `error:CODE: REASON` when the call failed.
    pub fn route(&self, message: &Message) -> Result<Vec<String>, HarnessError> {
        let mut all = self.route_all(std::slice::from_ref(message))?;
        all.pop()
            .ok_or_else(|| HarnessError("cellhost policy test printed no decision".into()))
    }

    /// The decisions for several messages, each routed on its own at the
    /// cell that ends its routing path, in order.
    pub fn route_all(&self, messages: &[Message]) -> Result<Vec<Vec<String>>, HarnessError> {
        let dir = Scratch::new()?;
        let lines: Vec<String> = messages.iter().map(|m| wire_line(m).to_string()).collect();
        let messages_file = dir.write("messages.jsonl", &lines.join("\n"))?;
        let output = self.run(
            &["test", "--json", "--messages"],
            &[messages_file.into_os_string()],
        )?;
        let text = success(&output, "cellhost policy test")?;
        text.lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| {
                let outcome: Value = serde_json::from_str(line)
                    .map_err(|e| HarnessError(format!("unreadable decision {line:?}: {e}")))?;
                serde_json::from_value(outcome["decision"].clone())
                    .map_err(|e| HarnessError(format!("unreadable decision {line:?}: {e}")))
            })
            .collect()
    }

    /// Replays a corpus (`cellhost policy test --messages ... --expect ...`)
    /// and fails with every difference when any decision differs.
    pub fn corpus(
        &self,
        messages: impl AsRef<Path>,
        expect: impl AsRef<Path>,
    ) -> Result<String, HarnessError> {
        let output = self.run(
            &["test", "--messages"],
            &[
                messages.as_ref().as_os_str().to_owned(),
                "--expect".into(),
                expect.as_ref().as_os_str().to_owned(),
            ],
        )?;
        success(&output, "cellhost policy test --expect")
    }

    fn run(&self, command: &[&str], tail: &[OsString]) -> Result<Output, HarnessError> {
        let dir = Scratch::new()?;
        let mut cmd = Command::new(&self.cellhost);
        cmd.arg("policy").arg(command[0]).arg(&self.wasm);
        if command[0] == "test" {
            let topology = dir.write("topology.toml", &self.topology)?;
            cmd.arg("--topology").arg(topology);
        }
        cmd.args(&command[1..])
            .args(tail)
            .arg("--config")
            .arg(&self.config)
            .args(&self.limits);
        cmd.output().map_err(|e| {
            HarnessError(format!(
                "cannot run {} ({e}): install cellhost or set CELLHOST to its path",
                self.cellhost.display()
            ))
        })
    }
}

/// The message as a line of `cellhost policy test`'s messages file: the
/// cells message as it arrives at the cell ending its routing path, before
/// that cell counted its hop.
fn wire_line(message: &Message) -> Value {
    let parts: Vec<&str> = path_parts(&message.routing_path).collect();
    let (cell, before) = match parts.split_last() {
        Some((cell, before)) => (*cell, before.join("!")),
        None => ("", String::new()),
    };
    let parse = |text: &str| serde_json::from_str::<Value>(text).unwrap_or_else(|_| json!({}));
    let mut line = Map::new();
    line.insert("cell".into(), json!(cell));
    line.insert(
        "message_type".into(),
        json!(match message.message_type {
            MessageType::Targeted => "targeted",
            MessageType::Broadcast => "broadcast",
            MessageType::Response => "response",
        }),
    );
    line.insert("ctxt".into(), parse(&message.ctxt));
    line.insert("method_name".into(), json!(message.method_name));
    line.insert("method_kwargs".into(), parse(&message.method_kwargs));
    line.insert(
        "direction".into(),
        json!(match message.direction {
            Direction::Up => "up",
            Direction::Down => "down",
        }),
    );
    line.insert("need_response".into(), json!(message.need_response));
    line.insert("fanout".into(), json!(message.fanout));
    line.insert("uuid".into(), json!(message.uuid));
    line.insert(
        "routing_path".into(),
        if message.is_origin || before.is_empty() {
            Value::Null
        } else {
            json!(before)
        },
    );
    line.insert(
        "hop_count".into(),
        json!(message.hop_count.saturating_sub(1)),
    );
    line.insert("max_hop_count".into(), json!(message.max_hop_count));
    if let Some(target) = &message.target_cell {
        line.insert("target_cell".into(), json!(target));
    }
    match message.message_type {
        MessageType::Broadcast => {
            line.insert("run_locally".into(), json!(message.run_locally));
        }
        // The uuid of the request answered: the view has none, and the
        // policy never sees it, but the wire format requires one.
        MessageType::Response => {
            line.insert("response_uuid".into(), json!(message.uuid));
        }
        MessageType::Targeted => {}
    }
    Value::Object(line)
}

fn success(output: &Output, what: &str) -> Result<String, HarnessError> {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        return Ok(stdout);
    }
    fail(format!(
        "{what} failed ({}):\n{stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    ))
}

/// `$CELLHOST`, else `cellhost` from the `PATH`.
fn cellhost_binary() -> PathBuf {
    std::env::var_os("CELLHOST")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from("cellhost"), PathBuf::from)
}

/// Builds the crate at `manifest_dir` for wasm32-wasip2 and returns the
/// component cargo reports for its `cdylib`.
fn build_component(manifest_dir: &Path) -> Result<PathBuf, HarnessError> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .current_dir(manifest_dir)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--message-format=json-render-diagnostics",
        ])
        .output()
        .map_err(|e| HarnessError(format!("cannot run cargo: {e}")))?;
    if !output.status.success() {
        return fail(format!(
            "building the policy for wasm32-wasip2 failed (is the target installed? \
             `rustup target add wasm32-wasip2`):\n{}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let manifest = manifest_dir.join("Cargo.toml");
    let stdout = String::from_utf8_lossy(&output.stdout);
    for line in stdout.lines() {
        let Ok(message) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let ours = message["manifest_path"]
            .as_str()
            .is_some_and(|p| Path::new(p) == manifest);
        let is_cdylib = message["target"]["crate_types"]
            .as_array()
            .is_some_and(|types| types.iter().any(|t| t == "cdylib"));
        if message["reason"] == "compiler-artifact" && ours && is_cdylib {
            if let Some(wasm) = message["filenames"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .find(|f| f.ends_with(".wasm"))
            {
                return Ok(PathBuf::from(wasm));
            }
        }
    }
    fail(format!(
        "cargo built no .wasm for {}: the crate needs `crate-type = [\"cdylib\"]`",
        manifest.display()
    ))
}

/// A folder of its own for one harness call's files, removed afterwards.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Scratch, HarnessError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "cellhost-harness-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)
            .map_err(|e| HarnessError(format!("cannot create {}: {e}", dir.display())))?;
        Ok(Scratch(dir))
    }

    fn write(&self, name: &str, contents: &str) -> Result<PathBuf, HarnessError> {
        let path = self.0.join(name);
        std::fs::write(&path, contents)
            .map_err(|e| HarnessError(format!("cannot write {}: {e}", path.display())))?;
        Ok(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_goes_back_to_what_its_sender_wrote() {
        let m = Message::targeted("api-cell!child-cell2!grandchild-cell1")
            .at("api-cell!child-cell2")
            .uuid("m1");
        let line = wire_line(&m);
        assert_eq!(line["cell"], "child-cell2");
        assert_eq!(line["routing_path"], "api-cell");
        assert_eq!(line["hop_count"], 1);
        assert_eq!(line["uuid"], "m1");
        assert!(line.get("run_locally").is_none());
    }

    #[test]
    fn a_response_answers_a_request() {
        let line = wire_line(&Message::response("g!c!api").at("g!c").uuid("r1"));
        assert_eq!(line["message_type"], "response");
        assert_eq!(line["response_uuid"], "r1");
        assert_eq!(line["direction"], "up");
    }

    #[test]
    fn at_its_origin_a_message_has_no_routing_path() {
        let line = wire_line(
            &Message::broadcast(Direction::Down)
                .at("api-cell")
                .not_locally(),
        );
        assert_eq!(line["cell"], "api-cell");
        assert_eq!(line["routing_path"], Value::Null);
        assert_eq!(line["hop_count"], 0);
        assert_eq!(line["run_locally"], false);
    }
}
