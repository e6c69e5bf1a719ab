//! `cellhost policy test`: replays a file of messages through a policy in a
//! tree of cells described by a small TOML file, prints the decision for
//! each, and compares them with an expected corpus.
//!
//! This file owns the topology and corpus formats ([`FORMATS_HELP`] is their
//! documentation, shown by `--help`) and the comparison. How a message
//! becomes the policy's view is the router's business: see
//! [`super::policy_view`].

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{decision_notation, policy_view, TestArgs};
use crate::config::{Config, TransportUrl};
use crate::policy::{Action, EngineOptions, LoadedPolicy, PolicyError, PolicyInstance};
use crate::wire::CellsMessage;

/// The formats `policy test` reads and writes, for `--help`.
pub const FORMATS_HELP: &str = r#"TOPOLOGY FILE (TOML): every cell of the tree and its parent; a root has none.

    max_hop_count = 10      # optional: every cell's `cell.max_hop_count`
    [[cell]]
    name = "api-cell"
    [[cell]]
    name = "child-cell2"
    parent = "api-cell"
    # optional, how its neighbours see this cell (as in Nova's cells_config):
    # weight_offset = 0.0, weight_scale = 1.0, capabilities = { hypervisor = ["kvm"] }

MESSAGES FILE (JSON lines): one cells message per line, exactly as an application
or a neighbouring cell sends it (the JSON text in `args.message` of Nova's
`process_message` cast), plus a "cell" field naming the cell that receives it
(else --cell). Blank lines are skipped. For each line, as the router does: the
cell's name is appended to routing_path (an empty or null routing_path means
the message enters the network at this cell), hop_count grows by one,
max_hop_count is capped by the cell's, and the policy's route is called. Each
line is routed on its own (no relaying, no duplicate detection): to follow a
message along its route, list it once for every cell on the way.

    {"cell": "api-cell", "message_type": "targeted", "ctxt": {}, "method_name": "reboot", "method_kwargs": {}, "direction": "down", "need_response": false, "fanout": false, "uuid": "m1", "routing_path": null, "hop_count": 0, "max_hop_count": 10, "target_cell": "api-cell!child-cell2"}

OUTPUT: one line per message: its uuid, the cell, and the decision, the
policy's actions in order, each one of

    process-here | relay:CELL | reply-error:CLASS: MESSAGE | drop:REASON

or, when the call failed, `error:CODE: REASON` (CODE: policy-error, policy-trap,
policy-deadline). With --json each line is {"uuid", "cell", "decision": [...]}.

EXPECT FILE (JSON lines): {"uuid": "m1", "decision": ["relay:child-cell2"]}, with
an optional "cell"; --json output is a valid expect file. The n-th expectation
for a uuid is compared with the n-th message with that uuid. Messages without
an expectation, expectations without a message, and different decisions are
all differences; any difference fails the command."#;

pub fn run(args: &TestArgs) -> Result<()> {
    let topology = Topology::load(&args.topology)?;
    let messages = load_messages(&args.messages, args.cell.as_deref(), &topology)?;
    let expected = match &args.expect {
        Some(path) => Some((path, load_expected(path)?)),
        None => None,
    };
    let (_, policy) = args.policy.load(EngineOptions::default())?;

    let outcomes = replay(&policy, &topology, messages);
    for outcome in &outcomes {
        if args.json {
            println!("{}", serde_json::to_string(outcome)?);
        } else {
            let decision = if outcome.decision.is_empty() {
                "(no action)".to_string()
            } else {
                outcome.decision.join(", ")
            };
            println!("{}  {}  {decision}", outcome.uuid, outcome.cell);
        }
    }

    let Some((path, expected)) = expected else {
        return Ok(());
    };
    let differences = compare(&outcomes, &expected);
    for difference in &differences {
        println!("{difference}");
    }
    if !differences.is_empty() {
        bail!(
            "{} difference(s) between the policy's decisions and the expected ones in {}",
            differences.len(),
            path.display()
        );
    }
    eprintln!("all {} decisions match {}", outcomes.len(), path.display());
    Ok(())
}

