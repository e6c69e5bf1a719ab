//! The host's configuration: the TOML file an operator writes, its defaults, and
//! the checks that refuse a bad file before anything touches a broker.
//!
//! It owns the names of the keys (operators' scripts rely on them), the parsing
//! of `transport_url`s, and the loading of neighbours from Nova's `cells_config`
//! JSON. It does not connect to anything.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

mod rabbit;
pub use rabbit::RabbitOptions;

/// Everything one `cellhost` needs to serve one cell.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub cell: CellSection,
    #[serde(default)]
    pub local: LocalSection,
    #[serde(default)]
    pub policy: PolicySection,
    #[serde(default)]
    pub neighbours: Vec<NeighbourConfig>,
    /// The admin listener; none when the section is absent.
    #[serde(default)]
    pub admin: Option<AdminSection>,
    /// oslo.messaging's RabbitMQ options for this cell's own broker, and for
    /// each neighbour's that has none of its own.
    #[serde(default)]
    pub oslo_messaging_rabbit: RabbitOptions,
}

/// `[admin]`: where health, policy state, reloads and metrics are served.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// Loopback by default: the admin API can reload policies.
    #[serde(default = "default_admin_listen")]
    pub listen: std::net::SocketAddr,
}

fn default_admin_listen() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], 9470))
}

/// `[cell]`: who this cell is and how it talks to its own broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CellSection {
    pub name: String,
    pub transport_url: TransportUrl,
    #[serde(default = "default_queue_base")]
    pub queue_base: String,
    #[serde(default = "default_control_exchange")]
    pub control_exchange: String,
    #[serde(default = "default_max_hop_count")]
    pub max_hop_count: u32,
    #[serde(default = "default_call_timeout_s")]
    pub call_timeout_s: u64,
    /// Nova `cells_config` JSON listing the neighbours, instead of `[[neighbours]]`.
    #[serde(default)]
    pub neighbours_file: Option<PathBuf>,
    /// Names this host's own queues (`<topic>.<host_id>`); the machine's host name by default.
    #[serde(default)]
    pub host_id: Option<String>,
    /// Unacknowledged deliveries the broker may push to each consumer.
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    /// Messages a consumer may have in flight (published, awaiting confirms).
    /// Kept below `prefetch` so the consumer never starves its own window.
    #[serde(default = "default_confirm_window")]
    pub confirm_window: usize,
    /// Larger bodies are dead-lettered unread.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// How many uuids of carried-out messages are remembered to drop
    /// duplicates, oldest forgotten first; 0 turns duplicate detection off.
    #[serde(default = "default_dedupe_window")]
    pub dedupe_window: usize,
    /// How long, in seconds, such a uuid is remembered; 0: no age limit
    /// (only `dedupe_window` bounds the memory).
    #[serde(default = "default_dedupe_max_age_s")]
    pub dedupe_max_age_s: u64,
    /// How long, in seconds, a relay may wait parked for a neighbour that
    /// cannot take it before it goes to the dead-letter queue.
    #[serde(default = "default_park_max_age_s")]
    pub park_max_age_s: u64,
    /// How many relays may wait parked for one neighbour; past that, new
    /// relays for it are refused and their messages stay in their queue.
    #[serde(default = "default_park_max_length")]
    pub park_max_length: u64,
}

/// `[local]`: where messages processed in this cell are delivered.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalSection {
    #[serde(default = "default_local_topic")]
    pub topic: String,
}

impl Default for LocalSection {
    fn default() -> Self {
        LocalSection {
            topic: default_local_topic(),
        }
    }
}

/// `[policy]`: which Wasm policy decides, and the sandbox it runs in.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySection {
    /// A `.wasm` component; the embedded nova-cells policy when absent.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Handed to the policy's `init`.
    #[serde(default)]
    pub config: String,
    /// Wall-clock budget of one `route` call.
    #[serde(default = "default_deadline_ms")]
    pub deadline_ms: u64,
    /// Linear memory one policy instance may grow to.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// Longest action list accepted from one `route` call.
    #[serde(default = "default_max_actions")]
    pub max_actions: usize,
    /// Most bytes of text (neighbour names, reasons, errors) in one answer.
    #[serde(default = "default_max_action_bytes")]
    pub max_action_bytes: usize,
    /// Where compiled policies are kept between runs. Absent: the default
    /// cache folder (see [`PolicySection::cache_dir`]); `""`: no disk cache.
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// A candidate policy run beside the active one on live traffic: its
    /// decisions are compared and the differences counted and logged, never
    /// acted on.
    #[serde(default)]
    pub shadow: Option<PathBuf>,
    /// A promotion gate: messages with the decisions expected of them (JSON
    /// Lines); a reloaded version that disagrees with any is refused.
    #[serde(default)]
    pub gate: Option<PathBuf>,
    /// A folder the policy may read (never write), seen inside as `/data`.
    /// Nothing else of the host's filesystem is visible to a policy.
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// What happens to a message the policy fails on (trap, deadline, error).
    #[serde(default)]
    pub on_failure: OnFailure,
    /// After this many policy failures in a row, a reloaded version is
    /// unloaded in favour of the one it replaced. 0: never.
    #[serde(default = "default_failures_before_fallback")]
    pub failures_before_fallback: u64,
}

