//! The SDK for cellhost routing policies: the Rust face of `wit/policy.wit`.
//!
//! This crate owns everything a policy author needs besides the routing
//! decision itself: the WIT bindings (generated here, once, so that plugin
//! crates need not depend on `wit-bindgen`), friendly names for the WIT types,
//! the [`Policy`] trait, the [`export_policy!`] macro that turns a `Policy`
//! into the component's exports, logging and the clock granted by the host,
//! helpers for Nova's `!`-separated cell paths, and an allocator made for the
//! way the host hands a policy its calls ([`alloc`]).
//!
//! # A whole policy
//!
//! A policy is a `cdylib` crate built for `wasm32-wasip2`:
//!
//! ```
//! use cellhost_guest::{log, Action, Cell, Direction, Message, Policy};
//!
//! /// Sends every message one step further in its direction, or handles it
//! /// here at the edge of the tree.
//! struct Flood;
//!
//! impl Policy for Flood {
//!     fn init(_config: &str) -> Result<Self, String> {
//!         log::info("flood policy ready");
//!         Ok(Flood)
//!     }
//!
//!     fn route(&self, message: &Message, cell: &Cell) -> Result<Vec<Action>, String> {
//!         let next = cell.neighbours(message.direction);
//!         if next.is_empty() || message.hop_count >= message.max_hop_count {
//!             return Ok(vec![Action::ProcessHere]);
//!         }
//!         Ok(next.iter().map(|n| Action::Relay(n.name.clone())).collect())
//!     }
//! }
//!
//! cellhost_guest::export_policy!(Flood);
//! # let cell = Cell { name: "api".into(), parents: vec![], children: vec![] };
//! # let message = Message {
//! #     uuid: "u".into(), message_type: cellhost_guest::MessageType::Broadcast,
//! #     direction: Direction::Down, method_name: "m".into(), routing_path: "api".into(),
//! #     hop_count: 1, max_hop_count: 10, target_cell: None, need_response: false,
//! #     fanout: false, is_origin: true, run_locally: false, ctxt: "{}".into(),
//! #     method_kwargs: "{}".into(),
//! # };
//! # let flood = Flood::init("").map_err(|e| e.to_string())?;
//! # assert!(matches!(flood.route(&message, &cell).as_deref(), Ok([Action::ProcessHere])));
//! # Ok::<(), String>(())
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2`; the `.wasm`
//! file cargo writes is already a component the host can load.

pub mod alloc;
mod builders;
#[cfg(all(feature = "harness", not(target_arch = "wasm32")))]
pub mod harness;
pub mod log;
mod path;
#[doc(hidden)]
pub mod rt;

pub use builders::{Tree, DEFAULT_MAX_HOP_COUNT};
pub use path::{path_parts, PATH_SEPARATOR};
/// JSON values for [`Message::ctxt`] and [`Message::kwargs`] in tests.
pub use serde_json::{json, Value};

/// The generated bindings of world `policy`.
///
/// Public because the code that [`export_policy!`] expands to in a plugin
/// crate refers to it; policy authors use the re-exports at the crate root.
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "policy",
        path: "wit",
        // The export macro is expanded in plugin crates, which reach the
        // bindings through this crate rather than generating their own.
        pub_export_macro: true,
        default_bindings_module: "cellhost_guest::bindings",
        // So that tests can compare decisions with `assert_eq!`.
        additional_derives: [PartialEq],
    });
}

pub use bindings::cellhost::policy::types::{
    Action, Cell, Direction, Failure, Message, MessageType, Neighbour,
};

/// A routing policy: the decision of what a cell does with each message.
///
/// One value lives for the whole life of the component instance. The host
/// calls [`Policy::init`] once, then [`Policy::route`] for every message the
/// cell receives, one at a time.
pub trait Policy: Sized + 'static {
    /// Builds the policy from the operator's `[policy] config` string.
    ///
    /// An error refuses the policy: the host does not start routing with it.
    fn init(config: &str) -> Result<Self, String>;

    /// Decides what to do with one message.
    ///
    /// The host has already appended this cell to `message.routing_path` and
    /// counted the hop in `message.hop_count`. An `Err` is a fault of the
    /// policy, not of the message; to refuse a message, return
    /// [`Action::ReplyError`] instead.
    fn route(&self, message: &Message, cell: &Cell) -> Result<Vec<Action>, String>;
}

/// Exports a [`Policy`] implementation as the component's `init` and `route`.
///
/// Invoke it once, at item level, in the policy's `cdylib` crate:
///
/// ```
/// # use cellhost_guest::{Action, Cell, Message, Policy};
/// # struct MyPolicy;
/// # impl Policy for MyPolicy {
/// #     fn init(_: &str) -> Result<Self, String> { Ok(MyPolicy) }
/// #     fn route(&self, _: &Message, _: &Cell) -> Result<Vec<Action>, String> { Ok(vec![]) }
/// # }
/// cellhost_guest::export_policy!(MyPolicy);
/// ```
///
/// `init` builds the policy and keeps it for later calls, and installs a panic
/// hook that sends the panic message to the host log before the instance
/// traps. `route` before a successful `init` returns an error rather than
/// trapping. The exports exist only when compiling for `wasm32`; natively the
/// macro just checks that the type is a `Policy`, so the crate's unit tests
/// link without stray `init` and `route` symbols.
#[macro_export]
macro_rules! export_policy {
    ($policy:ty) => {
        const _: () = {
            $crate::rt::assert_policy::<$policy>();

            // The generated export macro takes an identifier, not a type.
            #[cfg(target_arch = "wasm32")]
            type CellhostGuestExport = $crate::rt::Exporter<$policy>;
            #[cfg(target_arch = "wasm32")]
    $crate::bindings::export!(CellhostGuestExport with_types_in $crate::bindings);
        };
    };
}