/// The cells of a topology file, each configured as its host would be.
pub struct Topology {
    configs: BTreeMap<String, Config>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TopologyFile {
    #[serde(default)]
    max_hop_count: Option<u32>,
    #[serde(default)]
    cell: Vec<TopologyCell>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TopologyCell {
    name: String,
    #[serde(default)]
    parent: Option<String>,
    #[serde(default)]
    weight_offset: f64,
    #[serde(default = "one")]
    weight_scale: f64,
    #[serde(default)]
    capabilities: BTreeMap<String, Vec<String>>,
}

fn one() -> f64 {
    1.0
}

impl Topology {
    /// Reads a topology file; every error names the file.
    pub fn load(path: &Path) -> Result<Topology> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read topology file {}", path.display()))?;
        Topology::parse(&text).map_err(|e| anyhow!("topology file {}: {e:#}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Topology> {
        let file: TopologyFile = toml::from_str(text).map_err(|e| anyhow!("{e}"))?;
        if file.cell.is_empty() {
            bail!("no `[[cell]]` entries: list every cell of the tree");
        }
        let mut by_name: HashMap<&str, &TopologyCell> = HashMap::new();
        for (i, cell) in file.cell.iter().enumerate() {
            if by_name.insert(cell.name.as_str(), cell).is_some() {
                bail!("`cell[{i}].name`: {:?} is listed twice", cell.name);
            }
        }
        for (i, cell) in file.cell.iter().enumerate() {
            let Some(parent) = &cell.parent else { continue };
            if !by_name.contains_key(parent.as_str()) {
                bail!("`cell[{i}].parent`: no cell is named {parent:?}");
            }
            // Walking up from each cell must reach a root; a cycle never does.
            let mut seen = HashSet::from([cell.name.as_str()]);
            let mut up = Some(parent.as_str());
            while let Some(name) = up {
                if !seen.insert(name) {
                    bail!(
                        "`cell[{i}].parent`: {:?} is its own ancestor; cells must form a tree",
                        cell.name
                    );
                }
                up = by_name.get(name).and_then(|c| c.parent.as_deref());
            }
        }

        let tree: Vec<(&str, Option<&str>)> = file
            .cell
            .iter()
            .map(|c| (c.name.as_str(), c.parent.as_deref()))
            .collect();
        // The transport is never used: nothing is published.
        let url = TransportUrl::Memory {
            name: "policy-test".to_string(),
        };
        let mut configs = BTreeMap::new();
        for mut config in crate::topology::tree_configs(&tree, |_| url.clone()) {
            if let Some(max) = file.max_hop_count {
                config.cell.max_hop_count = max;
            }
            for neighbour in &mut config.neighbours {
                if let Some(entry) = by_name.get(neighbour.name.as_str()) {
                    neighbour.weight_offset = entry.weight_offset;
                    neighbour.weight_scale = entry.weight_scale;
                    neighbour.capabilities = entry.capabilities.clone();
                }
            }
            config
                .validate()
                .with_context(|| format!("cell {:?}", config.cell.name))?;
            configs.insert(config.cell.name.clone(), config);
        }
        Ok(Topology { configs })
    }

    /// The config of the cell called `name`, as its host would have it.
    pub fn config(&self, name: &str) -> Option<&Config> {
        self.configs.get(name)
    }

    fn names(&self) -> String {
        self.configs
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// One line of the messages file.
struct Arrival {
    cell: String,
    message: CellsMessage,
}

fn load_messages(
    path: &Path,
    default_cell: Option<&str>,
    topology: &Topology,
) -> Result<Vec<Arrival>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read messages file {}", path.display()))?;
    let mut arrivals = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("messages file {} line {}", path.display(), i + 1);
        let mut map: Map<String, Value> = serde_json::from_str(line)
            .map_err(|e| anyhow!("{at}: not a JSON object on one line: {e}"))?;
        // `shift_remove` keeps the order of the other keys, which the codec
        // preserves for keys it does not know.
        let cell = match map.shift_remove("cell") {
            Some(Value::String(cell)) => cell,
            Some(other) => bail!("{at}: \"cell\" must be a cell's name, got {other}"),
            None => match default_cell {
                Some(cell) => cell.to_string(),
                None => bail!(
                    "{at}: no \"cell\" field says which cell receives the message; add one or pass --cell"
                ),
            },
        };
        if topology.config(&cell).is_none() {
            bail!(
                "{at}: cell {cell:?} is not in the topology (its cells: {})",
                topology.names()
            );
        }
        let message = CellsMessage::from_map(map).map_err(|e| anyhow!("{at}: {e}"))?;
        arrivals.push(Arrival { cell, message });
    }
    if arrivals.is_empty() {
        bail!("messages file {} holds no messages", path.display());
    }
    Ok(arrivals)
}

/// What the policy decided for one message.
#[derive(Debug, Serialize)]
struct Outcome {
    uuid: String,
    cell: String,
    decision: Vec<String>,
}

/// Routes every arrival with one instance per cell, reused from message to
/// message and replaced after a failure that poisons it, as a cell's
/// consumer does.
fn replay(policy: &Arc<LoadedPolicy>, topology: &Topology, arrivals: Vec<Arrival>) -> Vec<Outcome> {
    let mut instances: HashMap<String, PolicyInstance> = HashMap::new();
    let mut outcomes = Vec::with_capacity(arrivals.len());
    for Arrival { cell, message } in arrivals {
        let uuid = message.uuid.clone();
        let result = match topology.config(&cell) {
            Some(config) => route_at(policy, &mut instances, config, message),
            // `load_messages` only lets through cells of the topology.
            None => Err(PolicyError::Trap(format!(
                "no cell {cell:?} in the topology"
            ))),
        };
        outcomes.push(Outcome {
            uuid,
            decision: decision_notation(&result),
            cell,
        });
    }
    outcomes
}

fn route_at(
    policy: &Arc<LoadedPolicy>,
    instances: &mut HashMap<String, PolicyInstance>,
    config: &Config,
    message: CellsMessage,
) -> Result<Vec<Action>, PolicyError> {
    let name = &config.cell.name;
    let instance = match instances.entry(name.clone()) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => e.insert(
            policy
                .instantiate()
                .map_err(|e| PolicyError::Trap(format!("cannot instantiate: {e:#}")))?,
        ),
    };
    let (view, cell) = policy_view(config, message);
    let result = instance.route(&view, &cell);
    if instance.worn_out() || result.as_ref().is_err_and(PolicyError::poisons_instance) {
        instances.remove(name);
    }
    result
}

/// The promotion gate of a live cell (`policy.gate`): every line of the gate
/// file is a cells message as it reaches this cell, plus `"expect"`, the
/// decision it must get. A candidate that decides any of them differently
/// is refused, and the error shows each differing case.
pub fn gate(policy: &Arc<LoadedPolicy>, config: &Config, path: &Path) -> Result<()> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read gate file {}", path.display()))?;
    let mut outcomes = Vec::new();
    let mut expected = Vec::new();
    let mut instances = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("gate file {} line {}", path.display(), i + 1);
        let mut map: Map<String, Value> = serde_json::from_str(line)
            .map_err(|e| anyhow!("{at}: not a JSON object on one line: {e}"))?;
        let decision: Vec<String> = match map.shift_remove("expect") {
            Some(v) => serde_json::from_value(v)
                .map_err(|e| anyhow!("{at}: \"expect\" must be a list of decisions: {e}"))?,
            None => bail!("{at}: no \"expect\" field with the decision this message must get"),
        };
        let message = CellsMessage::from_map(map).map_err(|e| anyhow!("{at}: {e}"))?;
        let uuid = message.uuid.clone();
        let result = route_at(policy, &mut instances, config, message);
        outcomes.push(Outcome {
            uuid: uuid.clone(),
            cell: config.cell.name.clone(),
            decision: decision_notation(&result),
        });
        expected.push(Expected {
            uuid,
            cell: None,
            decision,
        });
    }
    let differences = compare(&outcomes, &expected);
    if differences.is_empty() {
        return Ok(());
    }
    let cases: Vec<String> = differences.iter().map(|d| d.to_string()).collect();
    bail!(
        "the candidate fails the gate {}: {} of {} messages decided differently\n{}",
        path.display(),
        differences.len(),
        outcomes.len(),
        cases.join("\n")
    )
}

