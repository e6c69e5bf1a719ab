//! `cellhost demo`: Nova's eight-cell test topology on the in-memory
//! transport, with the embedded nova-cells policy, a built-in local worker in
//! every cell, and a few messages whose routes are printed.
//!
//! The local worker is also what the tests put behind each cell: it consumes
//! the cell's local topic like an oslo.messaging RPC server and records what
//! it was asked to process.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use crate::client::{call_into, entry_cast, Caller, Outgoing};
use crate::config::{Config, TransportUrl};
use crate::policy::{LoadedPolicy, PolicyEngine};
use crate::topology::{tree_configs, NOVA_TOPOLOGY};
use crate::transport::{Broker, Outcome, Publication};
use crate::wire::{self, Direction, RemoteFailure, Reply, ReplyOutcome};
use crate::CellHost;

/// One message a cell's local application was given.
#[derive(Debug, Clone)]
pub struct Processed {
    pub cell: String,
    pub method: String,
    pub kwargs: Map<String, Value>,
    pub context: Map<String, Value>,
    /// From the context key `cell_routing_path`.
    pub routing_path: String,
    /// From the context key `cell_message_uuid`.
    pub message_uuid: String,
    /// Whether it came as a call (a reply was wanted).
    pub called: bool,
}

/// How a local worker answers calls.
#[derive(Debug, Clone, PartialEq)]
pub enum Behaviour {
    /// Answers with its cell's name.
    CellName,
    /// Answers `{"cell": <name>, "kwargs": <the call's kwargs>}`.
    Echo,
    /// Raises: answers with an oslo failure of this class and message.
    Fail { class: String, message: String },
    /// Never answers.
    Silent,
    /// Sends this many call-monitor heartbeats, 50 ms apart, then answers
    /// with its cell's name, as a slow oslo server asked to monitor does.
    HeartbeatsFirst(u32),
}

/// A cell's application: it consumes the local topic like an oslo.messaging
/// RPC server, records what it processed, and answers calls.
pub struct LocalWorker {
    pub processed: mpsc::UnboundedReceiver<Processed>,
    behaviour: Arc<Mutex<Behaviour>>,
}

impl LocalWorker {
    pub fn set_behaviour(&self, behaviour: Behaviour) {
        *self.behaviour.lock().unwrap_or_else(|p| p.into_inner()) = behaviour;
    }
}

/// Starts a local worker for `config`'s cell on `broker`.
pub async fn start_local_worker(broker: &Broker, config: &Config) -> Result<LocalWorker> {
    let topic = &config.local.topic;
    // As an oslo.messaging server does: the exchange, then its queue.
    let oslo = broker.oslo();
    broker
        .declare_exchange(&oslo.control_exchange(&config.cell.control_exchange))
        .await?;
    broker
        .declare_queue(
            &oslo.topic_queue(topic),
            &config.cell.control_exchange,
            topic,
        )
        .await?;
    let mut inbox = broker
        .consume(
            std::slice::from_ref(topic),
            256,
            &format!("worker-{}", config.cell.name),
        )
        .await?;
    let (tx, rx) = mpsc::unbounded_channel();
    let behaviour = Arc::new(Mutex::new(Behaviour::CellName));
    let answers = behaviour.clone();
    let cell = config.cell.name.clone();
    let replies = broker.clone();
    tokio::spawn(async move {
        while let Some(inbound) = inbox.next().await {
            let request = match wire::decode_request(&inbound.body, wire::DEFAULT_BODY_LIMIT) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(cell = %cell, error = %e, "local worker got an undecodable message");
                    inbound.settle(Outcome::Reject);
                    continue;
                }
            };
            inbound.settle(Outcome::Ack);
            let context = request.context.0;
            let text = |key: &str| {
                context
                    .get(key)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            let processed = Processed {
                cell: cell.clone(),
                method: request.method,
                kwargs: request.args,
                routing_path: text("cell_routing_path"),
                message_uuid: text("cell_message_uuid"),
                called: request.call.is_some(),
                context,
            };
            if let Some(call) = request.call {
                let behaviour = answers.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let outcome = match behaviour {
                    Behaviour::CellName => Some(ReplyOutcome::Result(Value::String(cell.clone()))),
                    Behaviour::Echo => Some(ReplyOutcome::Result(serde_json::json!({
                        "cell": cell, "kwargs": processed.kwargs
                    }))),
                    Behaviour::Fail { class, message } => {
                        Some(ReplyOutcome::Failure(RemoteFailure {
                            class,
                            module: "builtins".into(),
                            message: message.clone(),
                            tb: vec!["Traceback (most recent call last):\n".into()],
                            args: vec![Value::String(message)],
                            kwargs: Map::new(),
                        }))
                    }
                    Behaviour::Silent => None,
                    Behaviour::HeartbeatsFirst(beats) => {
                        for _ in 0..beats {
                            let beat = Reply::heartbeat(call.msg_id.clone()).encode();
                            let publication = Publication::new("", call.reply_q.clone(), beat);
                            if let Err(e) = replies.publish(&publication).await {
                                tracing::warn!(cell = %cell, error = %e, "local worker could not heartbeat");
                            }
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        }
                        Some(ReplyOutcome::Result(Value::String(cell.clone())))
                    }
                };
                if let Some(outcome) = outcome {
                    let reply = Reply {
                        msg_id: call.msg_id,
                        outcome,
                        ending: true,
                    };
                    let publication = Publication::new("", call.reply_q, reply.encode());
                    if let Err(e) = replies.publish(&publication).await {
                        tracing::warn!(cell = %cell, error = %e, "local worker could not reply");
                    }
                }
            }
            if tx.send(processed).is_err() {
                return;
            }
        }
    });
    Ok(LocalWorker {
        processed: rx,
        behaviour,
    })
}

