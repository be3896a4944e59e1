//! The affa agent protocol, version 1 (docs/PROTOCOL.md): length-prefixed binary frames on the
//! agent's stdin/stdout, the messages, their limits, and the handshake.
//!
//! Owns: the byte layout of every frame and message (encode and decode), the protocol's limits
//! (`MAX_FRAME`, path and text lengths, the window), and `handshake`. Both affa-agent and affa's
//! client (`affa_store::chunk::remote`) use it, so the two ends cannot disagree.
//! Must never: trust a length from the peer (the peer may be hostile in both directions: a
//! compromised source host talks to affa), allocate more than `MAX_FRAME` bytes for a frame
//! whatever the peer sends, panic on any input, or print.

use std::fmt;
use std::io::{self, Read, Write};

/// Opens every `HELLO`.
pub const MAGIC: &[u8; 8] = b"AFFAAGNT";
/// The protocol version this crate speaks.
pub const VERSION: u32 = 1;
/// Largest frame (type byte + body): a chunk file of the largest chunk plus the fixed fields.
pub const MAX_FRAME: usize = (16 << 20) + (64 << 10);
/// Longest path in a request.
pub const MAX_PATH: usize = 4096;
/// Longest `software` string of a `HELLO`.
pub const MAX_SOFTWARE: usize = 256;
/// Longest message text (`ERROR`, `FAULT`).
pub const MAX_TEXT: usize = 4096;
/// Largest window an agent may announce.
pub const MAX_WINDOW: u32 = 1024;
/// Entries of the previous manifest per `PREV` frame (and of the manifest per `RMANIFEST`
/// frame) when affa sends them.
pub const PREV_PER_FRAME: usize = 65536;
/// Ranges per `RANGES` frame when affa sends them.
pub const RANGES_PER_FRAME: usize = 65536;

/// Message type bytes.
pub mod ty {
    pub const HELLO: u8 = 0x01;
    pub const ERROR: u8 = 0x02;
    pub const BYE: u8 = 0x03;
    pub const BACKUP: u8 = 0x10;
    pub const PREV: u8 = 0x11;
    pub const RANGES: u8 = 0x12;
    pub const START: u8 = 0x13;
    pub const OPENED: u8 = 0x14;
    pub const CHUNK: u8 = 0x15;
    pub const ANSWER: u8 = 0x16;
    pub const DATA: u8 = 0x17;
    pub const END: u8 = 0x18;
    pub const FAULT: u8 = 0x19;
    pub const RESTORE: u8 = 0x20;
    pub const RMANIFEST: u8 = 0x21;
    pub const RNEED: u8 = 0x22;
    pub const RDATA: u8 = 0x23;
    pub const ROPENED: u8 = 0x24;
    pub const RDONE: u8 = 0x25;
    pub const RABORT: u8 = 0x26;
}

/// A protocol failure.
#[derive(Debug)]
pub enum Error {
    /// Reading or writing the pipe failed.
    Io(io::Error),
    /// The peer closed the stream where a frame was expected.
    Eof,
    /// The peer sent something this protocol does not allow (the text says what).
    Protocol(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => write!(f, "{e}"),
            Error::Eof => f.write_str("the peer closed the connection"),
            Error::Protocol(s) => f.write_str(s),
        }
    }
}

impl std::error::Error for Error {}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Error::Eof
        } else {
            Error::Io(e)
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

fn bad(s: impl Into<String>) -> Error {
    Error::Protocol(s.into())
}

/// Peer text made harmless for one log line: control characters escaped, at most 300 chars.
pub fn shown(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i >= 300 {
            out.push_str("...");
            break;
        }
        // The control characters, and the invisible ones that change a line's layout (the
        // bidirectional controls, the line and paragraph separators): as affa_core's
        // `is_escaped_char` (this crate depends on nothing).
        if c.is_control()
            || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Peer bytes shown as text (invalid UTF-8 replaced, controls escaped).
pub fn shown_bytes(b: &[u8]) -> String {
    shown(&String::from_utf8_lossy(b))
}

/// What the agent found for one chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkKind {
    /// Every byte is zero (or the chunk lies in a hole).
    Zero,
    /// Same BLAKE3 as the previous manifest's id at this index.
    Same,
    /// Its BLAKE3.
    Hash([u8; 32]),
}

/// The stat of the file being read (`OPENED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Opened {
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, u32),
    pub atime: (i64, u32),
    pub window: u32,
}

