//! Process-wide settings the data path's daemons apply at start.

/// Keeps freed I/O buffers in the heap instead of returning them to the kernel.
///
/// glibc serves allocations above its mmap threshold (128 KiB at first) with a fresh `mmap`
/// and `munmap`s them on free, so every 1 MiB request or response buffer cost 256 page faults,
/// the kernel zeroing 1 MiB, and a TLB shootdown on free: about a third of the CPU of a 1 MiB
/// read in a profile (`exc_page_fault`, `clear_page_erms`, `unmap_page_range`). Buffers up to
/// 32 MiB (glibc's maximum threshold; a frame carries at most 4 MiB) now come from the heap, and
/// the heap is not trimmed below 256 MiB of free space.
pub fn keep_large_buffers() {
    // SAFETY: mallopt only changes allocator parameters; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}
