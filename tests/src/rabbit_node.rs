//! Extra RabbitMQ nodes on this machine, beside the one on 127.0.0.1:5672
//! that every other test uses: for TLS listeners, and later for clusters.
//!
//! Each node gets its own name, ports, config file and folders (owned by the
//! `rabbitmq` user, as the server runs as it), following
//! /work/shared/notes/extra-rabbitmq-nodes.md: the system config pins port
//! 5672, so every node has a config file of its own; without a feature-flags
//! path the node dies at boot; `rabbitmq-server -detached` says nothing when
//! the node dies, so a failed boot reports the node's log.
//!
//! A node is stopped and its folder removed when the [`RabbitNode`] is
//! dropped, and also by a small watcher process when the test process ends
//! without dropping it (a node kept in a `static`, a panic, a kill), so no
//! run leaves a node behind.
//!
//! [`TestCerts`] makes the certificates a TLS node and its clients need, with
//! the `openssl` command (scripts/test installs it).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How long a node may take to boot; one usually takes 5 to 15 s.
const BOOT_PATIENCE: Duration = Duration::from_secs(90);

/// The TLS listener of a node: files in PEM, copied into the node's folder.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// The CA the node trusts for client certificates (and sends in its chain).
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `verify_peer` with `fail_if_no_peer_cert`: clients must present a
    /// certificate signed by `ca`.
    pub require_client_cert: bool,
}

/// What a node listens on.
#[derive(Debug, Clone, Default)]
pub struct NodeSpec {
    /// A short word in the node's name, e.g. `tls` or `c1`.
    pub label: String,
    /// A plain AMQP listener on 127.0.0.1.
    pub tcp: bool,
    /// An AMQPS listener on 127.0.0.1.
    pub tls: Option<ServerTls>,
}

/// A running extra RabbitMQ node; stopped when dropped.
#[derive(Debug)]
pub struct RabbitNode {
    /// `cht<pid>-<label>@localhost`.
    pub name: String,
    /// The plain AMQP port, if the node has one.
    pub amqp_port: Option<u16>,
    /// The AMQPS port, if the node has one.
    pub tls_port: Option<u16>,
    /// The Erlang distribution port (clustering, rabbitmqctl).
    pub dist_port: u16,
    dir: PathBuf,
    stopped: bool,
}

impl RabbitNode {
    /// Starts a node as `spec` says and waits until it has booted.
    pub fn start(spec: &NodeSpec) -> Result<RabbitNode> {
        let pid = std::process::id();
        let name = format!("cht{pid}-{}@localhost", spec.label);
        let dir = std::env::temp_dir().join(format!("cellhost-node-cht{pid}-{}", spec.label));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["mnesia", "log"] {
            std::fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating the node folder {}", dir.display()))?;
        }
        let mut ports = free_ports(2 + usize::from(spec.tcp) + usize::from(spec.tls.is_some()))?;
        let dist_port = ports.remove(0);
        let amqp_port = spec.tcp.then(|| ports.remove(0));
        let tls_port = spec.tls.as_ref().map(|_| ports.remove(0));

        let mut config = String::new();
        match amqp_port {
            Some(port) => config.push_str(&format!("listeners.tcp.local = 127.0.0.1:{port}\n")),
            None => config.push_str("listeners.tcp = none\n"),
        }
        if let (Some(tls), Some(port)) = (&spec.tls, tls_port) {
            let copy = |from: &Path, to: &str| -> Result<PathBuf> {
                let target = dir.join(to);
                std::fs::copy(from, &target)
                    .with_context(|| format!("copying {} into the node folder", from.display()))?;
                Ok(target)
            };
            let (ca, cert, key) = (
                copy(&tls.ca, "ca.pem")?,
                copy(&tls.cert, "server.pem")?,
                copy(&tls.key, "server.key")?,
            );
            let (verify, fail) = if tls.require_client_cert {
                ("verify_peer", "true")
            } else {
                ("verify_none", "false")
            };
            config.push_str(&format!(
                "listeners.ssl.default = 127.0.0.1:{port}\n\
                 ssl_options.cacertfile = {}\n\
                 ssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\n\
                 ssl_options.verify = {verify}\n\
                 ssl_options.fail_if_no_peer_cert = {fail}\n",
                ca.display(),
                cert.display(),
                key.display()
            ));
        }
        std::fs::write(dir.join("rabbitmq.conf"), config).context("writing the node config")?;
        std::fs::write(dir.join("enabled_plugins"), "[].\n").context("writing enabled_plugins")?;
        run(Command::new("chown").arg("-R").arg("rabbitmq:").arg(&dir))
            .context("giving the node folder to the rabbitmq user")?;

        let mut node = RabbitNode {
            name,
            amqp_port,
            tls_port,
            dist_port,
            dir,
            stopped: false,
        };
        node.watch_this_process()?;
        let d = |sub: &str| node.dir.join(sub);
        detached(
            Command::new("rabbitmq-server")
                .arg("-detached")
                .env("RABBITMQ_NODENAME", &node.name)
                .env("RABBITMQ_DIST_PORT", node.dist_port.to_string())
                // The path without `.conf`, as RabbitMQ wants it.
                .env("RABBITMQ_CONFIG_FILE", d("rabbitmq"))
                .env("RABBITMQ_MNESIA_BASE", d("mnesia"))
                .env("RABBITMQ_LOG_BASE", d("log"))
                .env("RABBITMQ_PID_FILE", d("pid"))
                .env("RABBITMQ_ENABLED_PLUGINS_FILE", d("enabled_plugins"))
                .env("RABBITMQ_FEATURE_FLAGS_FILE", d("feature_flags")),
        )
        .context("starting rabbitmq-server (is RabbitMQ installed? scripts/test sets it up)")?;
        if let Err(e) = node.await_startup() {
            node.stop();
            return Err(e);
        }
        Ok(node)
    }