/// `policy.on_failure`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnFailure {
    /// Publish it to the cell's dead-letter queue with the reason.
    #[default]
    DeadLetter,
    /// Reject it back to the broker without requeueing (the broker's own
    /// dead-lettering, if configured, takes it from there).
    Reject,
}

fn default_failures_before_fallback() -> u64 {
    20
}

impl PolicySection {
    /// The folder compiled policies are cached in: `cache_dir` if set,
    /// `$XDG_CACHE_HOME/cellhost` or `~/.cache/cellhost` if not, and none
    /// when it is set to `""` or there is no home to put it in.
    pub fn cache_dir(&self) -> Option<PathBuf> {
        match &self.cache_dir {
            Some(dir) if dir.as_os_str().is_empty() => None,
            Some(dir) => Some(dir.clone()),
            None => crate::policy::default_cache_dir(),
        }
    }
}

impl Default for PolicySection {
    fn default() -> Self {
        PolicySection {
            path: None,
            config: String::new(),
            deadline_ms: default_deadline_ms(),
            memory_mib: default_memory_mib(),
            max_actions: default_max_actions(),
            max_action_bytes: default_max_action_bytes(),
            cache_dir: None,
            data_dir: None,
            shadow: None,
            gate: None,
            on_failure: OnFailure::default(),
            failures_before_fallback: default_failures_before_fallback(),
        }
    }
}

/// `[[neighbours]]`: a parent or child cell and the broker it listens on.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NeighbourConfig {
    pub name: String,
    #[serde(default)]
    pub is_parent: bool,
    pub transport_url: TransportUrl,
    #[serde(default)]
    pub weight_offset: f64,
    #[serde(default = "default_weight_scale")]
    pub weight_scale: f64,
    #[serde(default)]
    pub capabilities: BTreeMap<String, Vec<String>>,
    /// oslo.messaging's RabbitMQ options for this neighbour's broker, when
    /// it is set up differently from the own one.
    #[serde(default)]
    pub oslo_messaging_rabbit: Option<RabbitOptions>,
}

fn default_queue_base() -> String {
    "cells.intercell".into()
}
fn default_control_exchange() -> String {
    "nova".into()
}
fn default_max_hop_count() -> u32 {
    10
}
fn default_call_timeout_s() -> u64 {
    60
}
// Set from the relay bench (2026-12, 1 KB bodies, 2 cores shared with the
// broker): 1000 (window 750) relayed 23,580 msg/s where 256 (window 192)
// relayed 19,760 to 20,950; windows of 500, 750 and 950 under 1000 were
// within noise of each other. 1000 is also Shovel's default. What a
// consumer may buffer is prefetch times max_body_bytes.
fn default_prefetch() -> u16 {
    1000
}
fn default_confirm_window() -> usize {
    750
}
fn default_max_body_bytes() -> usize {
    1 << 20
}
fn default_dedupe_window() -> usize {
    65_536
}
fn default_dedupe_max_age_s() -> u64 {
    600
}
fn default_park_max_age_s() -> u64 {
    86_400
}
fn default_park_max_length() -> u64 {
    1_000_000
}

/// The most uuids `cell.dedupe_window` may remember: each costs about 80
/// bytes as oslo writes uuids (more in another spelling), so this is about
/// 1.3 GiB.
const MAX_DEDUPE_WINDOW: usize = 1 << 24;

/// The longest `cell.dedupe_max_age_s`: a week. Longer is a unit mistake
/// (milliseconds?) more likely than a wish.
const MAX_DEDUPE_AGE_S: u64 = 7 * 86_400;
fn default_local_topic() -> String {
    "cells.local".into()
}
fn default_deadline_ms() -> u64 {
    5
}
fn default_memory_mib() -> u64 {
    16
}
fn default_max_action_bytes() -> usize {
    64 << 10
}
fn default_max_actions() -> usize {
    64
}
fn default_weight_scale() -> f64 {
    1.0
}