/// The end of a backup (`END`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct End {
    pub size: u64,
    pub mtime: (i64, u32),
    /// BLAKE3 of the whole file; None for a ranged read.
    pub file_hash: Option<[u8; 32]>,
    pub bytes_read: u64,
    pub chunks_sent: u64,
}

/// The request of a backup (`BACKUP`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backup {
    pub path: Vec<u8>,
    pub chunk_size: u32,
    /// 0 none, 1 zstd, 2 lz4.
    pub compression: u8,
    pub level: u8,
    pub prev_count: u64,
    pub ranged: bool,
}

/// The request of a restore (`RESTORE`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restore {
    /// The target, absolute.
    pub path: Vec<u8>,
    pub size: u64,
    pub chunk_size: u32,
    pub mode: u32,
    /// Applied only when the agent runs as root; `u32::MAX` leaves it.
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, u32),
    pub atime: (i64, u32),
    pub file_hash: [u8; 32],
    /// Manifest entries that follow (`RMANIFEST`).
    pub count: u64,
    /// Compare an existing regular target and copy its equal chunks locally.
    pub compare: bool,
    /// Leave an existing regular target whose mtime is newer than `mtime` as it is (rsync's
    /// `--update`): the answer is then an `RDONE` with `skipped`.
    pub keep_newer: bool,
}

/// The end of a restore (`RDONE`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RDone {
    pub chunks_received: u64,
    pub bytes_received: u64,
    pub chunks_local: u64,
    pub bytes_local_read: u64,
    /// The target was newer and left as it is (`keep_newer`); nothing was written.
    pub skipped: bool,
}

/// Why a backup or a restore failed at the agent (`FAULT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    Vanished = 1,
    NotRegular = 2,
    Open = 3,
    Read = 4,
    Shrank = 5,
    Grew = 6,
    Modified = 7,
    Replaced = 8,
    BadRequest = 9,
    Internal = 10,
    Write = 11,
    BadData = 12,
    Aborted = 13,
}

