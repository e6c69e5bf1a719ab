//! A memory allocator made for policies: blocks in power-of-two size
//! classes, each class a free list, fresh memory carved off the end of the
//! linear memory.
//!
//! The host hands a policy every string and list of a call in memory the
//! guest allocates (the canonical ABI calls `cabi_realloc` once per string
//! and list: a dozen and more per message), and the call frees them all again
//! before the next one comes. The general-purpose allocators (wasm32-wasip2's
//! dlmalloc, talc, TLSF) search bins and merge neighbours on every call; here
//! a block of the size just freed is what the next call asks for, so taking
//! it from the head of its class's list is all the work there is:
//!
//! - `alloc` rounds the size (and the alignment, whichever is larger) up to a
//!   power of two of at least 16 bytes and pops that class's list; when it is
//!   empty, it carves a block of the class off the free end, aligned to its
//!   own size up to a page (64 KiB), and files the gap that alignment leaves
//!   as smaller blocks; alignments above a page are refused (null);
//! - `dealloc` pushes the block on its class's list;
//! - `realloc` within the same class returns the block as it is.
//!
//! What it spends for that speed is memory: a block is up to twice the size
//! asked for, and freed blocks stay in their class (they are not merged into
//! larger ones). A policy whose memory grows past the host's renewal mark is
//! replaced by a fresh instance, so that waste cannot build up without bound.
//!
//! Use it in a policy's crate with (the allocator exists for wasm32 only; the
//! `cfg` lets the crate's native tests build too)
//!
//! ```
//! #[cfg(all(target_arch = "wasm32", not(target_feature = "atomics")))]
//! #[global_allocator]
//! static ALLOCATOR: cellhost_guest::alloc::Allocator = cellhost_guest::alloc::Allocator::new();
//! ```
//!
//! The [`Heap`] itself does not know where its memory comes from (a
//! [`Source`]), so the same code runs under the tests on the build machine.

use core::alloc::Layout;
use core::ptr;

/// The smallest block, as a power of two: 16 bytes holds the free list's
/// link on any target and meets every alignment Rust asks for by default.
const MIN_SHIFT: u32 = 4;

/// One list per power of two a block can be, up to the address space.
const CLASSES: usize = usize::BITS as usize;

/// WebAssembly's page: the unit a linear memory grows by.
pub const PAGE: usize = 1 << 16;

/// Where a [`Heap`] gets fresh memory from.
pub trait Source {
    /// Adds `pages` pages of [`PAGE`] bytes and returns the address of the
    /// first, which is a multiple of [`PAGE`]; `None` when there is no more.
    fn grow(&mut self, pages: usize) -> Option<usize>;
}

/// Size-class free lists over memory from `S`. See the module docs.
pub struct Heap<S> {
    source: S,
    /// The first free block of each class; each block holds the next.
    free: [*mut u8; CLASSES],
    /// The free end: `[next, end)` has never been handed out.
    next: usize,
    end: usize,
}

impl<S: Source> Heap<S> {
    /// An empty heap that takes its memory from `source` when first used.
    pub const fn new(source: S) -> Heap<S> {
        Heap {
            source,
            free: [ptr::null_mut(); CLASSES],
            next: 0,
            end: 0,
        }
    }

    /// A block for `layout`, or null when the source has no more memory.
    ///
    /// # Safety
    /// As [`core::alloc::GlobalAlloc::alloc`].
    #[inline(always)]
    pub unsafe fn alloc(&mut self, layout: Layout) -> *mut u8 {
        let Some(class) = class_of(layout) else {
            return ptr::null_mut();
        };
        let head = self.free[class];
        if !head.is_null() {
            // SAFETY: a listed block is free, at least 16 bytes and aligned
            // as its class is, and its first word holds the next one.
            self.free[class] = unsafe { head.cast::<*mut u8>().read() };
            return head;
        }
        self.carve(class)
    }

