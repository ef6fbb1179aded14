//! The process's global allocator: mimalloc, called the way its own C API
//! intends.
//!
//! The `mimalloc` crate's `GlobalAlloc` sends every allocation through
//! `mi_malloc_aligned`, even when the alignment asked for is one that plain
//! `mi_malloc` already guarantees (16 bytes). In mimalloc 3 that takes the
//! aligned slow path for every block over 1 KiB or whose free-list head is
//! not already aligned: hyper's 8 KiB read buffers, header maps, boxed
//! futures, several times per proxied request. So this wrapper (the same
//! dispatch the `mimalloc` crate used before it changed) asks for the aligned
//! entry points only when the layout needs more than mimalloc's natural
//! alignment. Measured with `bench/instructions.py`.

#![allow(unsafe_code)] // a GlobalAlloc is unsafe by definition

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// Every block `mi_malloc` returns is aligned to this (`MI_MAX_ALIGN_SIZE`,
/// `sizeof(max_align_t)` on the 64-bit targets we build for).
const NATURAL_ALIGN: usize = 16;

pub struct MiMalloc;

/// Whether `mi_malloc` alone satisfies `layout`'s alignment. A block smaller
/// than 16 bytes is only aligned to its size class, hence the second test.
#[inline]
fn naturally_aligned(align: usize, size: usize) -> bool {
    align <= NATURAL_ALIGN && align <= size
}

// SAFETY: each method forwards to the mimalloc function that implements the
// same contract; blocks from either entry point are freed with `mi_free`.
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        unsafe {
            if naturally_aligned(layout.align(), layout.size()) {
                mi::mi_malloc(layout.size()) as *mut u8
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()) as *mut u8
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        unsafe {
            if naturally_aligned(layout.align(), layout.size()) {
                mi::mi_zalloc(layout.size()) as *mut u8
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()) as *mut u8
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        unsafe { mi::mi_free(ptr as *mut c_void) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        unsafe {
            if naturally_aligned(layout.align(), new_size) {
                mi::mi_realloc(ptr as *mut c_void, new_size) as *mut u8
            } else {
                mi::mi_realloc_aligned(ptr as *mut c_void, new_size, layout.align()) as *mut u8
            }
        }
    }
}