impl FaultKind {
    fn from_u8(b: u8) -> Option<FaultKind> {
        use FaultKind::*;
        Some(match b {
            1 => Vanished,
            2 => NotRegular,
            3 => Open,
            4 => Read,
            5 => Shrank,
            6 => Grew,
            7 => Modified,
            8 => Replaced,
            9 => BadRequest,
            10 => Internal,
            11 => Write,
            12 => BadData,
            13 => Aborted,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        use FaultKind::*;
        match self {
            Vanished => "vanished",
            NotRegular => "not a regular file",
            Open => "cannot open",
            Read => "read error",
            Shrank => "shrank while read",
            Grew => "grew while read",
            Modified => "modified while read",
            Replaced => "replaced while read",
            BadRequest => "bad request",
            Internal => "agent failure",
            Write => "write error",
            BadData => "bad data",
            Aborted => "aborted by affa",
        }
    }
}

/// One message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    /// `software` and `exe_hash` are empty/zero when `version` is not ours (not parsed).
    Hello {
        version: u32,
        software: String,
        exe_hash: [u8; 32],
    },
    Error {
        message: String,
    },
    Bye,
    Backup(Backup),
    /// Entries of the previous manifest from `start`: None = zero chunk, Some(id) = stored.
    Prev {
        start: u64,
        entries: Vec<Option<[u8; 32]>>,
    },
    Ranges(Vec<(u64, u64)>),
    Start,
    Opened(Opened),
    Chunk {
        index: u64,
        kind: ChunkKind,
    },
    Answer {
        index: u64,
        need: bool,
    },
    /// The chunk file (docs/FORMAT.md, chunk file version 1) of chunk `index`.
    Data {
        index: u64,
        blob: Vec<u8>,
    },
    End(End),
    Fault {
        kind: FaultKind,
        offset: u64,
        message: String,
    },
    Restore(Restore),
    /// Entries of the manifest to restore from `start`: None = zero chunk, Some(id) = stored.
    RManifest {
        start: u64,
        entries: Vec<Option<[u8; 32]>>,
    },
    RNeed {
        index: u64,
    },
    /// The chunk file of chunk `index`, as the archive stores it.
    RData {
        index: u64,
        blob: Vec<u8>,
    },
    ROpened {
        window: u32,
        compared: bool,
    },
    RDone(RDone),
    RAbort {
        message: String,
    },
}

impl Msg {
    pub fn type_byte(&self) -> u8 {
        match self {
            Msg::Hello { .. } => ty::HELLO,
            Msg::Error { .. } => ty::ERROR,
            Msg::Bye => ty::BYE,
            Msg::Backup(_) => ty::BACKUP,
            Msg::Prev { .. } => ty::PREV,
            Msg::Ranges(_) => ty::RANGES,
            Msg::Start => ty::START,
            Msg::Opened(_) => ty::OPENED,
            Msg::Chunk { .. } => ty::CHUNK,
            Msg::Answer { .. } => ty::ANSWER,
            Msg::Data { .. } => ty::DATA,
            Msg::End(_) => ty::END,
            Msg::Fault { .. } => ty::FAULT,
            Msg::Restore(_) => ty::RESTORE,
            Msg::RManifest { .. } => ty::RMANIFEST,
            Msg::RNeed { .. } => ty::RNEED,
            Msg::RData { .. } => ty::RDATA,
            Msg::ROpened { .. } => ty::ROPENED,
            Msg::RDone(_) => ty::RDONE,
            Msg::RAbort { .. } => ty::RABORT,
        }
    }

    /// Short name for error messages.
    pub fn name(&self) -> &'static str {
        type_name(self.type_byte())
    }