    /// Gives back a block [`Heap::alloc`] returned for `layout`.
    ///
    /// # Safety
    /// As [`core::alloc::GlobalAlloc::dealloc`].
    #[inline(always)]
    pub unsafe fn dealloc(&mut self, block: *mut u8, layout: Layout) {
        if let Some(class) = class_of(layout) {
            // SAFETY: the caller gives back a block of this class, which is
            // aligned and large enough for the link.
            unsafe { self.push(block, class) };
        }
    }

    /// `block`, resized to `new_size`: the same block when that stays in its
    /// class, otherwise a new one with the contents copied.
    ///
    /// # Safety
    /// As [`core::alloc::GlobalAlloc::realloc`].
    pub unsafe fn realloc(&mut self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let Ok(new_layout) = Layout::from_size_align(new_size, layout.align()) else {
            return ptr::null_mut();
        };
        if class_of(layout) == class_of(new_layout) {
            return block;
        }
        // SAFETY: the caller's promises about `block` and `layout` hold.
        unsafe {
            let moved = self.alloc(new_layout);
            if !moved.is_null() {
                ptr::copy_nonoverlapping(block, moved, layout.size().min(new_size));
                self.dealloc(block, layout);
            }
            moved
        }
    }

    /// The canonical ABI's `cabi_realloc` on this heap: a new block of
    /// `new_size` bytes aligned to `align` when `old_size` is 0 (none at all,
    /// only a well-aligned address, when `new_size` is 0 too), otherwise
    /// `block` resized as [`Heap::realloc`] does. Null when there is no
    /// memory left or the alignment is not a power of two.
    ///
    /// # Safety
    /// `old_size` is 0, or `block` is a block this heap gave for `old_size`
    /// bytes aligned to `align`.
    #[inline(always)]
    pub unsafe fn cabi_realloc(
        &mut self,
        block: *mut u8,
        old_size: usize,
        align: usize,
        new_size: usize,
    ) -> *mut u8 {
        if old_size == 0 {
            if new_size == 0 {
                return align as *mut u8;
            }
            return match Layout::from_size_align(new_size, align) {
                // SAFETY: a fresh block has no promises to keep.
                Ok(layout) => unsafe { self.alloc(layout) },
                Err(_) => ptr::null_mut(),
            };
        }
        match Layout::from_size_align(old_size, align) {
            // SAFETY: as the caller promises about `block`.
            Ok(layout) => unsafe { self.realloc(block, layout, new_size) },
            Err(_) => ptr::null_mut(),
        }
    }

    /// A fresh block of `class` from the free end, which grows when short.
    /// A block is aligned to its size up to a page, to a page above that.
    #[cold]
    #[inline(never)]
    fn carve(&mut self, class: usize) -> *mut u8 {
        let size = 1usize << class;
        loop {
            let fits = self
                .next
                .checked_next_multiple_of(size.min(PAGE))
                .and_then(|start| Some((start, start.checked_add(size)?)))
                .filter(|&(_, after)| after <= self.end);
            if let Some((start, after)) = fits {
                // The bytes alignment skips become smaller free blocks.
                self.file_range(self.next, start);
                self.next = after;
                return start as *mut u8;
            }
            // The new pages follow the end (the block then starts at the end
            // at the latest) or start elsewhere (the block starts there):
            // either way the block's size in pages is enough.
            let pages = size.div_ceil(PAGE);
            let Some(base) = self.source.grow(pages) else {
                return ptr::null_mut();
            };
            if base != self.end {
                // Someone else grew the memory in between: what was left of
                // the old end is filed, the new pages are the free end.
                self.file_range(self.next, self.end);
                self.next = base;
            }
            self.end = base + pages * PAGE;
        }
    }

    /// Files `[from, to)`, both multiples of 16, as the largest naturally
    /// aligned blocks that tile it.
    fn file_range(&mut self, mut from: usize, to: usize) {
        while from < to {
            let fits = usize::BITS - 1 - (to - from).leading_zeros();
            let class = from.trailing_zeros().min(fits) as usize;
            // SAFETY: the range was never handed out; the block is aligned
            // to its size, which is at least 16.
            unsafe { self.push(from as *mut u8, class) };
            from += 1 << class;
        }
    }

