//! The worker's heap kept small while it populates layers.
//!
//! Each span the worker inflates is a buffer of a few MiB, allocated and freed on whichever
//! thread runs the fill. glibc's malloc raises its mmap threshold to the size of the largest
//! buffer freed, after which such buffers come from per-thread arenas and stay resident there:
//! the worker peaked at 70-95 MiB populating a 77 MiB image, against 36 MiB with the threshold
//! fixed (measured with `lazylayer-bench memory`, docs/benchmarks.md), at no measurable cost in
//! time.

/// Buffers this large or larger are mapped on their own and returned to the system when freed.
const MMAP_THRESHOLD: libc::c_int = 256 << 10;

/// Fixes malloc's mmap threshold (see the module doc). Without glibc, nothing to do.
pub fn keep_span_buffers_off_the_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a malloc tuning parameter; it takes no pointers.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}
