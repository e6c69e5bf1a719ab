//! The real oslo.messaging (18.3.1, from PyPI, in the virtualenv
//! `scripts/test` prepares at `target/oslo-venv`) as a test's peer: an RPC
//! server as a cell's application (`tests/oslo/worker.py`) and an RPC client
//! that casts or calls into a cell (`tests/oslo/client.py`).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

use crate::{Topology, PATIENCE};

/// The virtualenv's Python.
pub fn python() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/oslo-venv/bin/python");
    assert!(
        venv.is_file(),
        "{} is missing: `bash scripts/test` creates it (python3 -m venv target/oslo-venv && target/oslo-venv/bin/pip install oslo.messaging==18.3.1)",
        venv.display()
    );
    venv
}

/// One of the scripts in `tests/oslo/`.
pub fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("oslo")
        .join(name)
}

/// `cell`'s broker as an oslo.messaging `transport_url`.
pub fn oslo_url(topo: &Topology, cell: &str) -> String {
    topo.config(cell)
        .cell
        .transport_url
        .amqp_uris()
        .remove(0)
        .replacen("amqp://", "rabbit://", 1)
}

/// A real oslo.messaging process (one of the scripts in `tests/oslo/`),
/// with the lines it prints arriving on a channel.
pub struct OsloProcess {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl OsloProcess {
    /// Starts the worker of `cell` on `url` (an RPC server on `cells.local`)
    /// and waits until it serves.
    pub fn start_worker(url: &str, cell: &str) -> OsloProcess {
        OsloProcess::worker(url, cell, Duration::ZERO).ready()
    }

    /// Starts a worker whose every method first sleeps `delay`; call
    /// [`OsloProcess::ready`] before using it (several can boot at once).
    pub fn worker(url: &str, cell: &str, delay: Duration) -> OsloProcess {
        let delay = delay.as_secs_f64().to_string();
        OsloProcess::spawn("worker.py", &[url, cell, &delay])
    }

    /// Starts `tests/oslo/<script_name>` with `args`.
    pub fn spawn(script_name: &str, args: &[&str]) -> OsloProcess {
        let mut child = Command::new(python())
            .arg(script(script_name))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{script_name} starts: {e}"));
        let stdout: ChildStdout = child.stdout.take().expect("stdout piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        OsloProcess { child, lines }
    }

    /// Waits for the process's `ready` line.
    pub fn ready(self) -> OsloProcess {
        assert_eq!(self.next_line(), "ready");
        self
    }

    pub fn next_line(&self) -> String {
        self.lines
            .recv_timeout(PATIENCE)
            .expect("the oslo.messaging process printed a line in time")
    }
}

impl Drop for OsloProcess {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What an oslo client's call returned.
pub struct OsloCall {
    /// The result, or `{"error", "exc_type", "value"}` when the call raised.
    pub result: Value,
    /// How long the call took, measured by the client around `call()`.
    pub elapsed: Duration,
}

/// Casts (`mode` "cast") or calls (`"call"`) `process_message(message)` into
/// the cell at `url` with a real oslo.messaging client; returns what it printed.
pub fn oslo_client(url: &str, mode: &str, message: &Value) -> String {
    oslo_client_with(url, mode, message, &[]).0
}

/// Calls `process_message(message)` into the cell at `url` with an oslo
/// client whose call `timeout` and `call_monitor_timeout` are given.
pub fn oslo_call(url: &str, message: &Value, timeout: f64, monitor: Option<f64>) -> OsloCall {
    let mut extra = vec![timeout.to_string()];
    if let Some(monitor) = monitor {
        extra.push(monitor.to_string());
    }
    let (out, err) = oslo_client_with(url, "call", message, &extra);
    let result = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("the oslo client printed JSON ({e}): {out}"));
    let elapsed = err
        .lines()
        .find_map(|l| l.strip_prefix("elapsed="))
        .and_then(|s| s.trim().parse::<f64>().ok())
        .map(Duration::from_secs_f64)
        .unwrap_or_else(|| panic!("the oslo client reported its call's duration: {err}"));
    OsloCall { result, elapsed }
}

/// Casts or calls with a real oslo.messaging client, `extra` appended to its
/// arguments (a call's timeouts, then oslo.config's, e.g. `--config-file`);
/// returns what it printed on standard output and standard error.
pub fn oslo_client_with(
    url: &str,
    mode: &str,
    message: &Value,
    extra: &[String],
) -> (String, String) {
    let kind = message["message_type"]
        .as_str()
        .expect("has a type")
        .to_string();
    let out = Command::new(python())
        .arg(script("client.py"))
        .args([url, mode, &kind, &message.to_string()])
        .args(extra)
        .output()
        .expect("the oslo.messaging client runs");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "oslo client failed: {stderr}");
    (
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        stderr,
    )
}