/// Runs the demo and returns what it printed.
pub async fn run() -> Result<String> {
    let engine = PolicyEngine::new()?;
    let policy = crate::plugins::load(&engine, &Default::default())?;
    let run_id = crate::new_unique_id();
    let configs = tree_configs(&NOVA_TOPOLOGY, |cell| TransportUrl::Memory {
        name: format!("demo-{}-{cell}", &run_id[..8]),
    });
    let mut out = String::new();
    writeln!(
        out,
        "cellhost demo: Nova's eight-cell topology on memory://, policy {} ({})\n",
        policy.source(),
        policy.version()
    )?;
    print_tree(&mut out, None, "");
    let (hosts, workers) = start_cells(&configs, &policy).await?;
    let mut demo = Demo {
        configs: &configs,
        workers,
        out,
    };

    let mut reboot = Outgoing::targeted(
        "api-cell!child-cell2!grandchild-cell1",
        Direction::Down,
        "reboot_instance",
    );
    reboot
        .method_kwargs
        .insert("instance".into(), Value::String("9f8c2a52".into()));
    demo.send(
        "api-cell",
        "1. targeted down, api-cell -> grandchild-cell1",
        reboot,
        1,
    )
    .await?;
    demo.send(
        "grandchild-cell1",
        "2. targeted up, grandchild-cell1 -> api-cell",
        Outgoing::targeted(
            "grandchild-cell1!child-cell2!api-cell",
            Direction::Up,
            "instance_update_at_top",
        ),
        1,
    )
    .await?;
    demo.send(
        "api-cell",
        "3. broadcast down from api-cell",
        Outgoing::broadcast(Direction::Down, "sync_instances"),
        8,
    )
    .await?;
    demo.send(
        "grandchild-cell3",
        "4. broadcast up from grandchild-cell3",
        Outgoing::broadcast(Direction::Up, "bw_usage_update_at_top"),
        3,
    )
    .await?;

    demo.call(
        "5. call, api-cell -> grandchild-cell1",
        Outgoing::targeted(
            "api-cell!child-cell2!grandchild-cell1",
            Direction::Down,
            "get_host_uptime",
        ),
    )
    .await?;
    demo.call(
        "6. broadcast call down from api-cell",
        Outgoing::broadcast(Direction::Down, "service_get_all"),
    )
    .await?;

    let mut out = demo.out;
    writeln!(
        out,
        "\nper-cell counters (received / local / relayed / dead-lettered):"
    )?;
    for host in &hosts {
        let r = host.router();
        let s = &r.stats;
        use crate::router::Stats;
        writeln!(
            out,
            "  {:<17} {:>2} / {:>2} / {:>2} / {:>2}",
            r.cell_name(),
            Stats::get(&s.received),
            Stats::get(&s.delivered_local),
            Stats::get(&s.relayed),
            Stats::get(&s.dead_lettered)
        )?;
    }
    for host in hosts {
        host.shutdown().await;
    }
    Ok(out)
}