/// One line of the expect file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Expected {
    uuid: String,
    #[serde(default)]
    cell: Option<String>,
    decision: Vec<String>,
}

fn load_expected(path: &Path) -> Result<Vec<Expected>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read expect file {}", path.display()))?;
    let mut expected = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let entry = serde_json::from_str(line).map_err(|e| {
            anyhow!(
                "expect file {} line {}: not {{\"uuid\": ..., \"decision\": [...]}}: {e}",
                path.display(),
                i + 1
            )
        })?;
        expected.push(entry);
    }
    Ok(expected)
}

/// A message whose decision is not the expected one.
#[derive(Debug)]
struct Difference<'a> {
    uuid: &'a str,
    expected: Option<(Option<&'a str>, &'a [String])>,
    got: Option<(&'a str, &'a [String])>,
}

impl std::fmt::Display for Difference<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // JSON arrays, so that spaces and empty lists are unambiguous.
        let list = |d: &[String]| serde_json::to_string(d).unwrap_or_default();
        writeln!(f, "DIFFERS uuid {}", self.uuid)?;
        match self.expected {
            Some((Some(cell), d)) => writeln!(f, "  expected  at {cell}: {}", list(d))?,
            Some((None, d)) => writeln!(f, "  expected  {}", list(d))?,
            None => writeln!(f, "  expected  (no expectation for this message)")?,
        }
        match self.got {
            Some((cell, d)) => write!(f, "  got       at {cell}: {}", list(d)),
            None => write!(f, "  got       (no message with this uuid)"),
        }
    }
}