impl Config {
    /// Reads, parses and validates a config file; relative paths in it are
    /// taken from the file's folder. Every error names the file.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let mut config: Config = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("config file {}: {}", path.display(), e))?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        config.resolve_paths(base);
        if let Some(file) = config.cell.neighbours_file.clone() {
            if !config.neighbours.is_empty() {
                bail!(
                    "config file {}: `cell.neighbours_file` and `[[neighbours]]` are both set; keep one",
                    path.display()
                );
            }
            config.neighbours = load_cells_config(&file, &config.cell.name)?;
        }
        config
            .validate()
            .map_err(|e| anyhow::anyhow!("config file {}: {}", path.display(), e))?;
        Ok(config)
    }

    /// A config for one cell with defaults everywhere, as the demo and tests build them.
    pub fn for_cell(name: &str, transport_url: TransportUrl) -> Config {
        Config {
            cell: CellSection {
                name: name.to_string(),
                transport_url,
                queue_base: default_queue_base(),
                control_exchange: default_control_exchange(),
                max_hop_count: default_max_hop_count(),
                call_timeout_s: default_call_timeout_s(),
                neighbours_file: None,
                host_id: None,
                prefetch: default_prefetch(),
                confirm_window: default_confirm_window(),
                max_body_bytes: default_max_body_bytes(),
                dedupe_window: default_dedupe_window(),
                dedupe_max_age_s: default_dedupe_max_age_s(),
                park_max_age_s: default_park_max_age_s(),
                park_max_length: default_park_max_length(),
            },
            local: LocalSection::default(),
            policy: PolicySection::default(),
            neighbours: Vec::new(),
            admin: None,
            oslo_messaging_rabbit: RabbitOptions::default(),
        }
    }

    /// The RabbitMQ options that apply to `neighbour`'s broker: its own, or
    /// this cell's.
    pub fn rabbit_options_of<'a>(&'a self, neighbour: &'a NeighbourConfig) -> &'a RabbitOptions {
        neighbour
            .oslo_messaging_rabbit
            .as_ref()
            .unwrap_or(&self.oslo_messaging_rabbit)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(p) = self.policy.path.as_mut() {
            resolve(p);
        }
        if let Some(p) = self.cell.neighbours_file.as_mut() {
            resolve(p);
        }
        if let Some(p) = self.policy.data_dir.as_mut() {
            resolve(p);
        }
        if let Some(p) = self.policy.shadow.as_mut() {
            resolve(p);
        }
        if let Some(p) = self.policy.gate.as_mut() {
            resolve(p);
        }
        self.oslo_messaging_rabbit.resolve_paths(base);
        for n in &mut self.neighbours {
            if let Some(options) = n.oslo_messaging_rabbit.as_mut() {
                options.resolve_paths(base);
            }
        }
        // `""` means "no cache", not "the config file's folder".
        if let Some(p) = self
            .policy
            .cache_dir
            .as_mut()
            .filter(|p| !p.as_os_str().is_empty())
        {
            resolve(p);
        }
    }

    /// Checks what the types alone cannot; the error names the key.
    pub fn validate(&self) -> Result<()> {
        check_cell_name("cell.name", &self.cell.name)?;
        check_topic("cell.queue_base", &self.cell.queue_base)?;
        check_topic("cell.control_exchange", &self.cell.control_exchange)?;
        check_topic("local.topic", &self.local.topic)?;
        if self.cell.max_hop_count == 0 {
            bail!("`cell.max_hop_count` must be at least 1");
        }
        if self.cell.call_timeout_s == 0 {
            bail!("`cell.call_timeout_s` must be at least 1");
        }
        if self.cell.prefetch == 0 {
            bail!("`cell.prefetch` must be at least 1");
        }
        if self.cell.confirm_window == 0 || self.cell.confirm_window >= self.cell.prefetch as usize
        {
            bail!(
                "`cell.confirm_window` ({}) must be at least 1 and below `cell.prefetch` ({})",
                self.cell.confirm_window,
                self.cell.prefetch
            );
        }
        if self.cell.max_body_bytes == 0 {
            bail!("`cell.max_body_bytes` must be at least 1");
        }
        if self.cell.dedupe_window > MAX_DEDUPE_WINDOW {
            bail!(
                "`cell.dedupe_window` ({}) must be at most {MAX_DEDUPE_WINDOW} uuids (about 80 bytes of memory each); 0 turns duplicate detection off",
                self.cell.dedupe_window
            );
        }
        if self.cell.park_max_age_s == 0 || self.cell.park_max_age_s > 30 * 86_400 {
            bail!(
                "`cell.park_max_age_s` ({}) must be between 1 and {} seconds (30 days)",
                self.cell.park_max_age_s,
                30 * 86_400
            );
        }
        if self.cell.park_max_length == 0 {
            bail!("`cell.park_max_length` must be at least 1");
        }
        if self.cell.dedupe_max_age_s > MAX_DEDUPE_AGE_S {
            bail!(
                "`cell.dedupe_max_age_s` ({}) must be at most {MAX_DEDUPE_AGE_S} seconds (a week); 0 removes the age limit",
                self.cell.dedupe_max_age_s
            );
        }
        if self.policy.deadline_ms == 0 {
            bail!("`policy.deadline_ms` must be at least 1");
        }
        if self.policy.memory_mib == 0 || self.policy.memory_mib > 4096 {
            bail!("`policy.memory_mib` must be between 1 and 4096");
        }
        if self.policy.max_actions == 0 {
            bail!("`policy.max_actions` must be at least 1");
        }
        if let Some(path) = &self.policy.path {
            if !path.is_file() {
                bail!("`policy.path`: no policy file at {}", path.display());
            }
        }
        if let Some(path) = &self.policy.gate {
            if !path.is_file() {
                bail!("`policy.gate`: no gate file at {}", path.display());
            }
        }
        if let Some(path) = &self.policy.shadow {
            if !path.is_file() {
                bail!("`policy.shadow`: no policy file at {}", path.display());
            }
        }
        if let Some(dir) = &self.policy.data_dir {
            if !dir.is_dir() {
                bail!("`policy.data_dir`: no folder at {}", dir.display());
            }
        }
        self.oslo_messaging_rabbit
            .validate("oslo_messaging_rabbit")?;
        self.validate_neighbours(&self.neighbours)
    }

    /// The checks on a neighbour set: at start, and for each new version of
    /// the neighbours file.
    pub fn validate_neighbours(&self, neighbours: &[NeighbourConfig]) -> Result<()> {
        let mut seen = HashSet::new();
        for (i, n) in neighbours.iter().enumerate() {
            if let Some(options) = &n.oslo_messaging_rabbit {
                options.validate(&format!("neighbours[{i}].oslo_messaging_rabbit"))?;
            }
            check_cell_name(&format!("neighbours[{i}].name"), &n.name)?;
            if n.name == self.cell.name {
                bail!(
                    "`neighbours[{i}].name`: {:?} is this cell's own name",
                    n.name
                );
            }
            if !seen.insert(n.name.as_str()) {
                bail!("`neighbours[{i}].name`: {:?} is listed twice", n.name);
            }
            if !n.weight_offset.is_finite() || !n.weight_scale.is_finite() {
                bail!("`neighbours[{i}]`: weights must be finite numbers");
            }
        }
        Ok(())
    }

    /// The name of this host's own queues.
    pub fn host_id(&self) -> String {
        if let Some(id) = &self.cell.host_id {
            return id.clone();
        }
        let name = std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "cellhost".to_string());
        format!("{}-{}", name, self.cell.name)
    }
}

