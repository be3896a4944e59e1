//! Deterministic, seeded VM-disk-like images and the changes applied to them between runs.
//!
//! An image is a sequence of 4 KiB-aligned segments of 64 KiB to 4 MiB: 40% zeros (left as
//! holes, as on a thin-provisioned disk), 30% random bytes, 30% text-like data (log lines from
//! a fixed vocabulary). Changes overwrite 4 KiB-aligned extents with new random or text data,
//! through a writer the caller gives (the file directly, or a guest write through the
//! simulator, which its Changed Block Tracking sees); every write is read back from the image.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;

/// wyrand: tiny, fast, deterministic.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut r = Rng(seed ^ 0x9e37_79b9_7f4a_7c15);
        r.next();
        r
    }
    #[inline]
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = (self.0 as u128).wrapping_mul((self.0 ^ 0xe703_7ed1_a0b4_28db) as u128);
        ((t >> 64) ^ t) as u64
    }
    /// Uniform in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next() as u128 * n as u128) >> 64) as u64
    }
}

/// A seed derived from a base seed and a label (FNV-1a of the label mixed in).
pub fn derive(seed: u64, label: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in label.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// The fixed vocabulary of the text-like segments (the same for every image, as the same
/// software writes the same words on every VM).
fn vocabulary() -> Vec<Vec<u8>> {
    let mut r = Rng::new(0x7e47);
    let syll: [&[u8]; 32] = [
        b"ar", b"be", b"con", b"de", b"er", b"fi", b"ge", b"ha", b"in", b"jo", b"ka", b"li", b"me", b"no", b"or",
        b"pa", b"qu", b"re", b"st", b"te", b"un", b"ve", b"wa", b"xe", b"yo", b"za", b"tion", b"ing", b"ed", b"ly",
        b"ment", b"s",
    ];
    (0..2048)
        .map(|_| {
            let n = 1 + r.below(4) as usize;
            let mut w = Vec::new();
            for _ in 0..n {
                w.extend_from_slice(syll[r.below(32) as usize]);
            }
            w
        })
        .collect()
}

pub struct Filler {
    words: Vec<Vec<u8>>,
}

impl Default for Filler {
    fn default() -> Self {
        Filler { words: vocabulary() }
    }
}

impl Filler {
    pub fn random(&self, r: &mut Rng, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&r.next().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let v = r.next().to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(&v[..n]);
    }

    /// Log-like lines: a timestamp, a host and process id, 4 to 15 words, sometimes a hex id.
    pub fn text(&self, r: &mut Rng, buf: &mut [u8]) {
        let mut i = 0;
        let len = buf.len();
        let mut ts = 1_760_000_000 + r.below(10_000_000);
        let mut line = Vec::with_capacity(256);
        while i < len {
            line.clear();
            ts += r.below(5);
            let x = r.next();
            line.extend_from_slice(
                format!("{ts}.{:03} vm{:02} svc[{}]:", x % 1000, (x >> 10) % 8, 100 + (x >> 16) % 4000).as_bytes(),
            );
            let words = 4 + (x >> 32) % 12;
            let mut bits = r.next();
            for k in 0..words {
                if k % 5 == 4 {
                    bits = r.next();
                }
                line.push(b' ');
                line.extend_from_slice(&self.words[(bits & 2047) as usize]);
                bits >>= 11;
            }
            if x >> 60 == 0 {
                line.extend_from_slice(format!(" id={:016x}", r.next()).as_bytes());
            }
            line.push(b'\n');
            let n = line.len().min(len - i);
            buf[i..i + n].copy_from_slice(&line[..n]);
            i += n;
        }
    }

    /// New content for a changed extent: random or text, half and half.
    pub fn changed(&self, r: &mut Rng, buf: &mut [u8]) {
        if r.next() & 1 == 0 {
            self.random(r, buf)
        } else {
            self.text(r, buf)
        }
    }
}

/// What an image is made of, for the report.
#[derive(Default, Clone, Debug)]
pub struct Composition {
    pub zero: u64,
    pub random: u64,
    pub text: u64,
}

/// Write a fresh image of `size` bytes (rounded down to 4 KiB) at `path`.
pub fn generate(path: &Path, size: u64, seed: u64, filler: &Filler) -> io::Result<Composition> {
    if let Some(d) = path.parent() {
        fs::create_dir_all(d)?;
    }
    let size = size / (4 * KIB) * (4 * KIB);
    let f = OpenOptions::new().write(true).create(true).truncate(true).open(path)?;
    f.set_len(size)?;
    let mut r = Rng::new(seed);
    let mut buf = vec![0u8; (4 * MIB) as usize];
    let mut off = 0;
    let mut c = Composition::default();
    while off < size {
        // 64 KiB .. 4 MiB in 4 KiB steps.
        let len = ((16 + r.below(1024 - 16 + 1)) * 4 * KIB).min(size - off);
        let kind = r.below(10);
        let b = &mut buf[..len as usize];
        if kind < 4 {
            c.zero += len;
        } else if kind < 7 {
            filler.random(&mut r, b);
            f.write_all_at(b, off)?;
            c.random += len;
        } else {
            filler.text(&mut r, b);
            f.write_all_at(b, off)?;
            c.text += len;
        }
        off += len;
    }
    f.sync_all()?;
    Ok(c)
}

/// Where a change's extents are written: `(offset, bytes)`, the image file itself or a guest
/// write that ends up in it.
pub type Writer<'a> = dyn FnMut(u64, &[u8]) -> io::Result<()> + 'a;

/// A writer straight into the file at `path` (where no simulator serves it).
pub fn direct(path: &Path) -> io::Result<impl FnMut(u64, &[u8]) -> io::Result<()>> {
    let f = OpenOptions::new().write(true).open(path)?;
    Ok(move |off: u64, buf: &[u8]| f.write_all_at(buf, off))
}

/// Overwrite `count` extents of `extent` bytes at random 4 KiB-aligned offsets of the image at
/// `path` through `write`; each extent is read back from `path` and must be what was written
/// (a write that went elsewhere, or a short one, is an error), then the file is synced.
pub fn change(path: &Path, count: u64, extent: u64, seed: u64, filler: &Filler, write: &mut Writer) -> io::Result<u64> {
    let f = File::open(path)?;
    let size = f.metadata()?.len();
    let mut r = Rng::new(seed);
    let mut buf = vec![0u8; extent as usize];
    let mut back = vec![0u8; extent as usize];
    let blocks = (size - extent) / (4 * KIB) + 1;
    for _ in 0..count {
        let off = r.below(blocks) * 4 * KIB;
        filler.changed(&mut r, &mut buf);
        write(off, &buf)?;
        f.read_exact_at(&mut back, off)?;
        if back != buf {
            return Err(io::Error::other(format!(
                "{}: after writing {extent} bytes at offset {off} the file holds other bytes there",
                path.display()
            )));
        }
    }
    f.sync_all()?;
    Ok(count * extent)
}

/// `frac` of the disk as extents of `extent` bytes: 1 MiB (clustered) or 4 KiB (scattered).
pub fn change_frac(
    path: &Path,
    size: u64,
    frac: f64,
    extent: u64,
    seed: u64,
    filler: &Filler,
    write: &mut Writer,
) -> io::Result<u64> {
    let n = ((size as f64 * frac) / extent as f64).round().max(1.0) as u64;
    change(path, n, extent, seed, filler, write)
}

/// Set a file's mtime/atime (so every change is seen by size+mtime checks, deterministically).
pub fn set_mtime(path: &Path, secs: i64) -> io::Result<()> {
    let f = File::open(path)?;
    let t = rustix::fs::Timespec { tv_sec: secs, tv_nsec: 0 };
    rustix::fs::futimens(&f, &rustix::fs::Timestamps { last_access: t, last_modification: t })?;
    Ok(())
}

/// Copy a file keeping its holes (SEEK_DATA / SEEK_HOLE).
pub fn copy_sparse(from: &Path, to: &Path) -> io::Result<()> {
    let src = File::open(from)?;
    let size = src.metadata()?.len();
    let dst = OpenOptions::new().write(true).create(true).truncate(true).open(to)?;
    dst.set_len(size)?;
    let mut off: u64 = 0;
    let mut buf = vec![0u8; (4 * MIB) as usize];
    while off < size {
        let Ok(data) = rustix::fs::seek(&src, rustix::fs::SeekFrom::Data(off)) else { break };
        let end = rustix::fs::seek(&src, rustix::fs::SeekFrom::Hole(data)).unwrap_or(size);
        let mut p = data;
        while p < end {
            let n = ((end - p) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], p)?;
            dst.write_all_at(&buf[..n], p)?;
            p += n as u64;
        }
        off = end;
    }
    dst.sync_all()
}
