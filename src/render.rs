//! The terminal side of the `affa` binary (a module of main.rs, not of the library): draws what
//! the library reports through `affa::observer` (the run's messages and phases, indicatif
//! progress bars with bytes and rate, the closing summary) and asks the confirmation questions.
//!
//! Owns: everything affa shows on a terminal besides a command's output. Must never: draw
//! anything when stderr is not a terminal or with `--silent` (cron, pipes: only the final error
//! line), colour anything then or with `NO_COLOR` set, or leave a progress line half-drawn
//! under another line (every line is printed with the bar cleared first).

use std::io::{BufRead, IsTerminal, Write};
use std::sync::{Arc, Mutex};

use affa::observer::{summary_lines, Observer, Phase, Watch};
use affa::run::RunSummary;
use indicatif::{ProgressBar, ProgressStyle};

pub struct Terminal {
    /// stderr is a terminal and `--silent` was not given.
    draw: bool,
    colour: bool,
    /// The bar on screen and the label it belongs to.
    bar: Mutex<Option<(String, ProgressBar)>>,
}

const BOLD: &str = "\x1b[1m";
const YELLOW: &str = "\x1b[33m";
const RED: &str = "\x1b[1;31m";
const RESET: &str = "\x1b[0m";

impl Terminal {
    pub fn new(silent: bool) -> Arc<Terminal> {
        let draw = !silent && std::io::stderr().is_terminal();
        let colour = draw
            && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
            && std::env::var("TERM").map_or(true, |t| t != "dumb");
        Arc::new(Terminal { draw, colour, bar: Mutex::new(None) })
    }

    pub fn watch(self: &Arc<Self>) -> Watch {
        Watch::new(self.clone())
    }

    fn paint(&self, code: &str, text: &str) -> String {
        if self.colour {
            format!("{code}{text}{RESET}")
        } else {
            text.to_string()
        }
    }

    /// One line on stderr, with the progress bar (if any) cleared first and drawn again after.
    fn line(&self, text: &str) {
        let guard = self.bar.lock().unwrap_or_else(|e| e.into_inner());
        match guard.as_ref() {
            Some((_, b)) => b.suspend(|| eprintln!("{text}")),
            None => eprintln!("{text}"),
        }
    }

    /// Remove the bar from the screen.
    pub fn clear(&self) {
        if let Some((_, b)) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).take() {
            b.finish_and_clear();
        }
    }

    /// The one-line error that ends a failed command: always shown (cron mails it), the last line.
    pub fn error(&self, e: &affa::Error) {
        self.clear();
        eprintln!("{} {e}", self.paint(RED, "affa: error:"));
    }

    /// The closing summary of a run, on one screen.
    pub fn summary(&self, job: &str, s: &RunSummary) {
        if !self.draw {
            return;
        }
        self.clear();
        self.line(&self.paint(BOLD, &format!("job {job} done")));
        for (k, v) in summary_lines(s) {
            let k = if k == "warning" { self.paint(YELLOW, k) } else { k.to_string() };
            self.line(&format!("  {k:<12} {v}"));
        }
    }

    fn style(total: Option<u64>) -> ProgressStyle {
        let t = match total {
            Some(_) => "[{bar:25}] {binary_bytes:>10}/{binary_total_bytes:<10} {binary_bytes_per_sec:>12} eta {eta:>3} {wide_msg}",
            None => "{spinner} {binary_bytes:>10} {binary_bytes_per_sec:>12} {wide_msg}",
        };
        ProgressStyle::with_template(t).unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> ")
    }
}

impl Observer for Terminal {
    fn watching(&self) -> bool {
        self.draw
    }

    fn message(&self, warning: bool, text: &str) {
        if !self.draw {
            return;
        }
        if warning {
            self.line(&format!("{} {text}", self.paint(YELLOW, "WARNING:")));
        } else {
            self.line(text);
        }
    }

    fn phase(&self, p: &Phase) {
        if !self.draw {
            return;
        }
        self.clear();
        self.line(&self.paint(BOLD, &format!("==> {p}")));
    }

    fn progress(&self, label: &str, done: u64, total: Option<u64>) {
        if !self.draw {
            return;
        }
        let mut guard = self.bar.lock().unwrap_or_else(|e| e.into_inner());
        if guard.as_ref().is_some_and(|(l, _)| l != label) {
            if let Some((_, b)) = guard.take() {
                b.finish_and_clear();
            }
        }
        let (_, bar) = guard.get_or_insert_with(|| {
            let b = ProgressBar::new(total.unwrap_or(0));
            b.set_style(Terminal::style(total));
            b.set_message(label.to_string());
            (label.to_string(), b)
        });
        if let Some(t) = total {
            if bar.length() != Some(t) {
                if bar.length().unwrap_or(0) == 0 {
                    bar.set_style(Terminal::style(Some(t)));
                }
                bar.set_length(t.max(done));
            }
        }
        bar.set_position(done);
    }

    fn progress_done(&self) {
        self.clear();
    }

    fn ask(&self, question: &str, word: &str) -> Option<String> {
        if !std::io::stdin().is_terminal() {
            return None;
        }
        self.clear();
        eprint!("{question}\nType '{word}' to continue: ");
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        // A closed stdin answers "" (cancelled).
        let _ = std::io::stdin().lock().read_line(&mut answer);
        Some(answer)
    }
}