fn check_cell_name(key: &str, name: &str) -> Result<()> {
    if name.is_empty() {
        bail!("`{key}` must not be empty");
    }
    if name.contains('!') {
        bail!("`{key}`: {name:?} contains `!`, which separates cells in a routing path");
    }
    Ok(())
}

fn check_topic(key: &str, value: &str) -> Result<()> {
    if value.is_empty() || value.len() > 200 {
        bail!("`{key}` must be 1 to 200 characters");
    }
    if value
        .chars()
        .any(|c| c.is_whitespace() || c == '#' || c == '*')
    {
        bail!("`{key}`: {value:?} may not contain spaces or the wildcards `#` and `*`");
    }
    Ok(())
}

/// Reads the neighbours of `own_name` from Nova's `cells_config` JSON:
/// `{"<name>": {"name", "api_url", "transport_url", "weight_offset", "weight_scale", "is_parent"}}`.
pub fn load_cells_config(path: &Path, own_name: &str) -> Result<Vec<NeighbourConfig>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read neighbours file {}", path.display()))?;
    parse_cells_config(&text, own_name)
        .map_err(|e| anyhow::anyhow!("neighbours file {}: {}", path.display(), e))
}

/// Parses Nova's `cells_config` JSON; the entry for `own_name`, if any, is skipped.
pub fn parse_cells_config(text: &str, own_name: &str) -> Result<Vec<NeighbourConfig>> {
    #[derive(Deserialize)]
    struct Entry {
        name: Option<String>,
        transport_url: String,
        #[serde(default)]
        is_parent: bool,
        #[serde(default)]
        weight_offset: f64,
        #[serde(default = "default_weight_scale")]
        weight_scale: f64,
        #[serde(default)]
        capabilities: BTreeMap<String, Vec<String>>,
    }
    let entries: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(text).context("not a JSON object of cells")?;
    let mut out = Vec::new();
    for (key, value) in entries {
        let entry: Entry =
            serde_json::from_value(value).with_context(|| format!("cell {key:?}"))?;
        let name = entry.name.unwrap_or_else(|| key.clone());
        if name == own_name {
            continue;
        }
        let transport_url = entry
            .transport_url
            .parse()
            .with_context(|| format!("cell {key:?}: `transport_url`"))?;
        out.push(NeighbourConfig {
            name,
            is_parent: entry.is_parent,
            transport_url,
            weight_offset: entry.weight_offset,
            weight_scale: entry.weight_scale,
            capabilities: entry.capabilities,
            oslo_messaging_rabbit: None,
        });
    }
    Ok(out)
}