    /// The whole frame (length, type, body). Fails when the message would exceed `MAX_FRAME`
    /// or a field its limit (a message this side builds: a bug or an over-long path).
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut b = Vec::with_capacity(64);
        b.extend_from_slice(&[0, 0, 0, 0, self.type_byte()]);
        match self {
            Msg::Hello { version, software, exe_hash } => {
                b.extend_from_slice(MAGIC);
                put_u32(&mut b, *version);
                put_bytes(&mut b, software.as_bytes(), MAX_SOFTWARE, "software")?;
                b.extend_from_slice(exe_hash);
            }
            Msg::Error { message } => put_bytes(&mut b, truncate(message, MAX_TEXT).as_bytes(), MAX_TEXT, "message")?,
            Msg::Bye | Msg::Start => {}
            Msg::Backup(r) => {
                put_path(&mut b, &r.path)?;
                put_u32(&mut b, r.chunk_size);
                b.push(r.compression);
                b.push(r.level);
                put_u64(&mut b, r.prev_count);
                b.push(r.ranged as u8);
            }
            Msg::Prev { start, entries } | Msg::RManifest { start, entries } => put_entries(&mut b, *start, entries),
            Msg::Ranges(rs) => {
                put_u32(&mut b, rs.len() as u32);
                for (s, e) in rs {
                    put_u64(&mut b, *s);
                    put_u64(&mut b, *e);
                }
            }
            Msg::Opened(o) => {
                put_u64(&mut b, o.size);
                put_u32(&mut b, o.mode);
                put_u32(&mut b, o.uid);
                put_u32(&mut b, o.gid);
                put_time(&mut b, o.mtime);
                put_time(&mut b, o.atime);
                put_u32(&mut b, o.window);
            }
            Msg::Chunk { index, kind } => {
                put_u64(&mut b, *index);
                match kind {
                    ChunkKind::Zero => b.push(0),
                    ChunkKind::Same => b.push(1),
                    ChunkKind::Hash(id) => {
                        b.push(2);
                        b.extend_from_slice(id);
                    }
                }
            }
            Msg::Answer { index, need } => {
                put_u64(&mut b, *index);
                b.push(*need as u8);
            }
            Msg::Data { index, blob } | Msg::RData { index, blob } => {
                put_u64(&mut b, *index);
                b.extend_from_slice(blob);
            }
            Msg::End(e) => {
                put_u64(&mut b, e.size);
                put_time(&mut b, e.mtime);
                b.push(e.file_hash.is_some() as u8);
                b.extend_from_slice(&e.file_hash.unwrap_or([0; 32]));
                put_u64(&mut b, e.bytes_read);
                put_u64(&mut b, e.chunks_sent);
            }
            Msg::Fault { kind, offset, message } => {
                b.push(*kind as u8);
                put_u64(&mut b, *offset);
                put_bytes(&mut b, truncate(message, MAX_TEXT).as_bytes(), MAX_TEXT, "message")?;
            }
            Msg::Restore(r) => {
                put_path(&mut b, &r.path)?;
                put_u64(&mut b, r.size);
                put_u32(&mut b, r.chunk_size);
                put_u32(&mut b, r.mode);
                put_u32(&mut b, r.uid);
                put_u32(&mut b, r.gid);
                put_time(&mut b, r.mtime);
                put_time(&mut b, r.atime);
                b.extend_from_slice(&r.file_hash);
                put_u64(&mut b, r.count);
                b.push(r.compare as u8);
                b.push(r.keep_newer as u8);
            }
            Msg::RNeed { index } => put_u64(&mut b, *index),
            Msg::ROpened { window, compared } => {
                put_u32(&mut b, *window);
                b.push(*compared as u8);
            }
            Msg::RDone(d) => {
                put_u64(&mut b, d.chunks_received);
                put_u64(&mut b, d.bytes_received);
                put_u64(&mut b, d.chunks_local);
                put_u64(&mut b, d.bytes_local_read);
                b.push(d.skipped as u8);
            }
            Msg::RAbort { message } => put_bytes(&mut b, truncate(message, MAX_TEXT).as_bytes(), MAX_TEXT, "message")?,
        }
        let len = b.len() - 4;
        if len > MAX_FRAME {
            return Err(bad(format!("{} frame of {len} bytes exceeds the {MAX_FRAME}-byte limit", self.name())));
        }
        b[0..4].copy_from_slice(&(len as u32).to_le_bytes());
        Ok(b)
    }

    /// Decode the body of a frame of type `typ`. Every field is bounds-checked; leftover bytes
    /// are an error.
    pub fn decode(typ: u8, body: &[u8]) -> Result<Msg> {
        let mut c = Cur { b: body, what: type_name(typ) };
        let m = match typ {
            ty::HELLO => {
                if c.take(8)? != MAGIC {
                    return Err(bad("not an affa agent HELLO (bad magic)"));
                }
                let version = c.u32()?;
                if version != VERSION {
                    // The rest of a HELLO of another version is not ours to parse.
                    return Ok(Msg::Hello { version, software: String::new(), exe_hash: [0; 32] });
                }
                let software = c.text(MAX_SOFTWARE)?;
                let exe_hash = c.id()?;
                Msg::Hello { version, software, exe_hash }
            }
            ty::ERROR => Msg::Error { message: c.text(MAX_TEXT)? },
            ty::BYE => Msg::Bye,
            ty::START => Msg::Start,
            ty::BACKUP => {
                let path = c.bytes(MAX_PATH)?.to_vec();
                if path.is_empty() || path.contains(&0) {
                    return Err(bad("BACKUP: empty path or path with NUL"));
                }
                Msg::Backup(Backup {
                    path,
                    chunk_size: c.u32()?,
                    compression: c.u8()?,
                    level: c.u8()?,
                    prev_count: c.u64()?,
                    ranged: c.flag()?,
                })
            }
            ty::PREV => {
                let (start, entries) = c.entries()?;
                Msg::Prev { start, entries }
            }
            ty::RMANIFEST => {
                let (start, entries) = c.entries()?;
                Msg::RManifest { start, entries }
            }
            ty::RANGES => {
                let n = c.u32()? as usize;
                if n.checked_mul(16) != Some(c.b.len()) {
                    return Err(bad(format!("RANGES: {n} ranges in {} bytes", c.b.len())));
                }
                let mut rs = Vec::with_capacity(n);
                for _ in 0..n {
                    rs.push((c.u64()?, c.u64()?));
                }
                Msg::Ranges(rs)
            }
            ty::OPENED => Msg::Opened(Opened {
                size: c.u64()?,
                mode: c.u32()?,
                uid: c.u32()?,
                gid: c.u32()?,
                mtime: c.time()?,
                atime: c.time()?,
                window: c.u32()?,
            }),
            ty::CHUNK => {
                let index = c.u64()?;
                let kind = match c.u8()? {
                    0 => ChunkKind::Zero,
                    1 => ChunkKind::Same,
                    2 => ChunkKind::Hash(c.id()?),
                    k => return Err(bad(format!("CHUNK: bad kind {k}"))),
                };
                Msg::Chunk { index, kind }
            }
            ty::ANSWER => Msg::Answer { index: c.u64()?, need: c.flag()? },
            ty::DATA | ty::RDATA => {
                let index = c.u64()?;
                let blob = c.b.to_vec();
                c.b = &[];
                if typ == ty::DATA {
                    Msg::Data { index, blob }
                } else {
                    Msg::RData { index, blob }
                }
            }
            ty::RESTORE => {
                let path = c.bytes(MAX_PATH)?.to_vec();
                if path.is_empty() || path.contains(&0) {
                    return Err(bad("RESTORE: empty path or path with NUL"));
                }
                Msg::Restore(Restore {
                    path,
                    size: c.u64()?,
                    chunk_size: c.u32()?,
                    mode: c.u32()?,
                    uid: c.u32()?,
                    gid: c.u32()?,
                    mtime: c.time()?,
                    atime: c.time()?,
                    file_hash: c.id()?,
                    count: c.u64()?,
                    compare: c.flag()?,
                    keep_newer: c.flag()?,
                })
            }
            ty::RNEED => Msg::RNeed { index: c.u64()? },
            ty::ROPENED => Msg::ROpened { window: c.u32()?, compared: c.flag()? },
            ty::RDONE => Msg::RDone(RDone {
                chunks_received: c.u64()?,
                bytes_received: c.u64()?,
                chunks_local: c.u64()?,
                bytes_local_read: c.u64()?,
                skipped: c.flag()?,
            }),
            ty::RABORT => Msg::RAbort { message: c.text(MAX_TEXT)? },
            ty::END => {
                let size = c.u64()?;
                let mtime = c.time()?;
                let has = c.flag()?;
                let h = c.id()?;
                Msg::End(End { size, mtime, file_hash: has.then_some(h), bytes_read: c.u64()?, chunks_sent: c.u64()? })
            }
            ty::FAULT => {
                let k = c.u8()?;
                let kind = FaultKind::from_u8(k).ok_or_else(|| bad(format!("FAULT: unknown kind {k}")))?;
                Msg::Fault { kind, offset: c.u64()?, message: c.text(MAX_TEXT)? }
            }
            t => return Err(bad(format!("unknown message type 0x{t:02x}"))),
        };
        if !c.b.is_empty() {
            return Err(bad(format!("{}: {} bytes after the last field", c.what, c.b.len())));
        }
        Ok(m)
    }
}

