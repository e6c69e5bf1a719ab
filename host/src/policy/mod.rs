//! The policy runtime: compiling policy components, checking they implement the
//! `cellhost:policy` world, and calling them in a sandbox.
//!
//! It owns wasmtime. A [`PolicyEngine`] compiles components (once per content
//! hash, kept in memory and, when given a cache folder, on disk: see
//! [`cache`]), a [`LoadedPolicy`] is one validated version, and a
//! [`PolicyInstance`] is one live instance of it that a consumer reuses call
//! after call. Every call runs under a deadline of the CPU time its thread
//! spends on it, checked at each epoch tick (see [`clock`]), and within one
//! budget of memory, tables and instances for the whole instance (see
//! [`budget`]).
//! An instance that traps or times out is unusable; the caller drops it and
//! takes a fresh one. Policies see no files, sockets, environment or arguments:
//! the WASI context they get grants nothing but a clock and randomness.
//!
//! It knows nothing of brokers or of the wire format.

mod bindings;
pub mod budget;
pub mod cache;
mod clock;
mod ticker;
pub mod view;
pub mod world;

use crate::lock;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, Func, HasSelf, Linker, ResourceTable, TypedFunc};
use wasmtime::error::Context as _;
use wasmtime::{Engine, Store, Trap};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

pub use bindings::types::{Action, Cell, Direction, Failure, Message, MessageType, Neighbour};
use bindings::{host::Level, Policy, PolicyPre};
pub use budget::Usage;
pub use cache::{default_cache_dir, DiskCache};

use ticker::{Ticker, TICK};
use view::MessageView;

/// `route` as the host calls it: the message borrowed, the cell by reference.
type RouteFunc<'a, 'c> = TypedFunc<(MessageView<'a>, &'c Cell), (Result<Vec<Action>, String>,)>;

/// Sandbox limits of one policy's instances.
#[derive(Debug, Clone)]
pub struct Limits {
    pub deadline: Duration,
    /// Bytes of linear memory an instance may hold, all its memories together.
    pub memory_bytes: usize,
    /// The one grant a policy may have: a folder it can read, as `/data`.
    pub data_dir: Option<std::path::PathBuf>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            deadline: Duration::from_millis(5),
            memory_bytes: 16 << 20,
            data_dir: None,
        }
    }
}

impl Limits {
    /// The CPU-time budget of `init`, which may set up tables: twenty times
    /// a routing call's, and at least 200 ms.
    pub fn init_deadline(&self) -> Duration {
        (self.deadline.max(TICK) * 20).max(Duration::from_millis(200))
    }
}

/// Why a policy call did not produce actions.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PolicyError {
    #[error("policy exceeded its deadline of {0:?}")]
    Deadline(Duration),
    #[error("policy trapped: {0}")]
    Trap(String),
    #[error("policy returned an error: {0}")]
    Refused(String),
}

impl PolicyError {
    /// Whether the instance that produced this error must be discarded.
    pub fn poisons_instance(&self) -> bool {
        !matches!(self, PolicyError::Refused(_))
    }

    /// A short stable slug for metrics and dead-letter headers.
    pub fn reason_code(&self) -> &'static str {
        match self {
            PolicyError::Deadline(_) => "policy-deadline",
            PolicyError::Trap(_) => "policy-trap",
            PolicyError::Refused(_) => "policy-error",
        }
    }
}

/// Where a [`LoadedPolicy`]'s compiled code came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompileSource {
    /// Compiled earlier by the same engine, kept in memory.
    Memory,
    /// Read from the on-disk cache.
    Disk,
    /// Compiled from the component's bytes just now.
    Compiled,
}

impl CompileSource {
    /// How an operator reads it: "compiled", "from the disk cache", ...
    pub fn describe(self) -> &'static str {
        match self {
            CompileSource::Memory => "already compiled in this process",
            CompileSource::Disk => "from the disk cache",
            CompileSource::Compiled => "compiled",
        }
    }
}

/// How a [`PolicyEngine`] is set up.
#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    /// The root of the on-disk cache of compiled components; `None` keeps
    /// them in memory only. A folder that cannot be used is logged and
    /// ignored, never an error.
    pub cache_dir: Option<PathBuf>,
    /// wasmtime's component-model concurrency support. Off unless asked for:
    /// policies make plain synchronous calls and need none of it, and with it
    /// on each `route` call costs about a fifth more (nova-cells: 2.7 µs
    /// instead of 2.25 µs median; `cellhost policy bench
    /// --concurrency-support` measures it).
    pub concurrency_support: bool,
    /// Writes `/tmp/perf-<pid>.map`, naming the machine code compiled for
    /// each of a policy's functions, so that `perf` (and a callgrind profile,
    /// by address) can tell where a policy's own time goes. For profiling
    /// only: off in a cell.
    pub perf_map: bool,
}