/// Where a cell's broker is: AMQP (with failover hosts) or the in-process transport.
#[derive(Clone, PartialEq, Eq)]
pub enum TransportUrl {
    Amqp {
        hosts: Vec<AmqpHost>,
        vhost: String,
        /// What the URL says of TLS: `amqps://` or oslo's `?ssl=1` (on),
        /// `?ssl=0` (off), nothing (None: `[oslo_messaging_rabbit] ssl`
        /// decides). As in oslo, the URL's query wins over the option.
        tls: Option<bool>,
    },
    /// `memory://<name>`: cells sharing a name share one in-process broker.
    Memory { name: String },
}

/// One `user:pass@host:port` entry of an AMQP transport URL.
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpHost {
    pub user: String,
    pub password: String,
    pub host: String,
    /// When the URL names none: 5671 for `amqps://` (the AMQP URI spec),
    /// 5672 otherwise, even with `ssl=1` (oslo writes 5672 into the URL it
    /// hands kombu whenever the port is missing).
    pub port: u16,
}

impl TransportUrl {
    /// The AMQP URIs to try in order, each naming one host, with TLS only
    /// if the URL itself asks for it; what tests and tools hand to lapin.
    pub fn amqp_uris(&self) -> Vec<String> {
        self.uris(self.uses_tls(&RabbitOptions::default()), None)
    }

    /// The URIs the host connects with: TLS as [`TransportUrl::uses_tls`]
    /// says, and `heartbeat_timeout_threshold` as the AMQP heartbeat.
    pub fn amqp_uris_with(&self, options: &RabbitOptions) -> Vec<String> {
        self.uris(
            self.uses_tls(options),
            Some(options.heartbeat_timeout_threshold),
        )
    }

    /// Whether connections to this URL use TLS under `options`: what the URL
    /// says, or else `options.ssl`.
    pub fn uses_tls(&self, options: &RabbitOptions) -> bool {
        match self {
            TransportUrl::Amqp { tls, .. } => tls.unwrap_or(options.ssl),
            TransportUrl::Memory { .. } => false,
        }
    }

    fn uris(&self, tls: bool, heartbeat: Option<u16>) -> Vec<String> {
        match self {
            TransportUrl::Amqp { hosts, vhost, .. } => {
                let scheme = if tls { "amqps" } else { "amqp" };
                // lapin reads the heartbeat it proposes from the URI's query.
                let query = heartbeat
                    .map(|h| format!("?heartbeat={h}"))
                    .unwrap_or_default();
                hosts
                    .iter()
                    .map(|h| {
                        format!(
                            "{scheme}://{}:{}@{}:{}/{}{query}",
                            percent_encode(&h.user),
                            percent_encode(&h.password),
                            h.host,
                            h.port,
                            percent_encode(vhost)
                        )
                    })
                    .collect()
            }
            TransportUrl::Memory { .. } => Vec::new(),
        }
    }
}

impl std::str::FromStr for TransportUrl {
    type Err = anyhow::Error;

