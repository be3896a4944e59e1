//! affa-agent: the source-side end of the affa agent protocol (docs/PROTOCOL.md). affa starts it
//! over ssh (`affa-agent --serve`); it reads a big file once, sequentially, skipping holes,
//! hashes its chunks on all cores, and sends only the chunks affa's pool lacks, compressed as
//! the pool stores them; and it restores a chunked file, asking only for the chunks an existing
//! target lacks.
//!
//! Owns: the agent's side of the session (handshake, request checks, the backup of one file,
//! the restore of one file, faults, shutdown), its read of the file, its memory bound (a window
//! of chunks in flight). Must never: write anything on the host but a restore's temp file and
//! its rename over the target, follow a final symlink or a symlink on the way that root does not
//! own (`at.rs`), open a fifo or device, allocate without
//! bound whatever affa sends, panic on any input, or need the environment, NSS or a locale (it
//! is linked statically and runs under `env -i`).

mod at;
mod backup;
mod encode;
mod restore;

use affa_agent_proto::{self as proto, FrameReader, FrameWriter, Msg};
use std::io::{self, BufWriter, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};

pub const SOFTWARE: &str = concat!("affa-agent ", env!("CARGO_PKG_VERSION"));

/// A fatal error: the session ends with an `ERROR` frame and a line on stderr.
pub struct Fatal {
    pub msg: String,
    /// Exit status (1: affa went away mid-request; 2: protocol error).
    pub code: i32,
}

impl Fatal {
    pub fn protocol(msg: impl Into<String>) -> Fatal {
        Fatal { msg: msg.into(), code: 2 }
    }
}

impl From<proto::Error> for Fatal {
    fn from(e: proto::Error) -> Fatal {
        match e {
            proto::Error::Eof => Fatal { msg: "affa closed the connection in the middle of a request".into(), code: 1 },
            proto::Error::Io(e) => Fatal { msg: format!("connection to affa: {e}"), code: 1 },
            proto::Error::Protocol(m) => Fatal::protocol(m),
        }
    }
}

/// Set by the stdin reader when affa's side of the session ended (end of file, a read error):
/// affa died or the ssh link was cut. A backup reading the file stops at its next chunk
/// instead of reading and compressing on until its window of unanswered chunks fills.
static AFFA_GONE: AtomicBool = AtomicBool::new(false);

/// Whether affa's side of the session ended (see [`AFFA_GONE`]).
pub fn affa_gone() -> bool {
    AFFA_GONE.load(Ordering::SeqCst)
}

pub type Out = FrameWriter<BufWriter<io::Stdout>>;
/// Frames from affa, read by a thread of their own so that affa's writes never block while the
/// agent is busy (no pipe deadlock): `Ok(None)` is the end of the stream.
pub type In = Receiver<proto::Result<Option<Msg>>>;

fn main() {
    let args: Vec<String> = std::env::args_os().skip(1).map(|a| a.to_string_lossy().into_owned()).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["--version"] => {
            println!("{SOFTWARE} (protocol {})", proto::VERSION);
        }
        ["--serve"] => {
            let code = serve();
            std::process::exit(code);
        }
        _ => {
            eprintln!("usage: affa-agent --serve | --version (affa starts it over ssh; see docs/PROTOCOL.md)");
            std::process::exit(2);
        }
    }
}

/// BLAKE3 of this executable, or zeros when it cannot be read.
fn exe_hash() -> [u8; 32] {
    match std::fs::read("/proc/self/exe") {
        Ok(b) => *blake3::hash(&b).as_bytes(),
        Err(_) => [0; 32],
    }
}

fn serve() -> i32 {
    let mut out: Out = FrameWriter::new(BufWriter::with_capacity(1 << 16, io::stdout()));
    let mut reader = FrameReader::new(io::stdin());
    let res = match proto::handshake(&mut reader, &mut out, SOFTWARE, exe_hash(), true) {
        Ok(_) => {
            let (tx, rx) = sync_channel(proto::MAX_WINDOW as usize + 64);
            std::thread::spawn(move || loop {
                let m = reader.read_msg();
                let end = !matches!(m, Ok(Some(_)));
                if matches!(m, Ok(None) | Err(proto::Error::Eof) | Err(proto::Error::Io(_))) {
                    AFFA_GONE.store(true, Ordering::SeqCst);
                }
                if tx.send(m).is_err() || end {
                    break;
                }
            });
            session(&rx, &mut out)
        }
        Err(e) => Err(Fatal::from(e)),
    };
    match res {
        Ok(()) => 0,
        Err(f) => {
            if f.code == 2 {
                let _ = out.send(&Msg::Error { message: f.msg.clone() });
            }
            eprintln!("affa-agent: {}", proto::shown(&f.msg));
            f.code
        }
    }
}

/// Serve requests until `BYE` or the end of the stream.
fn session(rx: &In, out: &mut Out) -> Result<(), Fatal> {
    loop {
        let m = match rx.recv() {
            Ok(Ok(Some(m))) => m,
            // End of stream outside a request: affa is done.
            Ok(Ok(None)) | Err(_) => return Ok(()),
            Ok(Err(proto::Error::Eof)) => return Ok(()),
            Ok(Err(e)) => return Err(e.into()),
        };
        match m {
            Msg::Bye => {
                out.send(&Msg::Bye)?;
                return Ok(());
            }
            // Answers, chunk data and aborts affa sent before it read a fault: discarded.
            Msg::Answer { .. } | Msg::RData { .. } | Msg::RAbort { .. } => {}
            Msg::Backup(req) => backup::run(req, rx, out)?,
            Msg::Restore(req) => restore::run(req, rx, out)?,
            m => return Err(Fatal::protocol(format!("unexpected {} outside a request", m.name()))),
        }
    }
}

/// The next frame of a request; the end of the stream is fatal here.
pub fn next_in_request(rx: &In) -> Result<Msg, Fatal> {
    match rx.recv() {
        Ok(Ok(Some(m))) => Ok(m),
        Ok(Ok(None)) | Err(_) => Err(proto::Error::Eof.into()),
        Ok(Err(e)) => Err(e.into()),
    }
}

/// Flush what is buffered for affa (before waiting for it).
pub fn flush(out: &mut Out) -> Result<(), Fatal> {
    out.get_mut().flush().map_err(|e| proto::Error::from(e).into())
}
