//! The policy runtime: compiling policy components, checking they implement the
//! `cellhost:policy` world, and calling them in a sandbox.
//!
//! It owns wasmtime. A [`PolicyEngine`] compiles components (once per content
//! hash), a [`LoadedPolicy`] is one validated version, and a [`PolicyInstance`]
//! is one live instance of it that a consumer reuses call after call. Every
//! call runs under a wall-clock deadline (epoch interruption) and a memory cap.
//! An instance that traps or times out is unusable; the caller drops it and
//! takes a fresh one. Policies see no files, sockets, environment or arguments:
//! the WASI context they get grants nothing but a clock and randomness.
//!
//! It knows nothing of brokers or of the wire format.

mod bindings;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::error::Context as _;
use wasmtime::{Engine, Store, StoreLimits, StoreLimitsBuilder, Trap};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

pub use bindings::types::{Action, Cell, Direction, Failure, Message, MessageType, Neighbour};
use bindings::{host::Level, Policy, PolicyPre};

/// One epoch tick; deadlines are counted in ticks.
const TICK: Duration = Duration::from_millis(1);

/// Sandbox limits of one policy's instances.
#[derive(Debug, Clone)]
pub struct Limits {
    pub deadline: Duration,
    pub memory_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            deadline: Duration::from_millis(5),
            memory_bytes: 16 << 20,
        }
    }
}

impl Limits {
    fn call_ticks(&self) -> u64 {
        // One more tick than asked: the first tick may come at once.
        (self.deadline.as_millis() as u64).max(1) + 1
    }

    /// `init` may set up tables; it gets more time than one routing call.
    fn init_ticks(&self) -> u64 {
        (self.call_ticks() * 20).max(200)
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

/// Compiles and instantiates policies; one per process is enough.
pub struct PolicyEngine {
    engine: Engine,
    linker: Linker<GuestState>,
    compiled: Mutex<HashMap<String, Component>>,
    ticker_stop: Arc<AtomicBool>,
}

impl PolicyEngine {
    pub fn new() -> Result<Arc<PolicyEngine>> {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        // Policies are plain synchronous calls. The component-model
        // concurrency machinery costs each such call several times over
        // (see `cellhost policy bench`), and nothing here needs it.
        config.concurrency_support(false);
        let engine = Engine::new(&config).context("configuring wasmtime")?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).context("linking WASI")?;
        Policy::add_to_linker::<GuestState, HasSelf<GuestState>>(&mut linker, |s| s)
            .context("linking the host interface")?;

        let ticker_stop = Arc::new(AtomicBool::new(false));
        let ticking = engine.clone();
        let stop = ticker_stop.clone();
        std::thread::Builder::new()
            .name("policy-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(TICK);
                    ticking.increment_epoch();
                }
            })
            .context("starting the epoch ticker")?;

        Ok(Arc::new(PolicyEngine {
            engine,
            linker,
            compiled: Mutex::new(HashMap::new()),
            ticker_stop,
        }))
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
        let component = self.compile(source, &hash, wasm)?;
        let pre = self.linker.instantiate_pre(&component).with_context(|| {
            format!("policy {source}: imports something the host does not grant")
        })?;
        let pre = PolicyPre::new(pre)
            .with_context(|| format!("policy {source}: not a cellhost:policy component"))?;
        let policy = Arc::new(LoadedPolicy {
            engine: self.clone(),
            source: source.to_string(),
            hash,
            pre,
            config: config.to_string(),
            limits,
        });
        policy
            .instantiate()
            .map_err(|e| e.context(format!("policy {source}: trial instance failed")))?;
        Ok(policy)
    }

    fn compile(&self, source: &str, hash: &str, wasm: &[u8]) -> Result<Component> {
        if let Some(c) = lock(&self.compiled).get(hash) {
            return Ok(c.clone());
        }
        let started = std::time::Instant::now();
        let component = Component::new(&self.engine, wasm)
            .with_context(|| format!("policy {source}: not a valid WebAssembly component"))?;
        tracing::info!(policy = source, hash = &hash[..12], elapsed = ?started.elapsed(), "policy compiled");
        lock(&self.compiled).insert(hash.to_string(), component.clone());
        Ok(component)
    }
}

impl Drop for PolicyEngine {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

/// One validated version of a policy, ready to instantiate.
pub struct LoadedPolicy {
    engine: Arc<PolicyEngine>,
    source: String,
    hash: String,
    pre: PolicyPre<GuestState>,
    config: String,
    limits: Limits,
}

impl LoadedPolicy {
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

    /// A fresh instance with `init` already called.
    pub fn instantiate(self: &Arc<Self>) -> Result<PolicyInstance> {
        let state = GuestState::new(&self.source, &self.limits);
        let mut store = Store::new(&self.engine.engine, state);
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(self.limits.init_ticks());
        let bindings = self.pre.instantiate(&mut store).context("instantiating")?;
        match bindings.call_init(&mut store, &self.config) {
            Ok(Ok(())) => {}
            Ok(Err(refusal)) => anyhow::bail!("init refused the configuration: {refusal}"),
            Err(trap) => {
                let reason = describe_trap(&trap, &self.limits, store.data());
                anyhow::bail!("init failed: {reason}")
            }
        }
        Ok(PolicyInstance {
            store,
            bindings,
            policy: self.clone(),
        })
    }
}

/// A live instance of a policy, reused for call after call.
pub struct PolicyInstance {
    store: Store<GuestState>,
    bindings: Policy,
    policy: Arc<LoadedPolicy>,
}

impl PolicyInstance {
    /// The version this instance runs.
    pub fn policy(&self) -> &Arc<LoadedPolicy> {
        &self.policy
    }

    /// Asks the policy what to do with `message`. After an error for which
    /// [`PolicyError::poisons_instance`] holds, drop this instance.
    pub fn route(&mut self, message: &Message, cell: &Cell) -> Result<Vec<Action>, PolicyError> {
        self.store
            .set_epoch_deadline(self.policy.limits.call_ticks());
        match self.bindings.call_route(&mut self.store, message, cell) {
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

fn describe_trap(trap: &wasmtime::Error, limits: &Limits, state: &GuestState) -> String {
    let mut reason = match trap.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => format!("deadline of {:?} exceeded", limits.deadline),
        Some(Trap::StackOverflow) => "stack overflow".to_string(),
        Some(t) => t.to_string(),
        None => format!("{trap:#}"),
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

/// What the host keeps per instance.
pub struct GuestState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    source: Arc<str>,
    stderr: MemoryOutputPipe,
    last_error: Option<String>,
}

impl GuestState {
    fn new(source: &str, limits: &Limits) -> GuestState {
        let stderr = MemoryOutputPipe::new(4096);
        // Deliberately empty: no preopened directories, no environment, no
        // arguments, no sockets or name lookups.
        let wasi = WasiCtxBuilder::new()
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        GuestState {
            wasi,
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new()
                .memory_size(limits.memory_bytes)
                .trap_on_grow_failure(true)
                .build(),
            source: source.into(),
            stderr,
            last_error: None,
        }
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
