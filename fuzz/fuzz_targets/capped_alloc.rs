//! The system allocator, refusing (with a panic the fuzzer reports) any single allocation
//! over [`LIMIT`]: an "unbounded allocation" shows up as a crash whether or not the target was
//! built with a sanitizer (AddressSanitizer's own `-malloc_limit_mb` needs one). No input of
//! these targets (at most a few KiB) needs anywhere near that much.
use std::alloc::{GlobalAlloc, Layout, System};

pub const LIMIT: usize = 64 << 20;

pub struct Capped;

unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > LIMIT {
            // Not a panic (the allocator must not unwind): abort with a message.
            eprintln!("capped_alloc: an allocation of {} bytes", layout.size());
            std::process::abort();
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > LIMIT {
            eprintln!("capped_alloc: a reallocation to {new_size} bytes");
            std::process::abort();
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}