    /// # Safety
    /// `block` is free, of `class`, and aligned as its class is.
    #[inline(always)]
    unsafe fn push(&mut self, block: *mut u8, class: usize) {
        // SAFETY: as the caller promises.
        unsafe { block.cast::<*mut u8>().write(self.free[class]) };
        self.free[class] = block;
    }
}

/// The class of blocks that serve `layout`: the power of two at or above its
/// size and its alignment, at least 16 bytes; `None` past the address space
/// or for an alignment above a page, which this heap does not serve.
#[inline(always)]
fn class_of(layout: Layout) -> Option<usize> {
    if layout.align() > PAGE {
        return None;
    }
    let size = layout.size().max(layout.align()).max(1 << MIN_SHIFT);
    let class = usize::BITS - (size - 1).leading_zeros();
    (class < usize::BITS).then_some(class as usize)
}

#[cfg(all(target_arch = "wasm32", not(target_feature = "atomics")))]
pub use global::{Allocator, LinearMemory};

#[cfg(all(target_arch = "wasm32", not(target_feature = "atomics")))]
mod global {
    use super::{Heap, Source, PAGE};
    use core::alloc::{GlobalAlloc, Layout};
    use core::cell::UnsafeCell;

    /// The component's linear memory, grown with `memory.grow`.
    pub struct LinearMemory;

    impl Source for LinearMemory {
        fn grow(&mut self, pages: usize) -> Option<usize> {
            let old = core::arch::wasm32::memory_grow(0, pages);
            (old != usize::MAX).then(|| old * PAGE)
        }
    }

    /// [`Heap`] as a component's global allocator.
    pub struct Allocator(UnsafeCell<Heap<LinearMemory>>);

    impl Allocator {
        /// The allocator, for a `#[global_allocator]` static.
        pub const fn new() -> Allocator {
            Allocator(UnsafeCell::new(Heap::new(LinearMemory)))
        }
    }

    impl Allocator {
        /// The component's `cabi_realloc` (see [`Heap::cabi_realloc`]), on
        /// the heap that is also the global allocator, so that the host's
        /// strings and lists are carved without the call through Rust's
        /// allocator shims. A heap out of memory traps, as the canonical ABI
        /// has no null result.
        ///
        /// # Safety
        /// As [`Heap::cabi_realloc`]; `self` is the global allocator.
        #[inline(always)]
        pub unsafe fn cabi_realloc(
            &self,
            block: *mut u8,
            old_size: usize,
            align: usize,
            new_size: usize,
        ) -> *mut u8 {
            // SAFETY: one thread (below), so no other borrow of the heap is
            // live; the caller's promises about `block` hold.
            let moved = unsafe { (*self.0.get()).cabi_realloc(block, old_size, align, new_size) };
            if moved.is_null() {
                core::arch::wasm32::unreachable();
            }
            moved
        }
    }

    impl Default for Allocator {
        fn default() -> Allocator {
            Allocator::new()
        }
    }

    // SAFETY: a component without the atomics feature has one thread, so
    // the heap is never reached from two at once.
    unsafe impl Sync for Allocator {}

    // SAFETY: each method hands on the caller's promises; one thread (above)
    // means no two calls overlap.
    unsafe impl GlobalAlloc for Allocator {
        #[inline]
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            unsafe { (*self.0.get()).alloc(layout) }
        }