    /// Runs `rabbitmqctl -n <this node> args...`; returns its output.
    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        run(Command::new("rabbitmqctl")
            .args(["-q", "-n", &self.name])
            .args(args))
    }

    /// A vhost on this node with all rights for guest.
    pub fn add_vhost(&self, vhost: &str) -> Result<()> {
        self.ctl(&["add_vhost", vhost])?;
        self.ctl(&["set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"])?;
        Ok(())
    }

    pub fn delete_vhost(&self, vhost: &str) -> Result<()> {
        self.ctl(&["delete_vhost", vhost]).map(|_| ())
    }

    /// Stops the node and removes its folder.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let _ = self.ctl(&["stop"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// Waits for the node to boot. `await_startup` fails at once while the
    /// node is not yet registered with epmd, hence the retries; a node that
    /// died at boot is reported with the end of its log.
    fn await_startup(&self) -> Result<()> {
        let deadline = Instant::now() + BOOT_PATIENCE;
        loop {
            let last = self.ctl(&["await_startup", "--timeout", "30"]);
            match last {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    bail!(
                        "RabbitMQ node {} did not boot within {BOOT_PATIENCE:?}: {e:#}\nend of its log:\n{}",
                        self.name,
                        self.log_tail()
                    )
                }
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        }
    }

    fn log_tail(&self) -> String {
        let log = self.dir.join("log").join(format!("{}.log", self.name));
        match std::fs::read_to_string(&log) {
            Ok(text) => {
                let lines: Vec<&str> = text.lines().collect();
                lines[lines.len().saturating_sub(30)..].join("\n")
            }
            Err(e) => format!("(cannot read {}: {e})", log.display()),
        }
    }

    /// Starts a process that stops the node once this test process is gone,
    /// however it ends: a node in a `static` is never dropped.
    fn watch_this_process(&self) -> Result<()> {
        after_this_process(&format!(
            "rabbitmqctl -q -n '{}' stop >/dev/null 2>&1; rm -rf '{}'",
            self.name,
            self.dir.display()
        ))
    }
}