/// Makes the SDK's allocator ([`alloc::Allocator`]) the crate's global
/// allocator and the component's `cabi_realloc`, the function the host calls
/// to place each string and list of a call in the policy's memory.
///
/// Rust's standard library already exports a `cabi_realloc` for
/// `wasm32-wasip2`, but it reaches the global allocator through the
/// allocator's shims, three calls deep, for each of the dozen strings and
/// lists of every call; this one takes the block from the heap in place.
/// Write it once, at the root of a policy crate; it expands to nothing
/// outside WebAssembly, so the crate's native tests keep the system
/// allocator.
///
/// ```
/// cellhost_guest::global_allocator!();
/// ```
#[macro_export]
macro_rules! global_allocator {
    () => {
        #[cfg(all(target_arch = "wasm32", not(target_feature = "atomics")))]
        #[global_allocator]
        static CELLHOST_GUEST_ALLOCATOR: $crate::alloc::Allocator = $crate::alloc::Allocator::new();

        /// The canonical ABI's allocation function, on the global allocator.
        ///
        /// # Safety
        /// Called by the host as the canonical ABI defines.
        #[cfg(all(target_arch = "wasm32", not(target_feature = "atomics")))]
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn cabi_realloc(
            block: *mut u8,
            old_size: usize,
            align: usize,
            new_size: usize,
        ) -> *mut u8 {
            // SAFETY: the host keeps the canonical ABI's promises, and the
            // static above is the global allocator.
            unsafe { CELLHOST_GUEST_ALLOCATOR.cabi_realloc(block, old_size, align, new_size) }
        }
    };
}

/// Wall-clock time in milliseconds since the Unix epoch, from the host.
///
/// Outside WebAssembly (in native unit tests) it reads the system clock.
pub fn now_ms() -> u64 {
    #[cfg(target_arch = "wasm32")]
    {
        bindings::cellhost::policy::host::now_ms()
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            // A clock before 1970 is a broken host, not worth a panic.
            .map_or(0, |since| {
                u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn now_ms_is_after_2020() {
        assert!(now_ms() > 1_577_836_800_000);
    }
}