/// Name of a message type, for errors.
pub fn type_name(t: u8) -> &'static str {
    match t {
        ty::HELLO => "HELLO",
        ty::ERROR => "ERROR",
        ty::BYE => "BYE",
        ty::BACKUP => "BACKUP",
        ty::PREV => "PREV",
        ty::RANGES => "RANGES",
        ty::START => "START",
        ty::OPENED => "OPENED",
        ty::CHUNK => "CHUNK",
        ty::ANSWER => "ANSWER",
        ty::DATA => "DATA",
        ty::END => "END",
        ty::FAULT => "FAULT",
        ty::RESTORE => "RESTORE",
        ty::RMANIFEST => "RMANIFEST",
        ty::RNEED => "RNEED",
        ty::RDATA => "RDATA",
        ty::ROPENED => "ROPENED",
        ty::RDONE => "RDONE",
        ty::RABORT => "RABORT",
        _ => "unknown",
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn put_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put_time(b: &mut Vec<u8>, t: (i64, u32)) {
    b.extend_from_slice(&t.0.to_le_bytes());
    put_u32(b, t.1);
}
fn put_bytes(b: &mut Vec<u8>, v: &[u8], max: usize, what: &str) -> Result<()> {
    if v.len() > max {
        return Err(bad(format!("{what} of {} bytes exceeds the {max}-byte limit", v.len())));
    }
    put_u32(b, v.len() as u32);
    b.extend_from_slice(v);
    Ok(())
}
/// `PREV` / `RMANIFEST` body: start, count, tagged entries.
fn put_entries(b: &mut Vec<u8>, start: u64, entries: &[Option<[u8; 32]>]) {
    put_u64(b, start);
    put_u32(b, entries.len() as u32);
    for e in entries {
        match e {
            None => b.push(0),
            Some(id) => {
                b.push(1);
                b.extend_from_slice(id);
            }
        }
    }
}
fn put_path(b: &mut Vec<u8>, p: &[u8]) -> Result<()> {
    if p.is_empty() || p.contains(&0) {
        return Err(bad("a path must be non-empty and hold no NUL"));
    }
    put_bytes(b, p, MAX_PATH, "path")
}

/// A bounds-checked reader over one frame's body.
struct Cur<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.b.len() {
            return Err(bad(format!("{} frame truncated: needs {n} more bytes, has {}", self.what, self.b.len())));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn flag(&mut self) -> Result<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(bad(format!("{}: flag byte {v}, expected 0 or 1", self.what))),
        }
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap_or([0; 4])))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap_or([0; 8])))
    }
    fn time(&mut self) -> Result<(i64, u32)> {
        let s = self.u64()? as i64;
        let ns = self.u32()?;
        if ns >= 1_000_000_000 {
            return Err(bad(format!("{}: nanoseconds {ns} out of range", self.what)));
        }
        Ok((s, ns))
    }
    fn id(&mut self) -> Result<[u8; 32]> {
        let mut id = [0u8; 32];
        id.copy_from_slice(self.take(32)?);
        Ok(id)
    }
    fn bytes(&mut self, max: usize) -> Result<&'a [u8]> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(bad(format!("{}: a field of {n} bytes exceeds its {max}-byte limit", self.what)));
        }
        self.take(n)
    }
    fn text(&mut self, max: usize) -> Result<String> {
        Ok(String::from_utf8_lossy(self.bytes(max)?).into_owned())
    }
    /// `PREV` / `RMANIFEST` body.
    fn entries(&mut self) -> Result<(u64, Vec<Option<[u8; 32]>>)> {
        let start = self.u64()?;
        let n = self.u32()? as usize;
        // Each entry is at least one byte: a count the frame cannot hold is refused before
        // anything is allocated.
        if n == 0 || n > self.b.len() {
            return Err(bad(format!("{}: {n} entries in {} bytes", self.what, self.b.len())));
        }
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            entries.push(match self.u8()? {
                0 => None,
                1 => Some(self.id()?),
                t => return Err(bad(format!("{}: bad entry tag {t}", self.what))),
            });
        }
        Ok((start, entries))
    }
}