/// Starts a host per config, each with a recording local worker.
pub async fn start_cells(
    configs: &[Config],
    policy: &Arc<LoadedPolicy>,
) -> Result<(Vec<CellHost>, BTreeMap<String, LocalWorker>)> {
    let mut hosts = Vec::new();
    let mut workers = BTreeMap::new();
    for config in configs {
        let broker = Broker::connect(
            &config.cell.transport_url,
            &config.oslo_messaging_rabbit,
            &config.cell.name,
        )
        .await?;
        workers.insert(
            config.cell.name.clone(),
            start_local_worker(&broker, config).await?,
        );
        hosts.push(CellHost::start(config.clone(), policy.clone()).await?);
    }
    Ok((hosts, workers))
}

struct Demo<'a> {
    configs: &'a [Config],
    workers: BTreeMap<String, LocalWorker>,
    out: String,
}

impl Demo<'_> {
    async fn send(
        &mut self,
        origin: &str,
        title: &str,
        outgoing: Outgoing,
        expect: usize,
    ) -> Result<()> {
        let config = self
            .configs
            .iter()
            .find(|c| c.cell.name == origin)
            .context("demo origin is not a cell")?;
        let message = outgoing.to_message();
        let broker = Broker::connect(
            &config.cell.transport_url,
            &config.oslo_messaging_rabbit,
            "demo-client",
        )
        .await?;
        broker
            .publish(&entry_cast(
                &config.cell.control_exchange,
                &config.cell.queue_base,
                &message,
            ))
            .await?;
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while seen.len() < expect {
            let mut progressed = false;
            for worker in self.workers.values_mut() {
                while let Ok(p) = worker.processed.try_recv() {
                    if p.message_uuid == message.uuid {
                        seen.push(p);
                        progressed = true;
                    }
                }
            }
            if !progressed {
                if tokio::time::Instant::now() > deadline {
                    bail!(
                        "{title}: only {} of {expect} cells processed the message",
                        seen.len()
                    );
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        seen.sort_by(|a, b| {
            a.routing_path
                .len()
                .cmp(&b.routing_path.len())
                .then(a.cell.cmp(&b.cell))
        });
        writeln!(
            self.out,
            "\n{title}: `{}` ({})",
            message.method_name,
            &message.uuid[..8]
        )?;
        for p in &seen {
            writeln!(
                self.out,
                "   processed in {:<17} route {}",
                p.cell,
                p.routing_path.replace('!', " -> ")
            )?;
        }
        Ok(())
    }
}

impl Demo<'_> {
    /// Calls into api-cell and prints the reply the application gets.
    async fn call(&mut self, title: &str, outgoing: Outgoing) -> Result<()> {
        let config = &self.configs[0];
        let broker = Broker::connect(
            &config.cell.transport_url,
            &config.oslo_messaging_rabbit,
            "demo-caller",
        )
        .await?;
        let caller = Caller::start(broker).await?;
        let message = outgoing.to_message();
        let reply = call_into(
            &caller,
            &config.cell.control_exchange,
            &config.cell.queue_base,
            &message,
            Duration::from_secs(5),
        )
        .await?;
        writeln!(
            self.out,
            "\n{title}: `{}` ({})",
            message.method_name,
            &message.uuid[..8]
        )?;
        match reply.outcome {
            ReplyOutcome::Result(Value::Array(list)) => {
                writeln!(self.out, "   reply: {} responses", list.len())?;
                for r in list {
                    writeln!(self.out, "   {}", wire::value_to_python_json(&r))?;
                }
            }
            ReplyOutcome::Result(one) => {
                writeln!(self.out, "   reply: {}", wire::value_to_python_json(&one))?
            }
            ReplyOutcome::Failure(f) => {
                writeln!(self.out, "   reply: failure {}: {}", f.class, f.message)?
            }
        }
        // Drain what the workers recorded for it, so later steps see only theirs.
        for worker in self.workers.values_mut() {
            while worker.processed.try_recv().is_ok() {}
        }
        Ok(())
    }
}

fn print_tree(out: &mut String, parent: Option<&str>, indent: &str) {
    let children: Vec<&str> = NOVA_TOPOLOGY
        .iter()
        .filter(|(_, p)| *p == parent)
        .map(|(n, _)| *n)
        .collect();
    for (i, child) in children.iter().enumerate() {
        let last = i + 1 == children.len();
        let (branch, next) = match parent {
            None => ("", String::new()),
            Some(_) if last => ("└── ", format!("{indent}    ")),
            Some(_) => ("├── ", format!("{indent}│   ")),
        };
        let _ = writeln!(out, "  {indent}{branch}{child}");
        print_tree(out, Some(child), &next);
    }
}
