//! What a person watching affa is told while it works: the messages of a run, its phases, the
//! byte progress of long steps, and the questions of destructive actions. The library calls an
//! [`Observer`]; the `affa` binary draws it on a terminal (src/render.rs); with nobody watching
//! (cron, a pipe, the tests' library calls) the calls go nowhere.
//!
//! Owns: the events and the [`Watch`] handle that carries them. Must never: print, read stdin,
//! or change what is written to the logs (the logs get the same lines whoever watches).

use std::cell::Cell;
use std::fmt;
use std::sync::Arc;

/// A step of a run worth showing on its own line. Its text is also the log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// The ssh connection check of the source host (`user@host`).
    Connecting(String),
    /// The login to the vSphere API of an ESXi host.
    EsxiConnecting(String),
    /// The snapshot that freezes the VM's disks.
    Snapshot(String),
    /// One rsync transfer: `what` is copied, step `n` of `of`.
    Copying {
        what: String,
        n: usize,
        of: usize,
    },
    /// A big file is cut into chunks for the pool, file `n` of `of`.
    Chunking {
        file: String,
        n: usize,
        of: usize,
    },
    RemovingSnapshot(String),
    /// The VM's configuration files, after the snapshot is gone.
    CopyingConfig,
    /// The new archive gets its name; older ones move up or go.
    Rotating,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::Connecting(d) => write!(f, "Checking the connection to {d}"),
            Phase::EsxiConnecting(h) => write!(f, "ESXi: connecting to {h}"),
            Phase::Snapshot(n) => write!(f, "ESXi: creating snapshot {n}"),
            Phase::Copying { what, n, of } => write!(f, "copying {what} ({n} of {of})"),
            Phase::Chunking { file, n, of } => write!(f, "chunking {file} ({n} of {of})"),
            Phase::RemovingSnapshot(n) => write!(f, "ESXi: removing snapshot {n}"),
            Phase::CopyingConfig => write!(f, "ESXi: copying the configuration files"),
            Phase::Rotating => write!(f, "rotating the archives"),
        }
    }
}

/// Receives what affa has to tell a person. Every method has a do-nothing default.
pub trait Observer: Send + Sync {
    /// Does anybody look? When false, nothing asks for progress (rsync runs without
    /// `--info=progress2`, as under cron).
    fn watching(&self) -> bool {
        true
    }
    /// A line of the run's log (`warning`: a WARNING line).
    fn message(&self, _warning: bool, _text: &str) {}
    /// A new phase of the run (also logged).
    fn phase(&self, _phase: &Phase) {}
    /// Progress of the step `label`: `done` bytes of `total` (None: unknown).
    fn progress(&self, _label: &str, _done: u64, _total: Option<u64>) {}
    /// The step with progress is over (successfully or not): its progress display goes.
    fn progress_done(&self) {}
    /// Ask the person to type `word` to go on; returns what was typed, or None when nobody can
    /// answer (no terminal).
    fn ask(&self, _question: &str, _word: &str) -> Option<String> {
        None
    }
}

/// The observer of a command, or nobody. Cheap to clone.
#[derive(Clone, Default)]
pub struct Watch(Option<Arc<dyn Observer>>);

impl fmt::Debug for Watch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Watch({})", if self.is_watched() { "watched" } else { "nobody" })
    }
}

impl Watch {
    pub fn new(o: Arc<dyn Observer>) -> Watch {
        Watch(Some(o))
    }
    /// Nobody watches: every event goes nowhere, every question is unanswered.
    pub fn nobody() -> Watch {
        Watch(None)
    }
    pub fn is_watched(&self) -> bool {
        self.0.as_ref().is_some_and(|o| o.watching())
    }
    pub fn message(&self, warning: bool, text: &str) {
        if let Some(o) = &self.0 {
            o.message(warning, text);
        }
    }
    pub fn phase(&self, p: &Phase) {
        if let Some(o) = &self.0 {
            o.phase(p);
        }
    }
    pub fn ask(&self, question: &str, word: &str) -> Option<String> {
        self.0.as_ref().and_then(|o| o.ask(question, word))
    }
    /// A byte meter for one step; its display ends when the meter is dropped.
    pub fn meter(&self, label: impl Into<String>, total: Option<u64>) -> Meter<'_> {
        Meter { watch: self, label: label.into(), total: total.filter(|&t| t > 0), done: Cell::new(0) }
    }
}

/// The byte progress of one step (chunking a file, rebuilding, hashing, verifying, an rsync).
/// Dropping it ends the display, also when the step fails half-way.
pub struct Meter<'a> {
    watch: &'a Watch,
    label: String,
    total: Option<u64>,
    done: Cell<u64>,
}

impl Meter<'_> {
    /// `n` bytes done in all.
    pub fn set(&self, n: u64) {
        self.done.set(n);
        if let Some(o) = &self.watch.0 {
            o.progress(&self.label, n, self.total);
        }
    }
    /// `n` more bytes done.
    pub fn inc(&self, n: u64) {
        self.set(self.done.get() + n);
    }
    /// Progress with a total learnt on the way (rsync's percentage).
    pub fn set_with_total(&self, n: u64, total: Option<u64>) {
        self.done.set(n);
        if let Some(o) = &self.watch.0 {
            o.progress(&self.label, n, total);
        }
    }
}

impl Drop for Meter<'_> {
    fn drop(&mut self) {
        if let Some(o) = &self.watch.0 {
            o.progress_done();
        }
    }
}

/// Ask for `word` before a destructive action; `yes` (`--yes`) answers for scripts. Without a
/// terminal to ask on, nothing happens and the error says how to confirm.
pub fn confirm(watch: &Watch, what: &str, word: &str, yes: bool) -> crate::Result<()> {
    if yes {
        return Ok(());
    }
    match watch.ask(what, word) {
        None => bail!("{what}: refusing without confirmation; run it on a terminal and type '{word}', or add --yes"),
        Some(a) if a.trim() == word => Ok(()),
        Some(_) => bail!("cancelled: nothing was changed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Record(Mutex<Vec<String>>, Option<&'static str>);
    impl Observer for Record {
        fn progress(&self, l: &str, d: u64, t: Option<u64>) {
            self.0.lock().unwrap().push(format!("{l} {d}/{t:?}"));
        }
        fn progress_done(&self) {
            self.0.lock().unwrap().push("done".into());
        }
        fn ask(&self, _q: &str, _w: &str) -> Option<String> {
            self.1.map(String::from)
        }
    }

    #[test]
    fn a_meter_ends_its_display_when_dropped() {
        let r = Arc::new(Record::default());
        let w = Watch::new(r.clone());
        {
            let m = w.meter("x", Some(10));
            m.inc(4);
            m.inc(6);
        }
        assert_eq!(*r.0.lock().unwrap(), ["x 4/Some(10)", "x 10/Some(10)", "done"]);
    }

    #[test]
    fn confirm_needs_the_word_or_yes() {
        let ask = |a| Watch::new(Arc::new(Record(Mutex::default(), a)));
        assert!(confirm(&ask(Some("proceed\n")), "q", "proceed", false).is_ok());
        let e = confirm(&ask(Some("yes")), "q", "proceed", false).unwrap_err();
        assert!(e.to_string().contains("cancelled"), "{e}");
        let e = confirm(&ask(None), "q", "proceed", false).unwrap_err();
        assert!(e.to_string().contains("--yes"), "{e}");
        assert!(confirm(&Watch::nobody(), "q", "proceed", true).is_ok());
    }
}
