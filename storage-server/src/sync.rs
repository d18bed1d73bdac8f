//! Group commit: many concurrent flushes share one fdatasync.
//!
//! Rule: a caller's writes completed before it called [`GroupSync::sync`]; any fdatasync that
//! *starts* after the call covers them. Each caller takes a ticket; a sync that starts records
//! the highest ticket issued so far and, when it ends, completes every ticket up to that one.
//! A caller whose ticket was issued while a sync was already running waits for the next one.

use std::sync::{Condvar, Mutex};

#[derive(Default)]
struct State {
    issued: u64,
    completed: u64,
    running: bool,
    /// Result of the last finished sync, as (tickets it covered up to, error kind).
    last_error: Option<(u64, std::io::ErrorKind, String)>,
}

/// Coordinates fdatasync calls of one file.
#[derive(Default)]
pub struct GroupSync {
    state: Mutex<State>,
    done: Condvar,
}

impl GroupSync {
    pub fn new() -> Self {
        Self::default()
    }

    /// Returns once a sync that started after this call has finished; runs it if none is
    /// running. `do_sync` is the fdatasync itself.
    pub fn sync(&self, do_sync: impl Fn() -> std::io::Result<()>) -> std::io::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.issued += 1;
        let ticket = st.issued;
        loop {
            if st.completed >= ticket {
                return match &st.last_error {
                    Some((upto, kind, msg)) if *upto >= ticket => {
                        Err(std::io::Error::new(*kind, msg.clone()))
                    }
                    _ => Ok(()),
                };
            }
            if !st.running {
                st.running = true;
                let target = st.issued;
                drop(st);
                let r = do_sync();
                st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                st.running = false;
                st.completed = target;
                if let Err(e) = &r {
                    st.last_error = Some((target, e.kind(), e.to_string()));
                }
                self.done.notify_all();
                continue;
            }
            st = self.done.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn concurrent_flushes_share_syncs() {
        let g = Arc::new(GroupSync::new());
        let syncs = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let g = g.clone();
                let syncs = syncs.clone();
                std::thread::spawn(move || {
                    g.sync(|| {
                        syncs.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(20));
                        Ok(())
                    })
                })
            })
            .collect();
        for t in threads {
            t.join().expect("join").expect("sync ok");
        }
        let n = syncs.load(Ordering::SeqCst);
        assert!((1..16).contains(&n), "16 flushes took {n} syncs");
    }

    #[test]
    fn a_sync_started_before_the_call_does_not_cover_it() {
        // Ticket 1 starts a sync; ticket 2 arrives during it and must wait for a second sync.
        let g = Arc::new(GroupSync::new());
        let syncs = Arc::new(AtomicU64::new(0));
        let (g1, s1) = (g.clone(), syncs.clone());
        let t = std::thread::spawn(move || {
            g1.sync(|| {
                s1.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(100));
                Ok(())
            })
        });
        std::thread::sleep(Duration::from_millis(30));
        g.sync(|| {
            syncs.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .expect("second");
        t.join().expect("join").expect("first");
        assert_eq!(syncs.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn errors_reach_every_caller_they_cover() {
        let g = GroupSync::new();
        let r = g.sync(|| Err(std::io::Error::other("disk gone")));
        assert!(r.is_err());
        assert!(g.sync(|| Ok(())).is_ok());
    }
}