/// Compiles and instantiates policies; one per process is enough.
pub struct PolicyEngine {
    engine: Engine,
    linker: Linker<GuestState>,
    compiled: Mutex<HashMap<String, Component>>,
    disk: Option<DiskCache>,
    options: EngineOptions,
    ticker: Arc<Ticker>,
}

impl PolicyEngine {
    /// An engine with no disk cache and concurrency support off.
    pub fn new() -> Result<Arc<PolicyEngine>> {
        PolicyEngine::with_options(EngineOptions::default())
    }

    /// An engine that keeps compiled components under `dir` between runs.
    pub fn with_cache_dir(dir: impl Into<PathBuf>) -> Result<Arc<PolicyEngine>> {
        PolicyEngine::with_options(EngineOptions {
            cache_dir: Some(dir.into()),
            ..EngineOptions::default()
        })
    }

    /// An engine set up as `options` say. Fails only if wasmtime cannot be
    /// configured; a cache folder that cannot be used only turns the cache off.
    pub fn with_options(options: EngineOptions) -> Result<Arc<PolicyEngine>> {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        config.concurrency_support(options.concurrency_support);
        if options.perf_map {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&config).context("configuring wasmtime")?;
        let disk =
            options
                .cache_dir
                .as_deref()
                .and_then(|root| match DiskCache::open(root, &engine) {
                    Ok(cache) => Some(cache),
                    Err(problem) => {
                        tracing::warn!(%problem, "not caching compiled policies on disk");
                        None
                    }
                });

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).context("linking WASI")?;
        Policy::add_to_linker::<GuestState, HasSelf<GuestState>>(&mut linker, |s| s)
            .context("linking the host interface")?;

        let ticker = Ticker::start(engine.clone())?;

        Ok(Arc::new(PolicyEngine {
            engine,
            linker,
            compiled: Mutex::new(HashMap::new()),
            disk,
            options,
            ticker,
        }))
    }

    /// The folder compiled components are cached in, if the disk cache is on.
    pub fn cache_dir(&self) -> Option<&Path> {
        self.disk.as_ref().map(DiskCache::dir)
    }

    /// Whether wasmtime's component-model concurrency support is on.
    pub fn concurrency_support(&self) -> bool {
        self.options.concurrency_support
    }

    /// Compiles (or reuses) `wasm`, checks it implements the policy world,
    /// and runs `init` once with `config` on a trial instance. `source` names
    /// the policy in logs and errors.
    pub fn load(
        self: &Arc<Self>,
        source: &str,
        wasm: &[u8],
        config: &str,
        limits: Limits,
    ) -> Result<Arc<LoadedPolicy>> {
        let hash = content_hash(wasm);
        let started = Instant::now();
        let (component, compiled_from) = self.compile(source, &hash, wasm)?;
        let compile_time = started.elapsed();
        let pre = self.linker.instantiate_pre(&component).map_err(|e| {
            self.misfit(
                source,
                &component,
                e,
                "imports something the host does not grant",
            )
        })?;
        let pre = PolicyPre::new(pre).map_err(|e| {
            let world = world::package();
            self.misfit(
                source,
                &component,
                e,
                &format!("not a {world} component (its world `policy` exports `init` and `route`)"),
            )
        })?;
        let policy = Arc::new(LoadedPolicy {
            engine: self.clone(),
            source: source.to_string(),
            hash,
            component,
            compiled_from,
            compile_time,
            pre,
            config: config.to_string(),
            limits,
            loaded_at: std::time::SystemTime::now(),
            trial_usage: std::sync::OnceLock::new(),
        });
        let trial = policy
            .instantiate()
            .map_err(|e| e.context(format!("policy {source}: trial instance failed")))?;
        let _ = policy.trial_usage.set(trial.usage());
        Ok(policy)
    }

    /// The error for a component that does not fit the host's world: what
    /// differs, in the author's terms, or else wasmtime's `error` under
    /// `fallback`.
    fn misfit(
        &self,
        source: &str,
        component: &Component,
        error: wasmtime::Error,
        fallback: &str,
    ) -> anyhow::Error {
        match world::differences(&self.engine, component, Some(&error)).as_slice() {
            [] => anyhow::Error::from(error).context(format!("policy {source}: {fallback}")),
            [one] => anyhow::anyhow!("policy {source}: {one}"),
            many => anyhow::anyhow!("policy {source}:\n  {}", many.join("\n  ")),
        }
    }

    /// The compiled component for `wasm`: from memory, else from the disk
    /// cache, else compiled now (and then written to the disk cache).
    fn compile(&self, source: &str, hash: &str, wasm: &[u8]) -> Result<(Component, CompileSource)> {
        if let Some(c) = lock(&self.compiled).get(hash) {
            return Ok((c.clone(), CompileSource::Memory));
        }
        let started = Instant::now();
        let cached = self
            .disk
            .as_ref()
            .and_then(|disk| disk.load(&self.engine, source, hash));
        let (component, compiled_from) = match cached {
            Some(component) => {
                tracing::info!(policy = source, hash = &hash[..12], elapsed = ?started.elapsed(), "policy loaded from the disk cache");
                (component, CompileSource::Disk)
            }
            None => {
                // wasmtime's own error for these is about parsing, not about
                // what the operator handed over.
                if let Some(problem) = header_problem(wasm) {
                    anyhow::bail!("policy {source}: {problem}");
                }
                let component = Component::new(&self.engine, wasm).with_context(|| {
                    format!("policy {source}: not a valid WebAssembly component")
                })?;
                tracing::info!(policy = source, hash = &hash[..12], elapsed = ?started.elapsed(), "policy compiled");
                if let Some(disk) = &self.disk {
                    disk.store(source, hash, &component);
                }
                (component, CompileSource::Compiled)
            }
        };
        lock(&self.compiled).insert(hash.to_string(), component.clone());
        Ok((component, compiled_from))
    }
}