/// Reads frames from the peer. Its buffer grows to the largest frame received, never above
/// `MAX_FRAME`.
pub struct FrameReader<R> {
    r: R,
    buf: Vec<u8>,
    /// Bytes of frames read so far (lengths included).
    pub bytes_in: u64,
    /// Before the first frame only (the handshake): a bad length is shown with what follows it
    /// (one more read), since the peer is then probably a shell printing text.
    show_more: bool,
}

impl<R: Read> FrameReader<R> {
    pub fn new(r: R) -> Self {
        FrameReader { r, buf: Vec::new(), bytes_in: 0, show_more: true }
    }

    /// The next frame's type and body, or None at a clean end of stream (before any byte of a
    /// frame).
    pub fn next_raw(&mut self) -> Result<Option<(u8, &[u8])>> {
        let mut len = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            match self.r.read(&mut len[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(Error::Eof),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let n = u32::from_le_bytes(len) as usize;
        let show_more = std::mem::replace(&mut self.show_more, false);
        if n == 0 || n > MAX_FRAME {
            let mut more = [0u8; 60];
            // Mid-session a read could block: the peer may be waiting for us.
            let k = if show_more { self.r.read(&mut more).unwrap_or(0) } else { 0 };
            let mut first = len.to_vec();
            first.extend_from_slice(&more[..k]);
            return Err(bad(format!(
                "bad frame length {n} (limit {MAX_FRAME}); the stream starts with '{}'",
                shown_bytes(&first)
            )));
        }
        self.buf.clear();
        self.buf.resize(n, 0);
        self.r.read_exact(&mut self.buf)?;
        self.bytes_in += 4 + n as u64;
        Ok(Some((self.buf[0], &self.buf[1..])))
    }

    /// The next message, or None at a clean end of stream.
    pub fn read_msg(&mut self) -> Result<Option<Msg>> {
        match self.next_raw()? {
            None => Ok(None),
            Some((t, body)) => Msg::decode(t, body).map(Some),
        }
    }

    /// The next message; end of stream is an error.
    pub fn expect(&mut self) -> Result<Msg> {
        self.read_msg()?.ok_or(Error::Eof)
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.r
    }
}

/// Writes frames to the peer, flushing each one (the peer may be waiting for it).
pub struct FrameWriter<W> {
    w: W,
    /// Bytes of frames written so far.
    pub bytes_out: u64,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(w: W) -> Self {
        FrameWriter { w, bytes_out: 0 }
    }

    pub fn send(&mut self, m: &Msg) -> Result<()> {
        self.send_noflush(m)?;
        self.w.flush()?;
        Ok(())
    }

    /// Write without flushing (call `flush` after a batch).
    pub fn send_noflush(&mut self, m: &Msg) -> Result<()> {
        let b = m.encode()?;
        self.w.write_all(&b)?;
        self.bytes_out += b.len() as u64;
        Ok(())
    }

    pub fn flush(&mut self) -> Result<()> {
        self.w.flush().map_err(Error::from)
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.w
    }
}

/// Send our `HELLO` and read the peer's. Returns the peer's software string and exe hash.
/// A version mismatch is an error saying both versions; when `send_error_on_mismatch` (the
/// agent's side) the peer is told with an `ERROR` frame first.
pub fn handshake<R: Read, W: Write>(
    r: &mut FrameReader<R>,
    w: &mut FrameWriter<W>,
    software: &str,
    exe_hash: [u8; 32],
    send_error_on_mismatch: bool,
) -> Result<(String, [u8; 32])> {
    w.send(&Msg::Hello { version: VERSION, software: software.to_string(), exe_hash })?;
    let first = match r.next_raw() {
        Ok(Some(f)) => f,
        Ok(None) => return Err(bad("the peer closed the connection before its HELLO")),
        Err(Error::Protocol(m)) => return Err(bad(format!("not an affa agent protocol peer: {m}"))),
        Err(e) => return Err(e),
    };
    match Msg::decode(first.0, first.1) {
        Ok(Msg::Hello { version, software, exe_hash }) => {
            if version != VERSION {
                let msg = format!("protocol version {version} not supported: this side speaks version {VERSION}");
                if send_error_on_mismatch {
                    let _ = w.send(&Msg::Error { message: msg.clone() });
                }
                return Err(bad(msg));
            }
            Ok((software, exe_hash))
        }
        Ok(Msg::Error { message }) => Err(bad(format!("the peer refused: {}", shown(&message)))),
        Ok(m) => Err(bad(format!("expected HELLO, received {}", m.name()))),
        Err(e) => Err(bad(format!("not an affa agent protocol peer: {e}"))),
    }
}

#[cfg(test)]
mod tests;
