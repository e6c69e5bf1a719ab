//! `cellhost policy check | test | bench | new`: what a policy author or an operator
//! runs on a `.wasm` before any cell loads it, with no broker anywhere.
//!
//! This module owns those commands' arguments, how they load a policy (the
//! host's own [`PolicyEngine`] and loader, so a policy that passes here loads
//! in a cell) and the notation decisions are printed and compared in. The
//! commands themselves live in [`check`], [`corpus`] (`policy test`),
//! [`bench`] and [`new`] (which writes a policy crate). Messages are turned into the policy's view by the router's own
//! functions, never by a copy of them, so what is tested is what runs.

mod bench;
mod check;
mod corpus;
pub mod new;

pub use corpus::gate;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;

use crate::config::{Config, PolicySection};
use crate::policy::{Cell, EngineOptions, LoadedPolicy, Message, PolicyEngine};
use crate::wire::CellsMessage;

/// `cellhost policy ...`.
#[derive(clap::Subcommand)]
pub enum PolicyCommand {
    /// Load a policy as a cell would (compile, check its world, run init) and
    /// show its imports, exports and the sandbox limits it runs under.
    Check(CheckArgs),
    /// Replay messages through a policy in a tree of cells, without a broker,
    /// and print (or compare) what it decides for each.
    #[command(after_long_help = corpus::FORMATS_HELP)]
    Test(TestArgs),
    /// Measure `route` calls per second and per-call latency on Nova's
    /// eight-cell topology.
    Bench(BenchArgs),
    /// Start a policy: write a crate that builds, tests (natively and as the
    /// compiled component) and deploys with this binary alone.
    New(new::NewArgs),
}

/// What every `policy` subcommand needs to load a policy.
#[derive(clap::Args)]
pub struct PolicyArgs {
    /// The policy component (`.wasm`; WebAssembly text is accepted too).
    pub plugin: PathBuf,
    /// The string handed to the policy's `init`, as `[policy] config`.
    #[arg(long, default_value = "")]
    pub config: String,
    /// Wall-clock budget of one `route` call, as `[policy] deadline_ms`.
    #[arg(long, default_value_t = PolicySection::default().deadline_ms,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub deadline_ms: u64,
    /// Memory one instance may grow to, as `[policy] memory_mib`.
    #[arg(long, default_value_t = PolicySection::default().memory_mib,
          value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub memory_mib: u64,
    /// Cache compiled policies in this folder [default: $XDG_CACHE_HOME/cellhost
    /// or ~/.cache/cellhost, as `[policy] cache_dir`].
    #[arg(long, conflicts_with = "no_cache")]
    pub cache_dir: Option<PathBuf>,
    /// Neither read nor write the compiled-policy cache.
    #[arg(long)]
    pub no_cache: bool,
}

#[derive(clap::Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub policy: PolicyArgs,
}

#[derive(clap::Args)]
pub struct TestArgs {
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// The tree of cells, a TOML file (format below).
    #[arg(long)]
    pub topology: PathBuf,
    /// The messages, one JSON cells message per line (format below).
    #[arg(long)]
    pub messages: PathBuf,
    /// The cell receiving messages whose line has no "cell" field.
    #[arg(long)]
    pub cell: Option<String>,
    /// Compare with these decisions, one JSON object per line (format below);
    /// every difference is shown and the command fails if there is any.
    #[arg(long)]
    pub expect: Option<PathBuf>,
    /// Print decisions as JSON lines, the format `--expect` reads.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Timed `route` calls, after a tenth as many (at least 100) to warm up.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub iterations: u64,
    /// Run with wasmtime's component-model concurrency support on (the host
    /// runs with it off), to measure what it costs.
    #[arg(long)]
    pub concurrency_support: bool,
    /// Write `/tmp/perf-<pid>.map`, naming the policy's compiled functions
    /// for `perf record` / `perf report` run around this command.
    #[arg(long)]
    pub perf_map: bool,
}

/// Runs one `cellhost policy` subcommand, printing to stdout. An error means
/// the policy or an input is unusable, or decisions differ from `--expect`.
pub fn run(command: PolicyCommand) -> Result<()> {
    match command {
        PolicyCommand::Check(args) => check::run(&args),
        PolicyCommand::Test(args) => corpus::run(&args),
        PolicyCommand::Bench(args) => bench::run(&args),
        PolicyCommand::New(args) => new::run(&args),
    }
}

impl PolicyArgs {
    /// The `[policy]` section these flags amount to.
    fn section(&self) -> PolicySection {
        PolicySection {
            path: Some(self.plugin.clone()),
            config: self.config.clone(),
            deadline_ms: self.deadline_ms,
            memory_mib: self.memory_mib,
            cache_dir: if self.no_cache {
                Some(PathBuf::new())
            } else {
                self.cache_dir.clone()
            },
            ..PolicySection::default()
        }
    }

    /// Loads the policy exactly as a cell with this `[policy]` section would.
    fn load(&self, options: EngineOptions) -> Result<(PolicySection, Arc<LoadedPolicy>)> {
        let section = self.section();
        let engine = PolicyEngine::with_options(EngineOptions {
            cache_dir: section.cache_dir(),
            ..options
        })?;
        let policy = crate::plugins::load(&engine, &section)?;
        Ok((section, policy))
    }
}

/// What the policy of `config`'s cell is shown of `message` on its arrival
/// there: the router's own steps before it asks the policy
/// (`RouteWorker::plan`), then the router's own conversion to the WIT view.
pub fn policy_view(config: &Config, mut message: CellsMessage) -> (Message, Cell) {
    let is_origin = message.routing_path.is_empty();
    message.append_hop(&config.cell.name);
    message.max_hop_count = message.max_hop_count.min(config.cell.max_hop_count);
    (
        crate::policy::view::message_view(&message, is_origin),
        crate::policy::view::cell_view(config),
    )
}

pub use crate::policy::view::{action_notation, decision_notation};