impl Drop for PolicyEngine {
    fn drop(&mut self) {
        self.ticker.stop();
    }
}

/// One validated version of a policy, ready to instantiate.
pub struct LoadedPolicy {
    engine: Arc<PolicyEngine>,
    source: String,
    hash: String,
    component: Component,
    compiled_from: CompileSource,
    compile_time: Duration,
    pre: PolicyPre<GuestState>,
    config: String,
    limits: Limits,
    loaded_at: std::time::SystemTime,
    /// What the trial instance held once `init` returned.
    trial_usage: std::sync::OnceLock<Usage>,
}

impl LoadedPolicy {
    /// When this version was loaded.
    pub fn loaded_at(&self) -> std::time::SystemTime {
        self.loaded_at
    }

    /// Where the policy came from (a path, or "embedded nova-cells").
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Hex SHA-256 of the component's bytes.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// A short label for logs and spans.
    pub fn version(&self) -> &str {
        &self.hash[..12]
    }

    /// The engine this version was compiled by.
    pub fn engine(&self) -> &Arc<PolicyEngine> {
        &self.engine
    }

    /// The memory and table elements an instance holds after `init`, as
    /// measured on the trial instance `load` made.
    pub fn usage_after_init(&self) -> Option<Usage> {
        self.trial_usage.get().copied()
    }

    /// Where the compiled code came from when this version was loaded.
    pub fn compiled_from(&self) -> CompileSource {
        self.compiled_from
    }

    /// How long getting the compiled code took (compiling, or reading the cache).
    pub fn compile_time(&self) -> Duration {
        self.compile_time
    }

    /// The sandbox limits its instances run under.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// What the component imports, by name, with a short description of each.
    pub fn imports(&self) -> Vec<(String, String)> {
        let engine = &self.engine.engine;
        self.component
            .component_type()
            .imports(engine)
            .map(|(name, item)| (name.to_string(), describe_item(engine, &item.ty)))
            .collect()
    }

    /// What the component exports, by name, with a short description of each.
    pub fn exports(&self) -> Vec<(String, String)> {
        let engine = &self.engine.engine;
        self.component
            .component_type()
            .exports(engine)
            .map(|(name, item)| (name.to_string(), describe_item(engine, &item.ty)))
            .collect()
    }