    fn from_str(url: &str) -> Result<Self> {
        let (scheme, rest) = url.split_once("://").with_context(|| {
            format!("{url:?} is not a URL (expected rabbit://, amqp://, amqps:// or memory://)")
        })?;
        match scheme {
            "memory" => {
                let name = rest.trim_end_matches('/');
                if name.is_empty() {
                    bail!("{url:?}: memory:// needs a name, e.g. memory://demo");
                }
                Ok(TransportUrl::Memory {
                    name: name.to_string(),
                })
            }
            "rabbit" | "amqp" | "amqps" => {
                let (rest, query) = match rest.split_once('?') {
                    Some((r, q)) => (r, Some(q)),
                    None => (rest, None),
                };
                let from_query = match query {
                    Some(q) => ssl_query(q).with_context(|| format!("{url:?}"))?,
                    None => None,
                };
                let tls = if scheme == "amqps" {
                    if from_query == Some(false) {
                        bail!("{url:?}: amqps:// with ssl=0 contradicts itself; use rabbit:// for plain AMQP");
                    }
                    Some(true)
                } else {
                    from_query
                };
                let default_port = if scheme == "amqps" { 5671 } else { 5672 };
                let (authority, vhost) = match rest.split_once('/') {
                    Some((a, v)) => (a, percent_decode(v)),
                    // oslo.messaging's default: no path means the vhost "/".
                    None => (rest, "/".to_string()),
                };
                let vhost = if vhost.is_empty() {
                    "/".to_string()
                } else {
                    vhost
                };
                let mut hosts = Vec::new();
                for entry in authority.split(',').filter(|e| !e.is_empty()) {
                    hosts.push(
                        parse_amqp_host(entry, default_port).with_context(|| format!("{url:?}"))?,
                    );
                }
                if hosts.is_empty() {
                    bail!("{url:?} names no host");
                }
                Ok(TransportUrl::Amqp { hosts, vhost, tls })
            }
            other => {
                bail!("{url:?}: unsupported scheme {other:?} (use rabbit://, amqp://, amqps:// or memory://)")
            }
        }
    }
}

/// oslo's `ssl` query parameter (`?ssl=1`), read as oslo.config reads a
/// boolean; None when absent. Other parameters are ignored, as before.
fn ssl_query(query: &str) -> Result<Option<bool>> {
    let mut tls = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key != "ssl" {
            continue;
        }
        tls = match percent_decode(value).to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Some(true),
            "0" | "false" | "no" | "off" => Some(false),
            other => bail!("`ssl={other}` in the query: expected 1/true/yes/on or 0/false/no/off"),
        };
    }
    Ok(tls)
}

fn parse_amqp_host(entry: &str, default_port: u16) -> Result<AmqpHost> {
    let (userinfo, hostport) = match entry.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, entry),
    };
    let (user, password) = match userinfo {
        Some(u) => match u.split_once(':') {
            Some((user, pass)) => (percent_decode(user), percent_decode(pass)),
            None => (percent_decode(u), String::new()),
        },
        None => ("guest".to_string(), "guest".to_string()),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (
            h.to_string(),
            p.parse::<u16>()
                .with_context(|| format!("port {p:?} is not a number from 1 to 65535"))?,
        ),
        None => (hostport.to_string(), default_port),
    };
    if host.is_empty() {
        bail!("an entry has no host name");
    }
    Ok(AmqpHost {
        user,
        password,
        host,
        port,
    })
}

fn percent_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push(hi << 4 | lo);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl<'de> Deserialize<'de> for TransportUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|e: anyhow::Error| serde::de::Error::custom(format!("{e:#}")))
    }
}

/// Shown without passwords, so URLs can go to logs.
impl fmt::Display for TransportUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransportUrl::Memory { name } => write!(f, "memory://{name}"),
            TransportUrl::Amqp { hosts, vhost, tls } => {
                write!(f, "amqp://")?;
                for (i, h) in hosts.iter().enumerate() {
                    if i > 0 {
                        write!(f, ",")?;
                    }
                    write!(f, "{}:***@{}:{}", h.user, h.host, h.port)?;
                }
                write!(f, "/{vhost}")?;
                match tls {
                    Some(true) => write!(f, "?ssl=1"),
                    Some(false) => write!(f, "?ssl=0"),
                    None => Ok(()),
                }
            }
        }
    }
}

