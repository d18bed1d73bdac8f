//! Telling the frontend that the device's config space changed (an online resize):
//! `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` on the backend request channel, after which QEMU
//! re-reads the config space with `GET_CONFIG` and raises a virtio config-change interrupt.
//!
//! The channel is the socket the frontend passes with `SET_BACKEND_REQ_FD` (protocol feature
//! `BACKEND_REQ`). `vhost` 0.18 wraps it in a [`vhost::vhost_user::Backend`] that has no method
//! for this message and does not expose its socket, so keel-vhost finds the socket among its own
//! descriptors when the `Backend` is handed over: it is the one AF_UNIX stream socket that
//! (a) was not open when the session's device was created ([`SocketSnapshot`]), (b) has no
//! address (one end of the frontend's `socketpair`), and (c) was created by the process at the
//! other end of the session's connection (`SO_PEERCRED`). keel-vhost keeps a duplicate of it and
//! writes the 12-byte message header itself, without `NEED_REPLY`, so the frontend answers
//! nothing and the `Backend` (which keel-vhost never uses to send) sees no stray bytes.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vhost::vhost_user::message::BackendReq;

/// The socket inodes open in this process at one moment.
#[derive(Debug, Default, Clone)]
pub struct SocketSnapshot {
    inodes: HashSet<u64>,
}

impl SocketSnapshot {
    /// The sockets open now (empty if `/proc/self/fd` cannot be read).
    pub fn take() -> SocketSnapshot {
        SocketSnapshot {
            inodes: open_sockets()
                .unwrap_or_default()
                .into_iter()
                .map(|(_, ino)| ino)
                .collect(),
        }
    }
}

/// `(fd, inode)` of every socket open in this process.
fn open_sockets() -> io::Result<Vec<(RawFd, u64)>> {
    let mut v = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let Ok(entry) = entry else { continue };
        let Some(fd) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let ino = target
            .to_str()
            .and_then(|t| t.strip_prefix("socket:["))
            .and_then(|t| t.strip_suffix(']'))
            .and_then(|t| t.parse().ok());
        if let Some(ino) = ino {
            v.push((fd, ino));
        }
    }
    Ok(v)
}

/// A duplicate of `fd` owned by the caller, if `fd` is (still) open.
fn dup(fd: RawFd) -> Option<OwnedFd> {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) only reads the descriptor table; a closed `fd` gives -1.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return None;
    }
    // SAFETY: `new` is a descriptor fcntl just created for us; nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(new) })
}

fn socket_type(fd: BorrowedFd<'_>) -> Option<i32> {
    let mut ty: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `ty`, a c_int of that size.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            &mut ty as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    (r == 0).then_some(ty)
}

/// The pid of the process that created the peer end (`SO_PEERCRED`).
fn peer_pid(fd: BorrowedFd<'_>) -> Option<i32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a ucred of that size.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    (r == 0).then_some(cred.pid)
}

/// A connected AF_UNIX stream socket opened since the snapshot.
struct NewSocket {
    stream: UnixStream,
    named: bool,
    peer_pid: i32,
}

fn new_unix_streams(before: &SocketSnapshot) -> io::Result<Vec<NewSocket>> {
    let mut v = Vec::new();
    for (fd, ino) in open_sockets()? {
        if before.inodes.contains(&ino) {
            continue;
        }
        let Some(owned) = dup(fd) else { continue };
        // The number may have been closed and reused since it was listed: check it is the same
        // socket.
        let file = File::from(owned);
        if file.metadata().map(|m| m.ino()).ok() != Some(ino) {
            continue;
        }
        let owned = OwnedFd::from(file);
        if socket_type(owned.as_fd()) != Some(libc::SOCK_STREAM) {
            continue;
        }
        let Some(peer_pid) = peer_pid(owned.as_fd()) else {
            continue;
        };
        let stream = UnixStream::from(owned);
        // Fails for sockets of other families (TCP to storage, ...).
        let Ok(local) = stream.local_addr() else {
            continue;
        };
        v.push(NewSocket {
            named: !local.is_unnamed(),
            stream,
            peer_pid,
        });
    }
    Ok(v)
}

/// The backend request channel, for config-change messages.
#[derive(Debug)]
pub struct ConfigChannel {
    sock: UnixStream,
}

impl ConfigChannel {
    /// Finds the backend request channel that arrived since `before` (see the module docs).
    pub fn find(before: &SocketSnapshot) -> io::Result<ConfigChannel> {
        let own = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
        let new = new_unix_streams(before)?;
        // The session's connection: accepted on the listener, so it has the listener's address.
        let mut frontends: Vec<i32> = new.iter().filter(|s| s.named).map(|s| s.peer_pid).collect();
        frontends.sort_unstable();
        frontends.dedup();
        let mut candidates: Vec<NewSocket> = new
            .into_iter()
            .filter(|s| {
                !s.named
                    && s.peer_pid != own
                    && (frontends.is_empty() || frontends.contains(&s.peer_pid))
            })
            .collect();
        if candidates.len() != 1 {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{} candidate sockets for the backend request channel (frontend pids {frontends:?})",
                    candidates.len()
                ),
            ));
        }
        let Some(chosen) = candidates.pop() else {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        };
        chosen
            .stream
            .set_write_timeout(Some(Duration::from_secs(1)))?;
        Ok(ConfigChannel {
            sock: chosen.stream,
        })
    }

    /// A channel over a socket the caller already has (tests).
    pub fn from_stream(sock: UnixStream) -> ConfigChannel {
        ConfigChannel { sock }
    }

    /// Sends `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` (no payload, no reply asked).
    pub fn notify(&self) -> io::Result<()> {
        (&self.sock).write_all(&config_change_header())
    }
}

/// The message header (`vhost`'s header type is private): request code, flags (protocol
/// version 1, no `NEED_REPLY`), payload size 0; little-endian `u32`s.
fn config_change_header() -> [u8; 12] {
    const VERSION_1: u32 = 0x1;
    let code: u32 = BackendReq::CONFIG_CHANGE_MSG.into();
    let mut h = [0u8; 12];
    h[0..4].copy_from_slice(&code.to_le_bytes());
    h[4..8].copy_from_slice(&VERSION_1.to_le_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn finds_only_a_socket_opened_since_the_snapshot_and_sends_the_header() {
        // A socketpair made by this process has our own pid as peer: such sockets (tokio's
        // signal pipe, ...) are never the channel.
        let (_a, _b) = UnixStream::pair().expect("pair");
        let before = SocketSnapshot::take();
        assert!(ConfigChannel::find(&before).is_err());

        let (mine, mut theirs) = UnixStream::pair().expect("pair");
        let ch = ConfigChannel::from_stream(mine);
        ch.notify().expect("notify");
        let mut buf = [0u8; 12];
        theirs.read_exact(&mut buf).expect("read");
        assert_eq!(u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]), 2); // CONFIG_CHANGE_MSG
        assert_eq!(u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]), 1); // version 1, no reply
        assert_eq!(u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]), 0); // no payload
    }
}
