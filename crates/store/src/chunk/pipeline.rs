//! A bounded, ordered parallel pipeline: one producer thread, N worker threads, results
//! consumed in production order on the calling thread.
//!
//! Owns: thread plumbing and the memory bound (at most `inflight` items exist between the
//! producer and the consumer). Must never: let the reorder buffer grow without bound, deadlock
//! or leave threads running when any stage fails (the first error wins and stops the others).

use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, sync_channel};
use std::sync::Mutex;

/// Run the pipeline. `produce` calls `emit(item)` for each item (it blocks while `inflight`
/// items are not yet consumed, and fails once the pipeline aborted); `work` runs on the workers;
/// `consume` receives the results in emission order.
pub fn run<I, R, P, W, C>(workers: usize, inflight: usize, produce: P, work: W, mut consume: C) -> Result<()>
where
    I: Send,
    R: Send,
    P: FnOnce(&mut dyn FnMut(I) -> Result<()>) -> Result<()> + Send,
    W: Fn(I) -> Result<R> + Sync,
    C: FnMut(R) -> Result<()>,
{
    let workers = workers.max(1);
    let inflight = inflight.max(1);
    let abort = AtomicBool::new(false);
    let (tok_tx, tok_rx) = sync_channel::<()>(inflight);
    for _ in 0..inflight {
        tok_tx.send(()).unwrap();
    }
    let (job_tx, job_rx) = sync_channel::<(u64, I)>(inflight);
    let job_rx = Mutex::new(job_rx);
    // None: a job skipped after an abort (its result will never be consumed).
    let (res_tx, res_rx) = channel::<(u64, Option<Result<R>>)>();
    let aborted = || Error::new("chunk pipeline stopped");

    std::thread::scope(|s| {
        let abort = &abort;
        let producer = s.spawn(move || {
            let mut seq = 0u64;
            let mut emit = |item: I| -> Result<()> {
                if tok_rx.recv().is_err() || abort.load(Ordering::Relaxed) {
                    return Err(aborted());
                }
                job_tx.send((seq, item)).map_err(|_| aborted())?;
                seq += 1;
                Ok(())
            };
            let r = produce(&mut emit);
            if r.is_err() {
                abort.store(true, Ordering::Relaxed);
            }
            r
        });
        for _ in 0..workers {
            let res_tx = res_tx.clone();
            let job_rx = &job_rx;
            let work = &work;
            s.spawn(move || loop {
                let job = job_rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                let Ok((seq, item)) = job else { break };
                let r = if abort.load(Ordering::Relaxed) {
                    None // drain without working
                } else {
                    let r = work(item);
                    if r.is_err() {
                        abort.store(true, Ordering::Relaxed);
                    }
                    Some(r)
                };
                if res_tx.send((seq, r)).is_err() {
                    break;
                }
            });
        }
        drop(res_tx);

        let mut tok_tx = Some(tok_tx);
        let mut first_err: Option<Error> = None;
        let mut pending: BTreeMap<u64, R> = BTreeMap::new();
        let mut next = 0u64;
        for (seq, r) in res_rx.iter() {
            let r = match r {
                Some(Ok(v)) if first_err.is_none() => Ok(v),
                Some(Err(e)) if first_err.is_none() => Err(e),
                _ => continue,
            };
            let mut r = r.map(|v| {
                pending.insert(seq, v);
            });
            while r.is_ok() {
                let Some(v) = pending.remove(&next) else { break };
                next += 1;
                r = consume(v);
                if r.is_ok() {
                    if let Some(t) = &tok_tx {
                        let _ = t.send(());
                    }
                }
            }
            if let Err(e) = r {
                first_err = Some(e);
                abort.store(true, Ordering::Relaxed);
                tok_tx = None; // wakes a producer waiting for a token
                pending.clear();
            }
        }
        drop(tok_tx);
        let prod = producer.join().unwrap_or_else(|_| Err(Error::new("chunk reader thread panicked")));
        match (first_err, prod) {
            (Some(e), _) => Err(e),
            (None, Err(e)) => Err(e),
            (None, Ok(())) => Ok(()),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn ordered_and_bounded() {
        let live = AtomicUsize::new(0);
        let max_live = AtomicUsize::new(0);
        let mut out = Vec::new();
        run(
            3,
            4,
            |emit| {
                for i in 0..200u64 {
                    let n = live.fetch_add(1, Ordering::SeqCst) + 1;
                    max_live.fetch_max(n, Ordering::SeqCst);
                    emit(i)?;
                }
                Ok(())
            },
            |i| {
                if i % 7 == 0 {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                Ok(i * 2)
            },
            |r| {
                live.fetch_sub(1, Ordering::SeqCst);
                out.push(r);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(out, (0..200u64).map(|i| i * 2).collect::<Vec<_>>());
        // +1: the producer counts an item before it waits for its token.
        assert!(max_live.load(Ordering::SeqCst) <= 5, "{}", max_live.load(Ordering::SeqCst));
    }

    #[test]
    fn errors_stop_everything() {
        let r = run(
            2,
            2,
            |emit| {
                for i in 0..1000u64 {
                    emit(i)?;
                }
                Ok(())
            },
            |i| if i == 50 { Err(Error::new("boom")) } else { Ok(i) },
            |_| Ok(()),
        );
        assert_eq!(r.unwrap_err().message(), "boom");
        let r = run(
            2,
            2,
            |emit| {
                for i in 0..1000u64 {
                    emit(i)?;
                }
                Ok(())
            },
            Ok,
            |i| if i == 10 { Err(Error::new("sink")) } else { Ok(()) },
        );
        assert_eq!(r.unwrap_err().message(), "sink");
        let r = run(
            2,
            2,
            |emit| {
                emit(1u64)?;
                Err(Error::new("read"))
            },
            Ok,
            |_| Ok(()),
        );
        assert_eq!(r.unwrap_err().message(), "read");
    }
}
