//! What a daemon does against clients that hold connections or memory without using them
//! (docs/security.md, "Denial of service"; docs/protocol.md, "Limits and back-pressure"):
//! connection limits per peer address and overall, checked right after `accept` (before TLS),
//! an accept loop that survives running out of file descriptors, and the process's file limit
//! raised to its hard limit at start.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns (before, after). Every daemon
/// calls it at start: the default soft limit (often 1024) is far below what a server holding
/// many connections and copy files needs.
pub fn raise_nofile_limit() -> std::io::Result<(u64, u64)> {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let before = r.rlim_cur as u64;
        if r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok((before, r.rlim_cur as u64))
    }
}

/// Connection limits of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Connections open at once, from everyone.
    pub max_total: usize,
    /// Connections open at once from one peer address.
    pub max_per_ip: usize,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max_total: 4096,
            max_per_ip: 1024,
        }
    }
}

/// Counts a listener's open connections, overall and per peer address.
#[derive(Debug)]
pub struct ConnLimiter {
    limits: ConnLimits,
    open: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct ConnGuard {
    limiter: Arc<ConnLimiter>,
    ip: IpAddr,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Total,
    PerIp,
}

impl ConnLimiter {
    pub fn new(limits: ConnLimits) -> Arc<ConnLimiter> {
        Arc::new(ConnLimiter {
            limits,
            open: Mutex::new(Counts::default()),
        })
    }

    /// Admits a connection from `ip` unless a limit is reached (one lock per connection).
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnGuard, Refused> {
        let mut c = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if c.total >= self.limits.max_total {
            return Err(Refused::Total);
        }
        let n = c.per_ip.entry(ip).or_insert(0);
        if *n >= self.limits.max_per_ip {
            return Err(Refused::PerIp);
        }
        *n += 1;
        c.total += 1;
        Ok(ConnGuard {
            limiter: self.clone(),
            ip,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut c = self.limiter.open.lock().unwrap_or_else(|e| e.into_inner());
        c.total -= 1;
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
    }
}

/// Logs at most one warning per interval, counting the ones it kept back.
#[derive(Debug)]
struct RateLimitedLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    /// Whether to log now, and how many were kept back since the last one.
    fn tick(&mut self, every: Duration) -> Option<u64> {
        let now = Instant::now();
        if self.last.is_some_and(|l| now.duration_since(l) < every) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// A listener that admits connections under [`ConnLimits`].
pub struct Acceptor {
    listener: TcpListener,
    limiter: Arc<ConnLimiter>,
    errors: RateLimitedLog,
    refusals: RateLimitedLog,
}

impl Acceptor {
    pub fn new(listener: TcpListener, limits: ConnLimits) -> Acceptor {
        Acceptor {
            listener,
            limiter: ConnLimiter::new(limits),
            errors: RateLimitedLog {
                last: None,
                suppressed: 0,
            },
            refusals: RateLimitedLog {
                last: None,
                suppressed: 0,
            },
        }
    }

    pub fn limiter(&self) -> &Arc<ConnLimiter> {
        &self.limiter
    }

    /// The next admitted connection. Never fails: a connection over a limit is closed at once
    /// (before TLS); an accept error is logged (at most once a second) and, when the process or
    /// the system is out of file descriptors or memory, waited out for 100 ms (the listening
    /// socket's queue holds the others meanwhile).
    pub async fn next(&mut self) -> (TcpStream, SocketAddr, ConnGuard) {
        loop {
            match self.listener.accept().await {
                Ok((tcp, addr)) => match self.limiter.admit(addr.ip()) {
                    Ok(guard) => return (tcp, addr, guard),
                    Err(why) => {
                        // Closed with a reset: no FIN_WAIT/TIME_WAIT left behind for the
                        // flood.
                        // A zero linger does not block on close (tokio deprecates the call
                        // for the nonzero case).
                        #[allow(deprecated)]
                        let _ = tcp.set_linger(Some(Duration::ZERO));
                        drop(tcp);
                        if let Some(kept) = self.refusals.tick(Duration::from_secs(1)) {
                            tracing::warn!(%addr, limit = ?why, open = self.limiter.open(), refused_since_last_log = kept, "connection refused: connection limit reached");
                        }
                    }
                },
                Err(e) => {
                    let exhausted = matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                    );
                    if let Some(kept) = self.errors.tick(Duration::from_secs(1)) {
                        tracing::error!(error = %e, open = self.limiter.open(), errors_since_last_log = kept, "accept failed; going on");
                    }
                    if exhausted {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn limits_per_ip_and_total() {
        let l = ConnLimiter::new(ConnLimits {
            max_total: 3,
            max_per_ip: 2,
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let g1 = l.admit(a).unwrap();
        let _g2 = l.admit(a).unwrap();
        assert_eq!(l.admit(a).unwrap_err(), Refused::PerIp);
        let _g3 = l.admit(b).unwrap();
        assert_eq!(l.admit(b).unwrap_err(), Refused::Total);
        drop(g1);
        assert_eq!(l.open(), 2);
        let _g4 = l.admit(a).unwrap();
    }

    #[test]
    fn raising_the_file_limit_works() {
        let (before, after) = raise_nofile_limit().expect("rlimit");
        assert!(after >= before);
    }
}