/// Runs `cleanup` (shell) once this test process has ended, however it ends.
fn after_this_process(cleanup: &str) -> Result<()> {
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {cleanup}",
        pid = std::process::id()
    );
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting a watcher of the test process")?;
    Ok(())
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `count` distinct loopback ports nobody listens on, spread by the process
/// id so that test runs in parallel start from different places.
pub fn free_ports(count: usize) -> Result<Vec<u16>> {
    // Below Linux's ephemeral range (32768 and up), where clients' ports are.
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = (std::process::id() % 1_000) * 11;
    let mut ports = Vec::new();
    for _ in 0..2_000 {
        if ports.len() == count {
            return Ok(ports);
        }
        let offset = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(LOW + (start + offset * 7) % SPAN).context("port arithmetic")?;
        // Free only if the loopback and the wildcard address both are; one
        // probe at a time, since two listeners would collide with each other.
        let loopback = TcpListener::bind(("127.0.0.1", port)).is_ok();
        let wildcard = loopback && TcpListener::bind(("0.0.0.0", port)).is_ok();
        if wildcard {
            ports.push(port);
        }
    }
    bail!("found only {} free ports of {count}", ports.len())
}

/// A CA, a server certificate it signs for `localhost` and 127.0.0.1, a
/// client certificate it signs, and an unrelated CA; PEM files in one folder,
/// made with the `openssl` command.
#[derive(Debug)]
pub struct TestCerts {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A CA that signed nothing here: trusting it alone must fail.
    pub other_ca: PathBuf,
}

impl TestCerts {
    /// Makes the certificates in a fresh folder (valid for two days).
    pub fn generate(label: &str) -> Result<TestCerts> {
        let dir =
            std::env::temp_dir().join(format!("cellhost-certs-{}-{label}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating the certificate folder {}", dir.display()))?;
        // Certificates kept in a `static` are never dropped.
        after_this_process(&format!("rm -rf '{}'", dir.display()))?;
        let p = |name: &str| dir.join(name);
        let ca = |stem: &str, subject: &str| -> Result<()> {
            openssl(&[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                subject,
                "-keyout",
                &path_str(&p(&format!("{stem}.key"))),
                "-out",
                &path_str(&p(&format!("{stem}.pem"))),
            ])
        };
        ca("ca", "/CN=cellhost test CA")?;
        ca("other-ca", "/CN=cellhost unrelated CA")?;
        let leaf = |stem: &str, subject: &str, extensions: &str| -> Result<()> {
            openssl(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                subject,
                "-keyout",
                &path_str(&p(&format!("{stem}.key"))),
                "-out",
                &path_str(&p(&format!("{stem}.csr"))),
            ])?;
            let ext = p(&format!("{stem}.ext"));
            std::fs::write(&ext, extensions).context("writing certificate extensions")?;
            openssl(&[
                "x509",
                "-req",
                "-days",
                "2",
                "-CAcreateserial",
                "-in",
                &path_str(&p(&format!("{stem}.csr"))),
                "-CA",
                &path_str(&p("ca.pem")),
                "-CAkey",
                &path_str(&p("ca.key")),
                "-extfile",
                &path_str(&ext),
                "-out",
                &path_str(&p(&format!("{stem}.pem"))),
            ])
        };
        leaf(
            "server",
            "/CN=localhost",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        )?;
        leaf(
            "client",
            "/CN=cellhost test client",
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n\
             extendedKeyUsage=clientAuth\n",
        )?;
        Ok(TestCerts {
            ca: p("ca.pem"),
            server_cert: p("server.pem"),
            server_key: p("server.key"),
            client_cert: p("client.pem"),
            client_key: p("client.key"),
            other_ca: p("other-ca.pem"),
            dir,
        })
    }

    /// The server side of a TLS node signed by this CA.
    pub fn server_tls(&self, require_client_cert: bool) -> ServerTls {
        ServerTls {
            ca: self.ca.clone(),
            cert: self.server_cert.clone(),
            key: self.server_key.clone(),
            require_client_cert,
        }
    }
}

impl Drop for TestCerts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn path_str(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

fn openssl(args: &[&str]) -> Result<()> {
    run(Command::new("openssl").args(args))
        .context("running openssl (scripts/test installs it)")
        .map(|_| ())
}

/// Runs a command that leaves a daemon behind: its output goes nowhere, as
/// the daemon would keep a pipe open and a reader waiting forever.
fn detached(command: &mut Command) -> Result<()> {
    let what = format!("{command:?}");
    let status = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .with_context(|| format!("cannot run {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// Runs a command to completion; its stderr is the error when it fails.
fn run(command: &mut Command) -> Result<String> {
    let what = format!("{command:?}");
    let out = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
