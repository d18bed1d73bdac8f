//! Completion batching: guest notifications deferred to the end of a batch of answers.
//!
//! Each answer from storage used to publish its request and signal the guest's used ring at
//! once. The client now handles every answer already received as one batch ([`run`]), and the
//! backend's signals made meanwhile ([`defer`]) run once the batch ends. Requests are still
//! published as soon as they finish; only the interrupt waits, never past the end of the batch.
//!
//! Holding signals longer (interrupt moderation across batches, until N answers or 1 ms while
//! many requests are in flight) was measured and made a TCG guest slower at queue depth 32,
//! not faster: see `docs/performance.md`.

use std::cell::RefCell;

/// A signal to the guest (or any work) to run at the end of a batch.
pub type Deferred = Box<dyn FnOnce() + Send>;

thread_local! {
    static BATCH: RefCell<Option<Vec<Deferred>>> = const { RefCell::new(None) };
}

/// Runs `f` as a batch and returns what [`defer`] was given meanwhile (on this thread), for the
/// caller to run. A batch inside a batch joins the outer one (its deferred work goes to the
/// outer caller). If `f` unwinds, the deferred work runs then, so no signal is lost with it.
pub fn collect<R>(f: impl FnOnce() -> R) -> (R, Vec<Deferred>) {
    let outer = BATCH.with(|b| {
        let mut b = b.borrow_mut();
        if b.is_some() {
            true
        } else {
            *b = Some(Vec::new());
            false
        }
    });
    if outer {
        return (f(), Vec::new());
    }
    struct End {
        armed: bool,
    }
    impl Drop for End {
        fn drop(&mut self) {
            let deferred = BATCH.with(|b| b.borrow_mut().take()).unwrap_or_default();
            if self.armed {
                for d in deferred {
                    d();
                }
            }
        }
    }
    let mut end = End { armed: true };
    let r = f();
    let deferred = BATCH.with(|b| b.borrow_mut().take()).unwrap_or_default();
    end.armed = false;
    (r, deferred)
}

/// Runs `f` as a batch: what [`defer`] is given meanwhile runs when `f` returns.
pub fn run<R>(f: impl FnOnce() -> R) -> R {
    let (r, deferred) = collect(f);
    for d in deferred {
        d();
    }
    r
}

/// Runs `d` at the end of the current batch, or now if there is none.
pub fn defer(d: impl FnOnce() + Send + 'static) {
    let d: Deferred = Box::new(d);
    let now = BATCH.with(|b| match b.borrow_mut().as_mut() {
        Some(list) => {
            list.push(d);
            None
        }
        None => Some(d),
    });
    if let Some(d) = now {
        d();
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn deferred_work_runs_at_the_end_of_the_outermost_batch_and_only_once() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        defer(move || l.lock().unwrap().push("unbatched"));
        assert_eq!(*log.lock().unwrap(), ["unbatched"]);
        run(|| {
            let l = log.clone();
            defer(move || l.lock().unwrap().push("a"));
            run(|| {
                let l = log.clone();
                defer(move || l.lock().unwrap().push("b"));
            });
            // Nothing ran yet: the inner batch joined the outer one.
            assert_eq!(log.lock().unwrap().len(), 1);
        });
        assert_eq!(*log.lock().unwrap(), ["unbatched", "a", "b"]);
        // A new batch starts empty.
        run(|| {});
        assert_eq!(log.lock().unwrap().len(), 3);
    }

    #[test]
    fn a_panicking_batch_still_runs_what_it_deferred() {
        let ran = Arc::new(Mutex::new(false));
        let r = ran.clone();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            collect(|| {
                defer(move || *r.lock().unwrap() = true);
                panic!("boom");
            })
        }));
        assert!(result.is_err());
        assert!(*ran.lock().unwrap());
        // And the thread is not left inside a batch.
        let r2 = Arc::new(Mutex::new(false));
        let r = r2.clone();
        defer(move || *r.lock().unwrap() = true);
        assert!(*r2.lock().unwrap());
    }

    fn counter() -> (Arc<Mutex<usize>>, impl Fn() -> Vec<Deferred>) {
        let n = Arc::new(Mutex::new(0));
        let c = n.clone();
        (n, move || {
            let c = c.clone();
            vec![Box::new(move || *c.lock().unwrap() += 1) as Deferred]
        })
    }

    #[test]
    fn collected_work_is_returned_not_run() {
        let (n, one) = counter();
        let ((), d) = collect(|| {
            for d in one() {
                defer(d);
            }
        });
        assert_eq!(*n.lock().unwrap(), 0);
        assert_eq!(d.len(), 1);
        d.into_iter().for_each(|d| d());
        assert_eq!(*n.lock().unwrap(), 1);
    }
}