impl fmt::Debug for TransportUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rabbit_url_with_failover_hosts_and_vhost() {
        let url: TransportUrl = "rabbit://u:p%40ss@h1:5673,v:q@h2/child-cell2"
            .parse()
            .expect("valid url");
        let TransportUrl::Amqp { hosts, vhost, tls } = &url else {
            panic!("expected amqp")
        };
        assert_eq!(vhost, "child-cell2");
        assert_eq!(*tls, None);
        assert_eq!(hosts.len(), 2);
        assert_eq!(hosts[0].password, "p@ss");
        assert_eq!(hosts[0].port, 5673);
        assert_eq!(hosts[1].port, 5672);
        assert_eq!(url.amqp_uris()[0], "amqp://u:p%40ss@h1:5673/child-cell2");
        assert!(!url.to_string().contains("p@ss"));
    }

    #[test]
    fn amqps_scheme_turns_tls_on_with_port_5671_by_default() {
        let url: TransportUrl = "amqps://u:secret@broker.example/nova"
            .parse()
            .expect("valid");
        assert!(url.uses_tls(&RabbitOptions::default()));
        assert_eq!(
            url.amqp_uris(),
            ["amqps://u:secret@broker.example:5671/nova"]
        );
        let shown = url.to_string();
        assert_eq!(shown, "amqp://u:***@broker.example:5671/nova?ssl=1");
        assert!("amqps://h/v?ssl=0".parse::<TransportUrl>().is_err());
    }

    #[test]
    fn oslo_ssl_query_on_a_multi_host_rabbit_url() {
        let url: TransportUrl = "rabbit://u:p1@h1:5671,v:p2@h2:5671/cell1?ssl=1"
            .parse()
            .expect("valid");
        let TransportUrl::Amqp { hosts, vhost, tls } = &url else {
            panic!("expected amqp")
        };
        assert_eq!(*tls, Some(true));
        assert_eq!(vhost, "cell1", "the query is not part of the vhost");
        assert_eq!(hosts.len(), 2);
        assert_eq!(
            url.amqp_uris(),
            ["amqps://u:p1@h1:5671/cell1", "amqps://v:p2@h2:5671/cell1"]
        );
        assert!(!url.to_string().contains("p1") && !url.to_string().contains("p2"));
        // As in oslo, the URL's `ssl` wins over the option; other query
        // parameters are ignored.
        let plain: TransportUrl = "rabbit://u:p@h/v?ssl=0&foo=bar".parse().expect("valid");
        let ssl_on = RabbitOptions {
            ssl: true,
            ..RabbitOptions::default()
        };
        assert!(!plain.uses_tls(&ssl_on));
        assert_eq!(
            plain.amqp_uris_with(&ssl_on),
            ["amqp://u:p@h:5672/v?heartbeat=60"]
        );
        // oslo's port when there is none, TLS or not.
        let no_port: TransportUrl = "rabbit://u:p@h/v?ssl=true".parse().expect("valid");
        assert_eq!(no_port.amqp_uris(), ["amqps://u:p@h:5672/v"]);
        let err = format!(
            "{:#}",
            "rabbit://u:p@h/v?ssl=maybe"
                .parse::<TransportUrl>()
                .unwrap_err()
        );
        assert!(err.contains("ssl=maybe"), "{err}");
    }

    #[test]
    fn ssl_option_and_heartbeat_shape_the_uris_the_host_connects_with() {
        let url: TransportUrl = "rabbit://u:p@h/v".parse().expect("valid");
        let defaults = RabbitOptions::default();
        assert_eq!(
            url.amqp_uris_with(&defaults),
            ["amqp://u:p@h:5672/v?heartbeat=60"]
        );
        let options = RabbitOptions {
            ssl: true,
            heartbeat_timeout_threshold: 0,
            ..RabbitOptions::default()
        };
        assert!(url.uses_tls(&options));
        assert_eq!(
            url.amqp_uris_with(&options),
            ["amqps://u:p@h:5672/v?heartbeat=0"]
        );
        // The vhost "/" is percent-encoded, as lapin wants.
        let root: TransportUrl = "amqps://u:p@h:5000/".parse().expect("valid");
        assert_eq!(root.amqp_uris(), ["amqps://u:p@h:5000/%2F"]);
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        let err = "ftp://x".parse::<TransportUrl>().unwrap_err().to_string();
        assert!(err.contains("unsupported scheme"), "{err}");
        let err = format!(
            "{:#}",
            "rabbit://g:g@h:notaport/v"
                .parse::<TransportUrl>()
                .unwrap_err()
        );
        assert!(err.contains("notaport"), "{err}");
        assert!("memory://".parse::<TransportUrl>().is_err());
    }

    #[test]
    fn config_error_names_file_and_key() {
        let dir = std::env::temp_dir().join(format!("cellhost-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("cell.toml");
        std::fs::write(
            &path,
            "[cell]\nname = \"a\"\ntransport_url = \"memory://x\"\nmax_hop_count = \"ten\"\n",
        )
        .expect("write");
        let err = format!("{:#}", Config::load(&path).unwrap_err());
        assert!(err.contains("cell.toml"), "{err}");
        assert!(err.contains("max_hop_count"), "{err}");

        std::fs::write(
            &path,
            "[cell]\nname = \"a\"\ntransport_url = \"memory://x\"\n[[neighbours]]\nname = \"a\"\ntransport_url = \"memory://x\"\n",
        )
        .expect("write");
        let err = format!("{:#}", Config::load(&path).unwrap_err());
        assert!(err.contains("neighbours[0].name"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_unknown_oslo_messaging_rabbit_option_is_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("cellhost-rabbit-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("cell.toml");
        let cell = "[cell]\nname = \"a\"\ntransport_url = \"memory://x\"\n";
        // A typo of rabbit_quorum_queue must not silently leave queues classic.
        std::fs::write(
            &path,
            format!("{cell}[oslo_messaging_rabbit]\nrabbit_quorum_queues = true\n"),
        )
        .expect("write");
        let err = format!("{:#}", Config::load(&path).unwrap_err());
        assert!(err.contains("cell.toml"), "{err}");
        assert!(err.contains("rabbit_quorum_queues"), "{err}");
        std::fs::write(
            &path,
            format!("{cell}[oslo_messaging_rabbit]\nrabbit_quorum_queue = true\namqp_durable_queues = true\n"),
        )
        .expect("write");
        let config = Config::load(&path).expect("valid");
        assert!(config.oslo_messaging_rabbit.rabbit_quorum_queue);
        assert_eq!(
            config.oslo_messaging_rabbit.rabbit_transient_queues_ttl,
            1800
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn policy_cache_dir_is_relative_to_the_file_and_empty_turns_it_off() {
        let dir = std::env::temp_dir().join(format!("cellhost-cache-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("cell.toml");
        let cell = "[cell]\nname = \"a\"\ntransport_url = \"memory://x\"\n";
        std::fs::write(&path, format!("{cell}[policy]\ncache_dir = \"compiled\"\n"))
            .expect("write");
        let config = Config::load(&path).expect("valid");
        assert_eq!(config.policy.cache_dir(), Some(dir.join("compiled")));
        std::fs::write(&path, format!("{cell}[policy]\ncache_dir = \"\"\n")).expect("write");
        assert_eq!(Config::load(&path).expect("valid").policy.cache_dir(), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn dedupe_window_and_age_have_defaults_and_bounds() {
        let dir = std::env::temp_dir().join(format!("cellhost-dedupe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("cell.toml");
        let cell = "[cell]\nname = \"a\"\ntransport_url = \"memory://x\"\n";
        std::fs::write(&path, cell).expect("write");
        let config = Config::load(&path).expect("valid");
        assert_eq!(config.cell.dedupe_window, 65_536);
        assert_eq!(config.cell.dedupe_max_age_s, 600);

        std::fs::write(
            &path,
            format!("{cell}dedupe_window = 0\ndedupe_max_age_s = 0\n"),
        )
        .expect("write");
        let config = Config::load(&path).expect("0 turns each off");
        assert_eq!(
            (config.cell.dedupe_window, config.cell.dedupe_max_age_s),
            (0, 0)
        );

        std::fs::write(&path, format!("{cell}dedupe_max_age_s = 700000\n")).expect("write");
        let err = format!("{:#}", Config::load(&path).unwrap_err());
        assert!(err.contains("cell.toml"), "{err}");
        assert!(err.contains("cell.dedupe_max_age_s"), "{err}");

        std::fs::write(&path, format!("{cell}dedupe_window = 100000000\n")).expect("write");
        let err = format!("{:#}", Config::load(&path).unwrap_err());
        assert!(err.contains("cell.dedupe_window"), "{err}");

        std::fs::write(&path, format!("{cell}dedupe_max_age_s = -1\n")).expect("write");
        let err = format!("{:#}", Config::load(&path).unwrap_err());
        assert!(err.contains("dedupe_max_age_s"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn nova_cells_config_json_lists_neighbours() {
        let text = r#"{
            "api-cell": {"name": "api-cell", "api_url": "http://x", "transport_url": "rabbit://g:g@127.0.0.1:5672/api", "weight_offset": 0.0, "weight_scale": 1.0, "is_parent": true},
            "child-cell2": {"name": "child-cell2", "transport_url": "rabbit://g:g@127.0.0.1:5672/c2", "is_parent": false}
        }"#;
        let n = parse_cells_config(text, "child-cell2").expect("parses");
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].name, "api-cell");
        assert!(n[0].is_parent);
    }
}