    /// A fresh instance with `init` already called.
    pub fn instantiate(self: &Arc<Self>) -> Result<PolicyInstance> {
        let state = GuestState::new(&self.source, &self.limits)?;
        let mut store = Store::new(&self.engine.engine, state);
        store.limiter(|s| &mut s.budget);
        store.epoch_deadline_callback(|mut store| Ok(store.data_mut().clock.tick()));
        let _running = self.engine.ticker.enter();
        start_call(&mut store, self.limits.init_deadline());
        let bindings = self.pre.instantiate(&mut store).map_err(|e| {
            match budget::explain_count_limit(&e) {
                Some(limit) => e.context(limit),
                None => e,
            }
            .context("instantiating")
        })?;
        match bindings.call_init(&mut store, &self.config) {
            Ok(Ok(())) => {}
            Ok(Err(refusal)) => anyhow::bail!("init refused the configuration: {refusal}"),
            Err(trap) => {
                let reason = describe_trap(&trap, &self.limits, store.data());
                anyhow::bail!("init failed: {reason}")
            }
        }
        // Checks `MessageView` against the policy's own `route` once, so
        // that each call can skip the check (see `PolicyInstance::route`).
        let route = *bindings.func_route().func();
        route
            .typed::<(MessageView<'_>, &Cell), (Result<Vec<Action>, String>,)>(&store)
            .context("the host's view of `route` does not match the policy's")?;
        let renew_above = renewal_mark(store.data().budget.usage().memory_bytes, &self.limits);
        Ok(PolicyInstance {
            store,
            route,
            policy: self.clone(),
            renew_above,
        })
    }
}

/// The memory above which an instance is renewed between calls: halfway from
/// what it held after `init` to its cap. An instance whose memory creeps up
/// (a runtime that keeps a little per call, as componentize-py's does) is
/// then replaced while it still has room, instead of trapping on some later
/// message when it reaches the cap, which would cost that message.
fn renewal_mark(after_init: usize, limits: &Limits) -> usize {
    after_init + limits.memory_bytes.saturating_sub(after_init) / 2
}

/// A live instance of a policy, reused for call after call.
pub struct PolicyInstance {
    store: Store<GuestState>,
    /// The policy's `route` export, checked against [`RouteFunc`].
    route: Func,
    policy: Arc<LoadedPolicy>,
    /// See [`renewal_mark`].
    renew_above: usize,
}

impl PolicyInstance {
    /// The version this instance runs.
    pub fn policy(&self) -> &Arc<LoadedPolicy> {
        &self.policy
    }

    /// The memory and table elements this instance holds now.
    pub fn usage(&self) -> Usage {
        self.store.data().budget.usage()
    }

    /// Whether the instance has grown past its renewal mark: halfway from
    /// what it held after `init` to the memory cap. A caller that keeps
    /// instances drops such a one after the call, as after a trap, but
    /// without losing anything: the call succeeded.
    pub fn worn_out(&self) -> bool {
        self.usage().memory_bytes > self.renew_above
    }

    /// Asks the policy what to do with `message` (a [`MessageView`], or a
    /// `&Message`). After an error for which
    /// [`PolicyError::poisons_instance`] holds, drop this instance.
    pub fn route<'a>(
        &mut self,
        message: impl Into<MessageView<'a>>,
        cell: &Cell,
    ) -> Result<Vec<Action>, PolicyError> {
        let message = message.into();
        let _running = self.policy.engine.ticker.enter();
        start_call(&mut self.store, self.policy.limits.deadline);
        // SAFETY: `route` was checked against these very parameter and
        // result types (lifetimes aside, which the check does not see) when
        // the instance was made, in `LoadedPolicy::instantiate`.
        let route: RouteFunc<'_, '_> = unsafe { TypedFunc::new_unchecked(self.route) };
        let store = &mut self.store;
        let call = std::panic::AssertUnwindSafe(|| {
            route
                .call(&mut *store, (message, cell))
                .map(|(result,)| result)
        });
        // WASI's synchronous host functions that block (a file read, a sleep,
        // a poll) drive tokio with `block_on`, which panics on a runtime
        // worker. A granted folder is read through such calls, so those run
        // where blocking is allowed; anything else that blocks panics, and
        // the panic is this policy's trap, not the host's.
        let outcome = if self.policy.limits.data_dir.is_some() && on_multi_thread_runtime() {
            tokio::task::block_in_place(|| std::panic::catch_unwind(call))
        } else {
            std::panic::catch_unwind(call)
        };
        let result = match outcome {
            Ok(result) => result,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("a host function panicked");
                return Err(PolicyError::Trap(format!(
                    "the policy made a WASI call the host does not serve (it would block): {what}"
                )));
            }
        };
        match result {
            Ok(Ok(actions)) => Ok(actions),
            Ok(Err(refusal)) => Err(PolicyError::Refused(refusal)),
            Err(trap) => {
                if trap.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
                    return Err(PolicyError::Deadline(self.policy.limits.deadline));
                }
                Err(PolicyError::Trap(describe_trap(
                    &trap,
                    &self.policy.limits,
                    self.store.data(),
                )))
            }
        }
    }
}

fn on_multi_thread_runtime() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
}

/// Why `bytes` cannot be a component, when their first bytes already tell.
fn header_problem(bytes: &[u8]) -> Option<&'static str> {
    if Engine::detect_precompiled(bytes).is_some() {
        return Some(
            "this is a precompiled wasmtime artefact (.cwasm), not a component: \
             give the .wasm it was compiled from",
        );
    }
    match bytes {
        // `\0asm`, a 16-bit version, then the layer: 0 for a core module.
        [0, b'a', b's', b'm', _, _, 0, 0, ..] => Some(
            "this is a core WebAssembly module, not a component: build the policy for \
             wasm32-wasip2 with the guest SDK, or wrap the module with `wasm-tools component new`",
        ),
        [0, b'a', b's', b'm', ..] => None,
        _ if looks_like_text(bytes) => None,
        _ => Some(
            "this is not WebAssembly: the file starts with neither the `\\0asm` header \
             nor WebAssembly text",
        ),
    }
}

