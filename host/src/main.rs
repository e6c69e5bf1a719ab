//! The `cellhost` command: serve cells, run the demo, send a message.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{Map, Value};

use cellhost::client::{call_into, declare_intercell, entry_cast, Caller, Outgoing};
use cellhost::config::{Config, RabbitOptions, TransportUrl};
use cellhost::sched::CpuScheduling;
use cellhost::transport::Broker;
use cellhost::wire::{Direction, ReplyOutcome};
use cellhost::CellHost;

#[derive(Parser)]
#[command(
    name = "cellhost",
    version,
    about = "A WebAssembly-pluggable message host for hierarchical cells (Nova cells v1 over oslo.messaging)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How this process's threads are scheduled (Linux): `batch` moves them
    /// from the normal class to the batch class, where a woken thread waits
    /// for its turn instead of preempting the one that woke it, so publishes
    /// leave in batches (a process started in another class keeps it);
    /// `keep` leaves the class the process was started in.
    #[arg(long, global = true, value_enum, default_value_t = CpuScheduling::Batch)]
    cpu_scheduling: CpuScheduling,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the cell a config file describes (several files: several cells in one process).
    Run {
        /// A cell's TOML config; repeat for several cells (e.g. on memory://).
        #[arg(long, short, required = true)]
        config: Vec<PathBuf>,
    },
    /// Run Nova's eight-cell test topology in memory and show where messages go.
    Demo,
    /// Cast a message into a cell, as an application on that cell would.
    Send(SendArgs),
    /// Check, test or benchmark a policy component, with no broker.
    #[command(subcommand)]
    Policy(cellhost::policy_tools::PolicyCommand),
}

#[derive(clap::Args)]
struct SendArgs {
    /// Take the broker, exchange and queue base from this cell's config.
    #[arg(long, conflicts_with = "url")]
    config: Option<PathBuf>,
    /// The cell's broker, e.g. rabbit://guest:guest@127.0.0.1:5672/api-cell.
    #[arg(long, required_unless_present = "config")]
    url: Option<String>,
    #[arg(long, default_value = "nova")]
    control_exchange: String,
    #[arg(long, default_value = "cells.intercell")]
    queue_base: String,
    /// With --url: an `[oslo_messaging_rabbit]` option of the cell's oslo
    /// services, e.g. rabbit_quorum_queue=true, so that the queues this
    /// declares match theirs; repeat for several. With --config the file's
    /// section is used.
    #[arg(
        long = "rabbit-option",
        value_name = "KEY=VALUE",
        conflicts_with = "config"
    )]
    rabbit_options: Vec<String>,
    /// targeted or broadcast.
    #[arg(long = "type", value_enum, default_value = "targeted")]
    kind: Kind,
    /// The destination's path for a targeted message, e.g. api-cell!child-cell2.
    #[arg(long, required_if_eq("kind", "targeted"))]
    target: Option<String>,
    #[arg(long, value_enum, default_value = "down")]
    direction: Dir,
    /// The method the destination's application is asked to run.
    #[arg(long)]
    method: String,
    /// Its keyword arguments, a JSON object.
    #[arg(long, default_value = "{}")]
    kwargs: String,
    /// The request context, a JSON object.
    #[arg(long, default_value = "{}")]
    ctxt: String,
    #[arg(long, default_value_t = 10)]
    max_hop_count: u32,
    /// For a broadcast: do not process it in the cell it is sent from.
    #[arg(long)]
    no_run_locally: bool,
    /// Call instead of cast: wait for the response(s) and print them as JSON.
    #[arg(long)]
    wait: bool,
    /// With --wait: how long to wait for the answer, in seconds.
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
}

#[derive(Clone, Copy, ValueEnum)]
enum Kind {
    Targeted,
    Broadcast,
}

#[derive(Clone, Copy, ValueEnum)]
enum Dir {
    Up,
    Down,
}

#[global_allocator]
static ALLOCATOR: cellhost::Allocator = cellhost::Allocator;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Run { .. } => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
    // Before the runtime starts its threads, so that they inherit it.
    if let Err(e) = cellhost::sched::apply(cli.cpu_scheduling) {
        tracing::warn!(class = %cli.cpu_scheduling, error = %e, "cannot set the CPU scheduling class; the system's default stays");
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cellhost: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cellhost: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Run { config } => run(config).await,
        Command::Demo => {
            print!("{}", cellhost::demo::run().await?);
            Ok(())
        }
        Command::Send(args) => send(args).await,
        // Synchronous on purpose: wasmtime calls and their timing, no I/O to await.
        Command::Policy(command) => cellhost::policy_tools::run(command),
    }
}