        #[inline]
        unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
            unsafe { (*self.0.get()).dealloc(block, layout) }
        }

        unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            unsafe { (*self.0.get()).realloc(block, layout, new_size) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::alloc::{alloc, dealloc};

    /// Pages out of one region taken from the test's own allocator, with a
    /// stranger's pages between our grows when `interleave` is set, as when
    /// other code in the component grows the memory too.
    struct Region {
        base: usize,
        pages: usize,
        used: usize,
        interleave: bool,
        grows: usize,
    }

    impl Region {
        const LAYOUT: Layout = match Layout::from_size_align(1024 * PAGE, PAGE) {
            Ok(layout) => layout,
            Err(_) => panic!("bad test layout"),
        };

        fn new(interleave: bool) -> Region {
            // SAFETY: the layout has a non-zero size.
            let base = unsafe { alloc(Region::LAYOUT) } as usize;
            assert_ne!(base, 0, "the test's region could not be allocated");
            Region {
                base,
                pages: Region::LAYOUT.size() / PAGE,
                used: 0,
                interleave,
                grows: 0,
            }
        }
    }

    impl Drop for Region {
        fn drop(&mut self) {
            // SAFETY: allocated in `new` with this layout.
            unsafe { dealloc(self.base as *mut u8, Region::LAYOUT) }
        }
    }

    impl Source for &mut Region {
        fn grow(&mut self, pages: usize) -> Option<usize> {
            if self.interleave {
                self.used += 1;
            }
            if self.used + pages > self.pages {
                return None;
            }
            let at = self.base + self.used * PAGE;
            self.used += pages;
            self.grows += 1;
            Some(at)
        }
    }

    /// xorshift64: the same sequence of sizes on every run.
    struct Numbers(u64);

    impl Numbers {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> usize {
            (self.next() % n) as usize
        }
    }

    /// A live block: where, for what, and the byte it is filled with.
    struct Live {
        at: *mut u8,
        layout: Layout,
        fill: u8,
    }

    fn fill(block: &Live) {
        // SAFETY: the block is live and `layout.size()` long.
        unsafe { ptr::write_bytes(block.at, block.fill, block.layout.size()) }
    }

    fn intact(block: &Live, len: usize) -> bool {
        // SAFETY: the block is live and at least `len` long.
        let bytes = unsafe { std::slice::from_raw_parts(block.at, len) };
        bytes.iter().all(|&b| b == block.fill)
    }

    fn random_layout(numbers: &mut Numbers) -> Layout {
        let size = match numbers.below(10) {
            0 => 0,
            1..=6 => numbers.below(200),
            7 | 8 => numbers.below(5000),
            _ => numbers.below(100_000),
        };
        let align = 1 << numbers.below(13);
        Layout::from_size_align(size, align).expect("a valid layout")
    }

    /// Allocates, reallocates and frees at random; every live block keeps
    /// its own bytes (no two overlap), is aligned as asked, and lies in
    /// memory the source gave.
    fn churn(interleave: bool) {
        let mut region = Region::new(interleave);
        let (low, high) = (region.base, region.base + Region::LAYOUT.size());
        let mut heap = Heap::new(&mut region);
        let mut numbers = Numbers(0x9e37_79b9_7f4a_7c15);
        let mut live: Vec<Live> = Vec::new();
        for step in 0..20_000u32 {
            let fill_byte = (step % 251) as u8;
            match numbers.below(3) {
                0 | 1 if live.len() < 300 => {
                    let layout = random_layout(&mut numbers);
                    // SAFETY: a valid layout.
                    let at = unsafe { heap.alloc(layout) };
                    assert!(!at.is_null(), "ran out at step {step} for {layout:?}");
                    assert_eq!(at as usize % layout.align(), 0, "{layout:?} misaligned");
                    assert!(at as usize >= low && at as usize + layout.size() <= high);
                    let block = Live {
                        at,
                        layout,
                        fill: fill_byte,
                    };
                    fill(&block);
                    live.push(block);
                }
                0 if !live.is_empty() => {
                    let index = numbers.below(live.len() as u64);
                    let block = &mut live[index];
                    let new_size = numbers.below(10_000);
                    let kept = block.layout.size().min(new_size);
                    // SAFETY: a live block of this layout.
                    let at = unsafe { heap.realloc(block.at, block.layout, new_size) };
                    assert!(!at.is_null());
                    block.at = at;
                    block.layout = Layout::from_size_align(new_size, block.layout.align())
                        .expect("same alignment");
                    assert!(intact(block, kept), "realloc lost the contents");
                    assert_eq!(at as usize % block.layout.align(), 0);
                    block.fill = fill_byte;
                    fill(block);
                }
                _ if !live.is_empty() => {
                    let block = live.swap_remove(numbers.below(live.len() as u64));
                    assert!(
                        intact(&block, block.layout.size()),
                        "a block was overwritten"
                    );
                    // SAFETY: a live block of this layout.
                    unsafe { heap.dealloc(block.at, block.layout) };
                }
                _ => {}
            }
            if step % 1000 == 0 {
                for block in &live {
                    assert!(
                        intact(block, block.layout.size()),
                        "a block was overwritten"
                    );
                }
            }
        }
    }

    #[test]
    fn blocks_are_aligned_apart_and_keep_their_contents() {
        churn(false);
    }

    #[test]
    fn memory_grown_by_someone_else_in_between_is_left_alone() {
        churn(true);
    }

    #[test]
    fn a_call_that_frees_what_it_took_reuses_the_same_blocks() {
        let mut region = Region::new(false);
        run_calls(&mut Heap::new(&mut region));
        assert_eq!(region.grows, 1, "the heap grew again for the same work");
    }

    /// A hundred calls' worth of allocations, each freed before the next.
    fn run_calls(heap: &mut Heap<&mut Region>) {
        // The shape of one routed message: a dozen strings and lists.
        let sizes = [36, 12, 40, 40, 900, 300, 10, 24, 11, 48, 11, 0, 64, 16, 8];
        let mut first = Vec::new();
        for round in 0..100 {
            let blocks: Vec<(*mut u8, Layout)> = sizes
                .iter()
                .map(|&size| {
                    let layout = Layout::from_size_align(size, 4).expect("layout");
                    // SAFETY: a valid layout.
                    (unsafe { heap.alloc(layout) }, layout)
                })
                .collect();
            if round == 0 {
                first = blocks.iter().map(|(at, _)| *at).collect();
            }
            for &(at, layout) in blocks.iter().rev() {
                // SAFETY: allocated just above with this layout.
                unsafe { heap.dealloc(at, layout) };
            }
            if round > 0 {
                let mut now: Vec<*mut u8> = blocks.iter().map(|(at, _)| *at).collect();
                let mut then = first.clone();
                now.sort();
                then.sort();
                assert_eq!(now, then, "round {round} took other blocks");
            }
        }
    }

    #[test]
    fn cabi_realloc_keeps_the_canonical_abis_contract() {
        let mut region = Region::new(false);
        let mut heap = Heap::new(&mut region);
        // SAFETY (each call below): `old_size` is 0, or the block came from
        // this heap for that size and alignment.
        unsafe {
            // Nothing to allocate: an address aligned as asked, no block.
            assert_eq!(heap.cabi_realloc(ptr::null_mut(), 0, 8, 0) as usize, 8);
            let block = heap.cabi_realloc(ptr::null_mut(), 0, 4, 10);
            assert!(!block.is_null());
            assert_eq!(block as usize % 4, 0);
            ptr::copy_nonoverlapping(b"0123456789".as_ptr(), block, 10);
            // Grown past its class: moved, the contents kept.
            let grown = heap.cabi_realloc(block, 10, 4, 100);
            assert_ne!(grown, block);
            assert_eq!(core::slice::from_raw_parts(grown, 10), b"0123456789");
            // The block it left is the next one of that class.
            assert_eq!(heap.cabi_realloc(ptr::null_mut(), 0, 1, 16), block);
            // An alignment that is not a power of two is refused.
            assert!(heap.cabi_realloc(ptr::null_mut(), 0, 3, 10).is_null());
        }
    }

    #[test]
    fn a_source_with_no_more_memory_gives_null() {
        let mut region = Region::new(false);
        let mut heap = Heap::new(&mut region);
        let huge = Layout::from_size_align(2048 * PAGE, 8).expect("layout");
        // SAFETY: a valid layout.
        assert!(unsafe { heap.alloc(huge) }.is_null());
        let small = Layout::from_size_align(100, 8).expect("layout");
        // SAFETY: a valid layout.
        assert!(
            !unsafe { heap.alloc(small) }.is_null(),
            "a failed grow spoilt the heap"
        );
        let impossible = Layout::from_size_align(isize::MAX as usize, 1).expect("layout");
        // SAFETY: a valid layout.
        assert!(unsafe { heap.alloc(impossible) }.is_null());
    }
}