/// Whether `bytes` could be WebAssembly text (`wasmtime` accepts it too).
fn looks_like_text(bytes: &[u8]) -> bool {
    std::str::from_utf8(bytes).is_ok_and(|text| {
        let text = text.trim_start();
        text.starts_with('(') || text.starts_with(";;")
    })
}

/// A one-line description of an import or export: its kind, and for an
/// instance the names it holds.
fn describe_item(engine: &Engine, item: &ComponentItem) -> String {
    match item {
        ComponentItem::ComponentFunc(f) => format!(
            "function ({} parameters, {} results)",
            f.params().len(),
            f.results().len()
        ),
        ComponentItem::CoreFunc(_) => "core function".to_string(),
        ComponentItem::Module(_) => "core module".to_string(),
        ComponentItem::Component(_) => "component".to_string(),
        ComponentItem::ComponentInstance(instance) => {
            let names: Vec<&str> = instance.exports(engine).map(|(name, _)| name).collect();
            if names.is_empty() {
                "instance".to_string()
            } else {
                format!("instance: {}", names.join(", "))
            }
        }
        ComponentItem::Type(_) => "type".to_string(),
        ComponentItem::Resource(_) => "resource".to_string(),
    }
}

fn describe_trap(trap: &wasmtime::Error, limits: &Limits, state: &GuestState) -> String {
    let mut reason = match trap.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => format!("deadline of {:?} exceeded", limits.deadline),
        Some(Trap::StackOverflow) => "stack overflow".to_string(),
        Some(t) => t.to_string(),
        None => budget::exceeded(trap).unwrap_or_else(|| format!("{trap:#}")),
    };
    if let Some(panic) = state.last_error_log() {
        reason.push_str(": ");
        reason.push_str(&panic);
    } else {
        let stderr = state.stderr.contents();
        let text = String::from_utf8_lossy(&stderr);
        let text = text.trim();
        if !text.is_empty() {
            reason.push_str(": ");
            reason.push_str(&text.chars().take(300).collect::<String>());
        }
    }
    reason
}

/// Starts a call (or `init`) on `store` with `budget` of CPU time: its epoch
/// deadline one tick away, where [`clock::CallClock`] takes over.
fn start_call(store: &mut Store<GuestState>, budget: Duration) {
    store.data_mut().clock.start(budget);
    store.set_epoch_deadline(1);
}

/// What the host keeps per instance.
pub struct GuestState {
    wasi: WasiCtx,
    table: ResourceTable,
    budget: budget::InstanceBudget,
    clock: clock::CallClock,
    source: Arc<str>,
    stderr: MemoryOutputPipe,
    last_error: Option<String>,
}

impl GuestState {
    fn new(source: &str, limits: &Limits) -> Result<GuestState> {
        let stderr = MemoryOutputPipe::new(4096);
        // Deliberately empty: no environment, no arguments, no sockets or
        // name lookups, and no folder but the one the operator granted,
        // read-only (wasmtime-wasi opens it with cap-std: nothing outside it
        // is reachable through it).
        let mut builder = WasiCtxBuilder::new();
        builder
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        if let Some(dir) = &limits.data_dir {
            builder
                .preopened_dir(dir, "/data", wasmtime_wasi::FsPerms::ReadOnly)
                .with_context(|| format!("granting the data folder {}", dir.display()))?;
        }
        let wasi = builder.build();
        Ok(GuestState {
            wasi,
            table: ResourceTable::new(),
            budget: budget::InstanceBudget::new(limits.memory_bytes),
            clock: clock::CallClock::new(),
            source: source.into(),
            stderr,
            last_error: None,
        })
    }

    fn last_error_log(&self) -> Option<String> {
        self.last_error.clone()
    }
}

impl WasiView for GuestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl bindings::types::Host for GuestState {}

impl bindings::host::Host for GuestState {
    fn log(&mut self, level: Level, message: String) {
        let policy = &*self.source;
        match level {
            Level::Trace => tracing::trace!(policy, "{message}"),
            Level::Debug => tracing::debug!(policy, "{message}"),
            Level::Info => tracing::info!(policy, "{message}"),
            Level::Warn => tracing::warn!(policy, "{message}"),
            Level::Error => {
                tracing::error!(policy, "{message}");
                self.last_error = Some(message.chars().take(300).collect());
            }
        }
    }