async fn run(paths: Vec<PathBuf>) -> Result<()> {
    // Every file is checked before any broker is touched.
    let configs = paths
        .iter()
        .map(|p| Config::load(p))
        .collect::<Result<Vec<_>>>()?;
    let engine = cellhost::plugins::engine(configs.iter().map(|c| &c.policy))?;
    // One admin listener per process, where the first config that asks says.
    let admin = configs.iter().find_map(|c| c.admin.clone());
    let mut hosts = Vec::new();
    let mut reloaders = Vec::new();
    for config in configs {
        let policy = cellhost::plugins::load(&engine, &config.policy)
            .with_context(|| format!("cell {}", config.cell.name))?;
        let shadow = cellhost::plugins::load_shadow(&engine, &config.policy)
            .with_context(|| format!("cell {}", config.cell.name))?;
        let mut host = CellHost::start(config, policy).await?;
        host.router().set_shadow(shadow);
        reloaders.push(host.enable_reload(engine.clone(), true)?);
        hosts.push(host);
    }
    if let Some(admin) = admin {
        let cells = hosts
            .iter()
            .zip(&reloaders)
            .map(|(h, r)| cellhost::admin::AdminCell {
                router: h.router().clone(),
                reloader: Some(r.clone()),
            })
            .collect();
        cellhost::admin::serve(admin.listen, cells).await?;
    }
    // SIGHUP reloads every cell's policy and neighbours from their files.
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangups = signal(SignalKind::hangup()).context("listening for SIGHUP")?;
        let neighbours: Vec<_> = hosts
            .iter()
            .map(|h| h.neighbours().clone())
            .filter(|n| n.path().is_some())
            .collect();
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                for cell in &neighbours {
                    // Logged either way; a refused file leaves the set serving.
                    let _ = cell.reload().await;
                }
                for reloader in reloaders.iter().filter(|r| r.path().is_some()) {
                    // The outcome is logged; a refused version leaves the old one serving.
                    let _ = reloader.reload().await;
                }
            }
        });
    }
    let stopped_by_itself = {
        let any_stopped =
            futures::future::select_all(hosts.iter_mut().map(|h| Box::pin(h.stopped())));
        tokio::select! {
            _ = shutdown_signal() => false,
            _ = any_stopped => true,
        }
    };
    for host in hosts {
        host.shutdown().await;
    }
    if stopped_by_itself {
        anyhow::bail!("a consumer stopped: lost the connection to a cell's broker");
    }
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

async fn send(args: SendArgs) -> Result<()> {
    let (url, exchange, queue_base, options) = match &args.config {
        Some(path) => {
            let c = Config::load(path)?;
            (
                c.cell.transport_url,
                c.cell.control_exchange,
                c.cell.queue_base,
                c.oslo_messaging_rabbit,
            )
        }
        None => {
            let url = args.url.as_deref().unwrap_or_default();
            let url: TransportUrl = url.parse().context("--url")?;
            (
                url,
                args.control_exchange.clone(),
                args.queue_base.clone(),
                rabbit_options(&args.rabbit_options)?,
            )
        }
    };
    let direction = match args.direction {
        Dir::Up => Direction::Up,
        Dir::Down => Direction::Down,
    };
    let mut outgoing = match args.kind {
        Kind::Targeted => Outgoing::targeted(
            args.target.as_deref().unwrap_or_default(),
            direction,
            &args.method,
        ),
        Kind::Broadcast => Outgoing::broadcast(direction, &args.method),
    };
    outgoing.method_kwargs = json_object("--kwargs", &args.kwargs)?;
    outgoing.ctxt = json_object("--ctxt", &args.ctxt)?;
    outgoing.max_hop_count = args.max_hop_count;
    outgoing.run_locally = !args.no_run_locally;
    let message = outgoing.to_message();
    let broker = Broker::connect(&url, &options, "cellhost send").await?;
    declare_intercell(&broker, &exchange, &queue_base).await?;
    if !args.wait {
        broker
            .publish(&entry_cast(&exchange, &queue_base, &message))
            .await
            .context("the broker did not confirm the message")?;
        broker.close().await;
        println!("{}", message.uuid);
        return Ok(());
    }
    if !(args.timeout > 0.0 && args.timeout < 86_400.0) {
        anyhow::bail!("--timeout must be between 0 and 86400 seconds");
    }
    let timeout = std::time::Duration::from_secs_f64(args.timeout);
    let caller = Caller::start(broker.clone()).await?;
    let reply = call_into(&caller, &exchange, &queue_base, &message, timeout).await;
    broker.close().await;
    match reply?.outcome {
        ReplyOutcome::Result(value) => {
            println!("{}", serde_json::to_string_pretty(&value)?);
            Ok(())
        }
        ReplyOutcome::Failure(f) => anyhow::bail!("the call failed: {}: {}", f.class, f.message),
    }
}

/// `--rabbit-option KEY=VALUE`s read as an `[oslo_messaging_rabbit]`
/// section, so names, types and checks are the config file's.
fn rabbit_options(pairs: &[String]) -> Result<RabbitOptions> {
    let mut section = toml::Table::new();
    for pair in pairs {
        let Some((key, value)) = pair.split_once('=') else {
            anyhow::bail!(
                "--rabbit-option {pair:?}: expected KEY=VALUE, e.g. rabbit_quorum_queue=true"
            );
        };
        let (key, value) = (key.trim(), value.trim());
        // A bare word that is not a TOML value (a file path) is a string.
        let value = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.to_string()));
        section.insert(key.to_string(), value);
    }
    let options: RabbitOptions = toml::Value::Table(section)
        .try_into()
        .map_err(|e| anyhow::anyhow!("--rabbit-option: {e}"))?;
    options.validate("--rabbit-option")?;
    Ok(options)
}

fn json_object(flag: &str, text: &str) -> Result<Map<String, Value>> {
    match serde_json::from_str(text).with_context(|| format!("{flag} is not JSON"))? {
        Value::Object(map) => Ok(map),
        _ => anyhow::bail!("{flag} must be a JSON object, like '{{\"key\": 1}}'"),
    }
}