/// Pairs each outcome with the next unused expectation for its uuid.
fn compare<'a>(outcomes: &'a [Outcome], expected: &'a [Expected]) -> Vec<Difference<'a>> {
    let mut pending: HashMap<&str, VecDeque<usize>> = HashMap::new();
    for (i, e) in expected.iter().enumerate() {
        pending.entry(e.uuid.as_str()).or_default().push_back(i);
    }
    let mut used = vec![false; expected.len()];
    let mut differences = Vec::new();
    for outcome in outcomes {
        let got = Some((outcome.cell.as_str(), outcome.decision.as_slice()));
        let next = pending
            .get_mut(outcome.uuid.as_str())
            .and_then(VecDeque::pop_front);
        let Some(i) = next else {
            differences.push(Difference {
                uuid: &outcome.uuid,
                expected: None,
                got,
            });
            continue;
        };
        used[i] = true;
        let e = &expected[i];
        let cell_differs = e.cell.as_ref().is_some_and(|c| *c != outcome.cell);
        if cell_differs || e.decision != outcome.decision {
            differences.push(Difference {
                uuid: &outcome.uuid,
                expected: Some((e.cell.as_deref(), &e.decision)),
                got,
            });
        }
    }
    for (e, _) in expected.iter().zip(&used).filter(|(_, used)| !**used) {
        differences.push(Difference {
            uuid: &e.uuid,
            expected: Some((e.cell.as_deref(), &e.decision)),
            got: None,
        });
    }
    differences
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topology_errors_name_the_entry() {
        let err = |text: &str| format!("{:#}", Topology::parse(text).err().expect("refused"));
        assert!(err("").contains("no `[[cell]]`"));
        let dup = "[[cell]]\nname = \"a\"\n[[cell]]\nname = \"a\"\n";
        assert!(err(dup).contains("cell[1].name"), "{}", err(dup));
        let orphan = "[[cell]]\nname = \"a\"\nparent = \"x\"\n";
        assert!(err(orphan).contains("no cell is named \"x\""));
        let cycle =
            "[[cell]]\nname = \"a\"\nparent = \"b\"\n[[cell]]\nname = \"b\"\nparent = \"a\"\n";
        assert!(err(cycle).contains("own ancestor"), "{}", err(cycle));
        let typo = "[[cell]]\nname = \"a\"\nparnet = \"b\"\n";
        assert!(err(typo).contains("parnet"), "{}", err(typo));
    }

    #[test]
    fn topology_gives_each_cell_its_neighbours() {
        let topology = Topology::parse(
            "max_hop_count = 3\n[[cell]]\nname = \"top\"\n[[cell]]\nname = \"kid\"\nparent = \"top\"\nweight_scale = 2.0\n",
        )
        .expect("valid");
        let top = topology.config("top").expect("top");
        assert_eq!(top.cell.max_hop_count, 3);
        assert_eq!(top.neighbours.len(), 1);
        assert!(!top.neighbours[0].is_parent);
        assert_eq!(top.neighbours[0].weight_scale, 2.0);
        let kid = topology.config("kid").expect("kid");
        assert!(kid.neighbours[0].is_parent);
    }

    #[test]
    fn comparison_pairs_by_uuid_in_order() {
        let outcome = |uuid: &str, cell: &str, d: &[&str]| Outcome {
            uuid: uuid.into(),
            cell: cell.into(),
            decision: d.iter().map(|s| s.to_string()).collect(),
        };
        let expect = |uuid: &str, cell: Option<&str>, d: &[&str]| Expected {
            uuid: uuid.into(),
            cell: cell.map(str::to_string),
            decision: d.iter().map(|s| s.to_string()).collect(),
        };
        let outcomes = [
            outcome("m1", "a", &["relay:b"]),
            outcome("m1", "b", &["process-here"]),
            outcome("m2", "a", &[]),
            outcome("m3", "a", &[]),
        ];
        let expected = [
            expect("m1", Some("a"), &["relay:b"]),
            expect("m1", None, &["process-here"]),
            expect("m2", Some("b"), &[]),
            expect("m4", None, &[]),
        ];
        let differences = compare(&outcomes, &expected);
        let uuids: Vec<&str> = differences.iter().map(|d| d.uuid).collect();
        // m2: right decision at the wrong cell; m3: no expectation; m4: no message.
        assert_eq!(uuids, ["m2", "m3", "m4"]);
        let shown = differences[0].to_string();
        assert!(shown.contains("expected  at b: []"), "{shown}");
        assert!(shown.contains("got       at a: []"), "{shown}");
    }
}