    fn now_ms(&mut self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// Hex SHA-256 of `bytes`: the identity of a policy version.
pub fn content_hash(bytes: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh, empty folder for one test's cache.
    fn cache_root(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "cellhost-policy-cache-{}-{test}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn load(engine: &Arc<PolicyEngine>) -> Arc<LoadedPolicy> {
        engine
            .load(
                "nova-cells",
                crate::plugins::NOVA_CELLS,
                "",
                Limits::default(),
            )
            .expect("nova-cells loads")
    }

    /// A broadcast calling `method` that starts at a cell with no
    /// neighbours, and that cell.
    fn solo_broadcast(method: &str) -> (Message, Cell) {
        let message = Message {
            uuid: "u".into(),
            message_type: MessageType::Broadcast,
            direction: Direction::Down,
            method_name: method.into(),
            routing_path: "solo".into(),
            hop_count: 1,
            max_hop_count: 10,
            target_cell: None,
            need_response: false,
            fanout: false,
            is_origin: true,
            run_locally: true,
            ctxt: "{}".into(),
            method_kwargs: "{}".into(),
        };
        let cell = Cell {
            name: "solo".into(),
            parents: Vec::new(),
            children: Vec::new(),
        };
        (message, cell)
    }

    /// Proves a policy loaded from any source actually runs.
    fn routes(policy: &Arc<LoadedPolicy>) {
        let (message, cell) = solo_broadcast("m");
        let mut instance = policy.instantiate().expect("instance");
        let actions = instance.route(&message, &cell).expect("routes");
        assert!(matches!(actions.as_slice(), [Action::ProcessHere]));
    }

    /// nova-cells allocates in power-of-two classes that it keeps (see
    /// `cellhost_guest::alloc`): messages of every size up to the body cap,
    /// over and over, leave its instance the same size after the first
    /// round, well under the renewal mark, and every one is routed.
    #[test]
    fn nova_cells_memory_stays_flat_over_messages_of_every_size() {
        let policy = load(&PolicyEngine::new().expect("engine"));
        let mut instance = policy.instantiate().expect("instance");
        let sizes = [
            0,
            10,
            1_000,
            4_000,
            33_000,
            70_000,
            300_000,
            700_000,
            1 << 20,
        ];
        let mut after_first_round = None;
        for round in 0..5 {
            for size in sizes {
                let (mut message, cell) = solo_broadcast("m");
                message.method_kwargs = format!("{{\"k\": \"{}\"}}", "x".repeat(size));
                let actions = instance.route(&message, &cell).expect("routes");
                assert!(matches!(actions.as_slice(), [Action::ProcessHere]));
                assert!(!instance.worn_out(), "round {round}, {size} bytes");
            }
            let held = instance.usage().memory_bytes;
            match after_first_round {
                None => after_first_round = Some(held),
                Some(first) => assert_eq!(held, first, "round {round} grew the instance"),
            }
        }
        let held = after_first_round.expect("five rounds ran");
        assert!(
            held < 8 << 20,
            "{held} bytes held for one message of 1 MiB at a time"
        );
    }

    #[test]
    fn a_fresh_engine_loads_the_compiled_policy_from_disk() {
        let root = cache_root("fresh");
        let first = PolicyEngine::with_cache_dir(&root).expect("engine");
        let policy = load(&first);
        assert_eq!(policy.compiled_from(), CompileSource::Compiled);
        assert_eq!(load(&first).compiled_from(), CompileSource::Memory);
        let file = first
            .disk
            .as_ref()
            .expect("cache is on")
            .path(policy.hash());
        assert!(file.is_file(), "{} written", file.display());

        let second = PolicyEngine::with_cache_dir(&root).expect("engine");
        let again = load(&second);
        assert_eq!(again.compiled_from(), CompileSource::Disk);
        routes(&again);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_damaged_cache_file_is_removed_and_recompiled() {
        let root = cache_root("damaged");
        let engine = PolicyEngine::with_cache_dir(&root).expect("engine");
        let policy = load(&engine);
        let file = engine
            .disk
            .as_ref()
            .expect("cache is on")
            .path(policy.hash());

        // One flipped bit in the machine code, which wasmtime would not notice.
        let mut bytes = std::fs::read(&file).expect("cache file");
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x10;
        std::fs::write(&file, &bytes).expect("damaged");
        let recompiled = load(&PolicyEngine::with_cache_dir(&root).expect("engine"));
        assert_eq!(recompiled.compiled_from(), CompileSource::Compiled);
        routes(&recompiled);

        // Rewritten whole, so the next engine is served from disk again.
        let healed = load(&PolicyEngine::with_cache_dir(&root).expect("engine"));
        assert_eq!(healed.compiled_from(), CompileSource::Disk);

        // A torn write (as after a crash) is no better.
        std::fs::write(&file, &bytes[..100]).expect("truncated");
        let recompiled = load(&PolicyEngine::with_cache_dir(&root).expect("engine"));
        assert_eq!(recompiled.compiled_from(), CompileSource::Compiled);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn engines_configured_differently_never_share_artefacts() {
        let root = cache_root("configs");
        let plain = PolicyEngine::with_cache_dir(&root).expect("engine");
        let concurrent = PolicyEngine::with_options(EngineOptions {
            cache_dir: Some(root.clone()),
            concurrency_support: true,
            ..EngineOptions::default()
        })
        .expect("engine");
        assert_ne!(plain.cache_dir(), concurrent.cache_dir());
        assert_eq!(load(&plain).compiled_from(), CompileSource::Compiled);
        assert_eq!(load(&concurrent).compiled_from(), CompileSource::Compiled);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn an_unusable_cache_folder_only_turns_the_cache_off() {
        let root = cache_root("unusable");
        std::fs::write(&root, b"a file where the folder should be").expect("file");
        let engine = PolicyEngine::with_cache_dir(&root).expect("engine all the same");
        assert!(engine.cache_dir().is_none());
        routes(&load(&engine));
        let _ = std::fs::remove_file(&root);
    }

    /// A hand-written policy that misbehaves on request; see the file.
    const GREEDY: &str = include_str!("../../tests/components/greedy.wat");
    const GREEDY_MAIN_MEMORY: &str = r#"(memory $main (export "memory") 1)"#;

    fn greedy(text: &str) -> Result<Arc<LoadedPolicy>> {
        let limits = Limits {
            deadline: Duration::from_secs(2),
            ..Limits::default()
        };
        PolicyEngine::new()?.load("greedy.wat", text.as_bytes(), "", limits)
    }

    fn message(method: &str) -> Message {
        Message {
            uuid: "u".into(),
            message_type: MessageType::Targeted,
            direction: Direction::Down,
            method_name: method.into(),
            routing_path: "solo".into(),
            hop_count: 1,
            max_hop_count: 10,
            target_cell: Some("solo".into()),
            need_response: false,
            fanout: false,
            is_origin: true,
            run_locally: false,
            ctxt: "{}".into(),
            method_kwargs: "{}".into(),
        }
    }

    fn solo() -> Cell {
        Cell {
            name: "solo".into(),
            parents: Vec::new(),
            children: Vec::new(),
        }
    }

    #[test]
    fn two_memories_that_together_pass_the_cap_fail_to_instantiate() {
        assert!(GREEDY.contains(GREEDY_MAIN_MEMORY));
        let twelve_mib = GREEDY.replace(
            GREEDY_MAIN_MEMORY,
            r#"(memory $main (export "memory") 192)"#,
        );
        let refused = greedy(&twelve_mib)
            .err()
            .expect("24 MiB in two memories is refused");
        let reason = format!("{refused:#}");
        assert!(reason.contains("trial instance failed"), "{reason}");
        assert!(reason.contains("memory limit"), "{reason}");
        assert!(
            reason.contains("24 MiB") && reason.contains("16 MiB"),
            "{reason}"
        );
    }

    #[test]
    fn growing_past_the_cap_in_a_second_memory_traps_and_a_fresh_instance_routes() {
        let policy = greedy(GREEDY).expect("loads: 12 MiB and one page");
        let after_init = policy.usage_after_init().expect("measured");
        assert!(after_init.memory_bytes >= 12 << 20, "{after_init:?}");

        let mut instance = policy.instantiate().expect("instance");
        let failed = instance
            .route(&message("grow-memory"), &solo())
            .expect_err("contained");
        assert!(failed.poisons_instance());
        let PolicyError::Trap(reason) = failed else {
            panic!("a trap, not {failed:?}")
        };
        assert!(reason.starts_with("memory limit"), "{reason}");

        let mut fresh = policy.instantiate().expect("instance");
        let actions = fresh.route(&message("after"), &solo()).expect("routes");
        assert!(matches!(actions.as_slice(), [Action::ProcessHere]));
    }

    #[test]
    fn a_table_grown_without_end_traps_at_the_element_limit() {
        let policy = greedy(GREEDY).expect("loads");
        let mut instance = policy.instantiate().expect("instance");
        let failed = instance
            .route(&message("grow-table"), &solo())
            .expect_err("contained");
        let PolicyError::Trap(reason) = failed else {
            panic!("a trap, not {failed:?}")
        };
        assert!(reason.starts_with("table limit"), "{reason}");
        assert!(
            reason.contains(&budget::MAX_TABLE_ELEMENTS.to_string()),
            "{reason}"
        );
    }

    #[test]
    fn too_many_memories_are_refused_by_count() {
        // Empty memories cost nothing in bytes; only the count stops them.
        let spares: String = (0..budget::MAX_MEMORIES)
            .map(|i| {
                format!(
                    "(core module $spare{i} (memory 0)) (core instance (instantiate $spare{i}))\n"
                )
            })
            .collect();
        let crowded = GREEDY.replacen(
            "  (core module $ballast",
            &format!("{spares}  (core module $ballast"),
            1,
        );
        let refused = greedy(&crowded).err().expect("refused");
        let reason = format!("{refused:#}");
        assert!(
            reason.contains(&format!("at most {} linear memories", budget::MAX_MEMORIES)),
            "{reason}"
        );
    }

    /// The adversary policy (`plugins/adversary`) on `engine`, default limits.
    fn adversary(engine: &Arc<PolicyEngine>) -> Arc<LoadedPolicy> {
        let wasm = std::fs::read(crate::plugins::built_path("adversary")).expect("built");
        engine
            .load("adversary", &wasm, "", Limits::default())
            .expect("loads")
    }

    /// A policy whose memory creeps up a MiB per call: kept, it traps at
    /// its cap and costs that call; renewed at its mark, as the router
    /// renews it, no call fails.
    #[test]
    fn an_instance_whose_memory_creeps_up_is_renewed_before_its_cap() {
        let engine = PolicyEngine::new().expect("engine");
        let policy = adversary(&engine);
        let (message, cell) = solo_broadcast("leak");
        let calls = 40;

        let mut kept = policy.instantiate().expect("instance");
        let first_failure = (1..=calls).find(|_| kept.route(&message, &cell).is_err());
        assert!(
            first_failure.is_some_and(|n| n < 20),
            "a kept instance reaches its 16 MiB cap within 20 calls: {first_failure:?}"
        );

        let mut instance = policy.instantiate().expect("instance");
        let mut renewals = 0;
        for call in 1..=calls {
            let result = instance.route(&message, &cell);
            assert!(result.is_ok(), "call {call} failed: {result:?}");
            if instance.worn_out() {
                renewals += 1;
                instance = policy.instantiate().expect("a fresh instance");
            }
        }
        assert!(renewals >= 4, "renewed {renewals} times in {calls} calls");
    }

    /// The epoch ticker parks on an idle engine; a policy that then loops
    /// forever must still be stopped at its deadline.
    #[test]
    fn a_spinning_policy_is_stopped_after_the_engine_was_idle() {
        let engine = PolicyEngine::new().expect("engine");
        let policy = adversary(&engine);
        let mut instance = policy.instantiate().expect("instance");
        let (message, cell) = solo_broadcast("spin");
        for round in 0..3 {
            let until = Instant::now() + Duration::from_secs(10);
            while !engine.ticker.is_parked() {
                assert!(Instant::now() < until, "the ticker never parked");
                std::thread::sleep(Duration::from_millis(5));
            }
            let result = instance.route(&message, &cell);
            assert!(
                matches!(result, Err(PolicyError::Deadline(_))),
                "round {round}: {result:?}"
            );
            instance = policy.instantiate().expect("a fresh instance");
        }
    }

    #[test]
    fn real_policies_stay_well_within_the_budget() {
        let engine = PolicyEngine::new().expect("engine");
        for (name, wasm) in [
            ("nova-cells", crate::plugins::NOVA_CELLS),
            (
                "adversary",
                &std::fs::read(crate::plugins::built_path("adversary")).expect("built")[..],
            ),
        ] {
            let policy = engine
                .load(name, wasm, "", Limits::default())
                .expect("loads");
            let used = policy.usage_after_init().expect("measured");
            eprintln!("{name}: {used:?}");
            assert!(
                used.memory_bytes <= Limits::default().memory_bytes / 4,
                "{name}: {used:?}"
            );
            assert!(
                used.table_elements <= budget::MAX_TABLE_ELEMENTS / 100,
                "{name}: {used:?}"
            );
        }
    }

    #[test]
    fn files_that_are_no_component_say_what_they_are() {
        let core = wasmtime::Engine::default()
            .precompile_module(b"(module)")
            .expect("precompiled");
        assert!(header_problem(&core).is_some_and(|p| p.contains("precompiled")));
        assert!(header_problem(b"\0asm\x01\0\0\0").is_some_and(|p| p.contains("core")));
        assert!(header_problem(b"hello").is_some_and(|p| p.contains("not WebAssembly")));
        assert!(header_problem(b"  ;; text\n(component)").is_none());
        assert!(header_problem(crate::plugins::NOVA_CELLS).is_none());
    }
}
