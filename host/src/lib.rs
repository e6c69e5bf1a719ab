//! cellhost: a WebAssembly-pluggable message host for hierarchical cells.
//!
//! One message takes one road through these modules:
//!
//! ```text
//! broker --(transport: amqp | memory)--> wire codec --> router --> policy (Wasm) --> actions
//!       <--(transport publish, confirmed)------------ router <-------------------------'
//!                    then the source is acked
//! ```
//!
//! - [`transport`]: brokers, queues, confirms, acks; nothing of cells.
//! - [`wire`]: the oslo envelope and the cells message JSON; nothing of AMQP.
//! - [`policy`]: wasmtime and the `cellhost:policy` world; nothing of brokers.
//! - [`router`]: cells semantics and the host's invariants.
//! - [`links`]: the own and the neighbours' brokers; parking relays for a
//!   neighbour that cannot take them, and draining them when it can.
//! - [`responses`]: waiting for answers and sending them on.
//! - [`reload`]: swapping a cell's policy while it runs; [`file_watch`]:
//!   noticing that a file it reads (policy, neighbours) changed.
//! - [`admin`]: health, policy state, reload requests and metrics over HTTP.
//! - [`host`]: one running cell, wiring the above together.
//! - [`client`]: what an application does to send into the network.
//! - [`config`], [`demo`], [`plugins`]: configuration, the in-memory demo,
//!   and the policies built with this crate.
//! - [`policy_tools`]: `cellhost policy check | test | bench`, a policy on
//!   the bench with no broker.
//! - [`sched`]: the scheduling class the binary puts its threads in.

pub mod admin;
pub mod client;
pub mod config;
pub mod demo;
pub mod file_watch;
pub mod host;
pub mod lanes;
pub mod links;
pub mod neighbours;
pub mod plugins;
pub mod policy;
pub mod policy_tools;
pub mod reload;
pub mod responses;
pub mod router;
pub mod sched;
pub mod topology;
pub mod transport;
pub mod wire;

/// The allocator cellhost's binaries install (`#[global_allocator]`): the
/// relay allocates a few buffers per message on several threads, which
/// mimalloc serves with less work than the system allocator.
///
/// The `mimalloc` crate's own allocator asks for every block by its
/// alignment (`mi_malloc_aligned`), which takes a longer road than
/// `mi_malloc` for blocks over 1 KiB; a block whose alignment `mi_malloc`
/// gives every block (a word) is asked for plainly here, and only larger
/// alignments go the aligned road.
pub struct Allocator;

/// The alignment every `mi_malloc` block has: mimalloc's size classes are
/// whole words, laid out from aligned pages. (Blocks of 24 or 40 bytes, say,
/// are not 16-byte aligned.)
const PLAIN_ALIGN: usize = std::mem::size_of::<usize>();

impl Allocator {
    fn plain(layout: std::alloc::Layout) -> bool {
        layout.align() <= PLAIN_ALIGN
    }
}

// SAFETY: every block comes from mimalloc with at least the alignment its
// layout asks (see `PLAIN_ALIGN`) and goes back to it through `mi_free` or
// a realloc of the same road, which accept blocks from either.
unsafe impl std::alloc::GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if Self::plain(layout) {
            libmimalloc_sys::mi_malloc(layout.size()).cast()
        } else {
            libmimalloc_sys::mi_malloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        if Self::plain(layout) {
            libmimalloc_sys::mi_zalloc(layout.size()).cast()
        } else {
            libmimalloc_sys::mi_zalloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: std::alloc::Layout) {
        libmimalloc_sys::mi_free(ptr.cast());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        if Self::plain(layout) {
            libmimalloc_sys::mi_realloc(ptr.cast(), new_size).cast()
        } else {
            libmimalloc_sys::mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
        }
    }
}

pub use config::Config;
pub use host::CellHost;

/// Locks `m`. No code here panics while holding one of the host's locks,
/// so a poisoned lock still guards consistent data: recover it.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A fresh oslo `_unique_id` (also used for reply queues and call ids): a
/// uuid4 in hex, as oslo.messaging makes them.
pub fn new_unique_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

#[cfg(test)]
mod tests {
    use std::alloc::{GlobalAlloc, Layout};

    use super::Allocator;

    /// Every block has the alignment its layout asks, on either road, and
    /// keeps it and its contents through a realloc.
    #[test]
    fn blocks_have_the_alignment_asked_for() {
        let sizes = [1, 7, 8, 24, 40, 1000, 1025, 4096, 70_000];
        for align in [1, 2, 4, 8, 16, 32, 64, 4096] {
            for size in sizes {
                let layout = Layout::from_size_align(size, align).expect("layout");
                // SAFETY: a non-zero layout; each block is freed once, with
                // the layout it has then.
                unsafe {
                    for zeroed in [false, true] {
                        let block = if zeroed {
                            Allocator.alloc_zeroed(layout)
                        } else {
                            Allocator.alloc(layout)
                        };
                        assert!(!block.is_null());
                        assert_eq!(block as usize % align, 0, "{size} bytes at {align}");
                        if zeroed {
                            assert!((0..size).all(|i| *block.add(i) == 0));
                        }
                        block.write_bytes(0xa5, size);
                        let grown = Allocator.realloc(block, layout, size * 3);
                        assert_eq!(grown as usize % align, 0, "{size} bytes grown at {align}");
                        assert!((0..size).all(|i| *grown.add(i) == 0xa5));
                        Allocator.dealloc(
                            grown,
                            Layout::from_size_align(size * 3, align).expect("layout"),
                        );
                    }
                }
            }
        }
    }
}
