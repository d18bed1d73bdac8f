//! `libkeel_nodelay.so`: an `LD_PRELOAD` shim used only by `keel-bench` for its **N**
//! configuration (qemu-nbd over TLS).
//!
//! qemu-nbd 7.2 (Debian 12) leaves Nagle's algorithm on for the sockets it accepts. With TLS,
//! a reply is several small writes (record header, payload, MAC), so Nagle holds the tail of a
//! reply until the peer's delayed ACK fires (up to 40 ms): a QD1 job then runs at ~25 IOPS.
//! Newer QEMU sets `TCP_NODELAY` itself; to compare Keel with the peer as its users would run it
//! today, the benchmark preloads this shim into qemu-nbd and into the qemu-storage-daemon that
//! connects to it. It wraps `accept`, `accept4` and `connect` and sets `TCP_NODELAY` on the
//! resulting socket; on sockets that are not TCP the `setsockopt` fails and is ignored.

use std::ffi::CStr;

use libc::{c_int, c_void, sockaddr, socklen_t};

type AcceptFn = unsafe extern "C" fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int;
type Accept4Fn = unsafe extern "C" fn(c_int, *mut sockaddr, *mut socklen_t, c_int) -> c_int;
type ConnectFn = unsafe extern "C" fn(c_int, *const sockaddr, socklen_t) -> c_int;

/// The next definition of `name` after this library (libc's).
fn next(name: &CStr) -> *mut c_void {
    // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name has no other preconditions.
    unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) }
}

fn set_nodelay(fd: c_int) {
    let one: c_int = 1;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live local; an fd that is not a
    // TCP socket only makes it fail, which is ignored.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const c_int).cast(),
            std::mem::size_of::<c_int>() as socklen_t,
        );
    }
}

/// # Safety
/// Same contract as accept(2).
#[no_mangle]
pub unsafe extern "C" fn accept(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    let f = next(c"accept");
    if f.is_null() {
        // SAFETY: errno is thread-local; setting it is always sound.
        unsafe { *libc::__errno_location() = libc::ENOSYS };
        return -1;
    }
    // SAFETY: `f` is libc's accept, whose signature is `AcceptFn`; the caller upholds accept(2).
    let r = unsafe { std::mem::transmute::<*mut c_void, AcceptFn>(f)(fd, addr, len) };
    if r >= 0 {
        set_nodelay(r);
    }
    r
}

/// # Safety
/// Same contract as accept4(2).
#[no_mangle]
pub unsafe extern "C" fn accept4(
    fd: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
    flags: c_int,
) -> c_int {
    let f = next(c"accept4");
    if f.is_null() {
        // SAFETY: errno is thread-local; setting it is always sound.
        unsafe { *libc::__errno_location() = libc::ENOSYS };
        return -1;
    }
    // SAFETY: `f` is libc's accept4, whose signature is `Accept4Fn`; the caller upholds accept4(2).
    let r = unsafe { std::mem::transmute::<*mut c_void, Accept4Fn>(f)(fd, addr, len, flags) };
    if r >= 0 {
        set_nodelay(r);
    }
    r
}

/// # Safety
/// Same contract as connect(2).
#[no_mangle]
pub unsafe extern "C" fn connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    let f = next(c"connect");
    if f.is_null() {
        // SAFETY: errno is thread-local; setting it is always sound.
        unsafe { *libc::__errno_location() = libc::ENOSYS };
        return -1;
    }
    // Before connecting, so the handshake's first flight is not delayed either; a non-blocking
    // connect returns EINPROGRESS, and errno must be what connect set.
    set_nodelay(fd);
    // SAFETY: `f` is libc's connect, whose signature is `ConnectFn`; the caller upholds connect(2).
    unsafe { std::mem::transmute::<*mut c_void, ConnectFn>(f)(fd, addr, len) }
}
