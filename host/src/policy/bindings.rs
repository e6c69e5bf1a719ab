//! Host-side bindings of the `cellhost:policy` world, generated from `wit/`.
//! The one place the WIT is turned into Rust on the host.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "policy",
});

pub use cellhost::policy::{host, types};
