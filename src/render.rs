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

use affa::backup::RunSummary;
use affa::observer::{Observer, Phase, Watch};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle, TermLike};

/// Text that may hold what a host sent (names, rsync's lines), with its control characters
/// escaped: nothing a host sends moves the cursor or rewrites the screen.
fn esc(s: &str) -> String {
    affa::untrusted::escape_controls(s).into_owned()
}

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
    /// The line also clears the row it starts on: Ctrl-C makes the terminal echo `^C` there and
    /// throw away output not yet shown, which may be the bar's own clearing.
    fn line(&self, text: &str) {
        let text = if self.draw { format!("\r\x1b[2K{text}") } else { text.to_string() };
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
        self.fail(e.message());
    }

    /// The one-line error of `message` (an error, or a usage error of the command line).
    pub fn fail(&self, message: &str) {
        self.clear();
        // Errors may quote what a host sent: no control character reaches the terminal.
        self.line(&format!("{} {}", self.paint(RED, "affa: error:"), esc(message)));
    }

    /// A new offsite key, shown once (always, even with --silent: it exists nowhere else but in
    /// its file): the admin keeps a copy away from this server.
    pub fn new_offsite_key(&self, file: &std::path::Path, text: &str) {
        self.clear();
        self.line(&self.paint(BOLD, &format!("affa: a new offsite key was made in {}.", file.display())));
        self.line("Keep a copy of it away from this server: without it nothing in the bucket can be read.");
        for l in text.lines() {
            self.line(&format!("    {}", esc(l)));
        }
    }

    /// The closing summary of a run, on one screen.
    pub fn summary(&self, job: &str, s: &RunSummary) {
        if !self.draw {
            return;
        }
        self.clear();
        self.line(&self.paint(BOLD, &format!("job {job} done")));
        for (k, v) in s.lines() {
            let k = if k == "warning" { self.paint(YELLOW, k) } else { k.to_string() };
            self.line(&format!("  {k:<12} {v}"));
        }
    }

    fn style(total: Option<u64>) -> ProgressStyle {
        let t = match total {
            Some(_) => {
                "[{bar:25}] {binary_bytes:>10}/{binary_total_bytes:<10} {binary_bytes_per_sec:>12} eta {eta:>3} {msg}"
            }
            None => "{spinner} {binary_bytes:>10} {binary_bytes_per_sec:>12} {msg}",
        };
        ProgressStyle::with_template(t).unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> ")
    }

    /// A label that leaves the bar line shorter than the terminal (the rest of it takes about
    /// 72 columns): its first word and its end (the file name) are kept.
    fn fit(label: &str) -> String {
        let room = (console::Term::stderr().size().1 as usize).saturating_sub(74).max(16);
        let n = label.chars().count();
        if n <= room {
            return label.to_string();
        }
        let head = match label.split_once(' ') {
            Some((w, _)) if w.len() + 8 < room => format!("{w} ..."),
            _ => "...".to_string(),
        };
        let tail: String = label.chars().skip(n - (room - head.len())).collect();
        format!("{head}{tail}")
    }
}

/// stderr for indicatif, with one change: the bar line is not padded to the last column.
/// indicatif pads it so that the next print starts a new row; but then anything the terminal
/// echoes (`^C` when the person presses Ctrl-C, a key typed) wraps into the next row, the next
/// clear misses the bar's row and a half-drawn bar stays on the screen. Every print here clears
/// the bar first, so the padding is not needed.
#[derive(Debug)]
struct Stderr(console::Term);

impl TermLike for Stderr {
    fn width(&self) -> u16 {
        self.0.size().1.saturating_sub(1).max(20)
    }
    fn height(&self) -> u16 {
        self.0.size().0
    }
    fn move_cursor_up(&self, n: usize) -> std::io::Result<()> {
        self.0.move_cursor_up(n)
    }
    fn move_cursor_down(&self, n: usize) -> std::io::Result<()> {
        self.0.move_cursor_down(n)
    }
    fn move_cursor_right(&self, n: usize) -> std::io::Result<()> {
        self.0.move_cursor_right(n)
    }
    fn move_cursor_left(&self, n: usize) -> std::io::Result<()> {
        self.0.move_cursor_left(n)
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.0.write_line(s)
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        // The padding after the last line is all spaces: dropped.
        if !s.is_empty() && s.bytes().all(|b| b == b' ') {
            return Ok(());
        }
        self.0.write_str(s)
    }
    fn clear_line(&self) -> std::io::Result<()> {
        self.0.clear_line()
    }
    fn flush(&self) -> std::io::Result<()> {
        self.0.flush()
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
            self.line(&format!("{} {}", self.paint(YELLOW, "WARNING:"), esc(text)));
        } else {
            self.line(&esc(text));
        }
    }

    fn phase(&self, p: &Phase) {
        if !self.draw {
            return;
        }
        self.clear();
        self.line(&self.paint(BOLD, &format!("==> {}", esc(&p.to_string()))));
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
            let target = ProgressDrawTarget::term_like_with_hz(Box::new(Stderr(console::Term::stderr())), 10);
            let b = ProgressBar::with_draw_target(Some(total.unwrap_or(0)), target);
            b.set_style(Terminal::style(total));
            b.set_message(Terminal::fit(&esc(label)));
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
        eprint!("{}\nType '{word}' to continue: ", affa::untrusted::terminal_safe(question));
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        // A closed stdin answers "" (cancelled).
        let _ = std::io::stdin().lock().read_line(&mut answer);
        Some(answer)
    }
}
