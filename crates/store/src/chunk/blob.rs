//! Byte layout of one stored chunk file: a 16-byte header then the payload.
//!
//! Owns: encoding (compress, or keep raw when compression does not pay) and decoding with every
//! length checked against bounds. Must never: touch the filesystem, allocate more than
//! MAX_CHUNK_SIZE for a decoded chunk whatever the header says, or panic on any input.
//!
//! Header (all integers little endian):
//! `0..4 "AFCK"`, `4 version=1`, `5 encoding (0 raw, 1 zstd, 2 lz4)`, `6..8 zero`,
//! `8..12 uncompressed length`, `12..16 payload length` (= file length - 16).

use super::{Compression, MAX_CHUNK_SIZE};

pub const MAGIC: &[u8; 4] = b"AFCK";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 16;

const ENC_RAW: u8 = 0;
const ENC_ZSTD: u8 = 1;
const ENC_LZ4: u8 = 2;

/// Reusable per-thread compression state.
pub struct Encoder {
    comp: Compression,
    zstd: Option<zstd::bulk::Compressor<'static>>,
}

impl Encoder {
    pub fn new(comp: Compression) -> std::io::Result<Encoder> {
        let zstd = match comp {
            Compression::Zstd(l) => Some(zstd::bulk::Compressor::new(l)?),
            _ => None,
        };
        Ok(Encoder { comp, zstd })
    }

    /// Encode `data` into `out` (cleared first). A chunk whose compressed form does not save at
    /// least 1/32 of its size is stored raw.
    pub fn encode(&mut self, data: &[u8], out: &mut Vec<u8>) -> std::io::Result<()> {
        assert!(data.len() <= MAX_CHUNK_SIZE as usize);
        out.clear();
        let bound = match self.comp {
            Compression::None => 0,
            Compression::Lz4 => lz4_flex::block::get_maximum_output_size(data.len()),
            Compression::Zstd(_) => zstd::zstd_safe::compress_bound(data.len()),
        };
        out.resize(HEADER_LEN + bound.max(data.len()), 0);
        let compressed = match self.comp {
            Compression::None => None,
            Compression::Lz4 => lz4_flex::block::compress_into(data, &mut out[HEADER_LEN..]).ok().map(|n| (ENC_LZ4, n)),
            Compression::Zstd(_) => {
                let c = self.zstd.as_mut().expect("zstd compressor");
                Some((ENC_ZSTD, c.compress_to_buffer(data, &mut out[HEADER_LEN..])?))
            }
        };
        let (enc, n) = match compressed {
            Some((enc, n)) if n < data.len() - data.len() / 32 => (enc, n),
            _ => {
                out[HEADER_LEN..HEADER_LEN + data.len()].copy_from_slice(data);
                (ENC_RAW, data.len())
            }
        };
        out.truncate(HEADER_LEN + n);
        out[0..4].copy_from_slice(MAGIC);
        out[4] = VERSION;
        out[5] = enc;
        out[6] = 0;
        out[7] = 0;
        out[8..12].copy_from_slice(&(data.len() as u32).to_le_bytes());
        out[12..16].copy_from_slice(&(n as u32).to_le_bytes());
        Ok(())
    }
}

/// Parsed header: (encoding, uncompressed length, payload length).
pub fn parse_header(h: &[u8]) -> Result<(u8, usize, usize), String> {
    if h.len() < HEADER_LEN {
        return Err(format!("truncated: {} bytes, header needs {HEADER_LEN}", h.len()));
    }
    if &h[0..4] != MAGIC {
        return Err("not a chunk file (bad magic)".into());
    }
    if h[4] != VERSION {
        return Err(format!("unknown chunk format version {}", h[4]));
    }
    let enc = h[5];
    if enc > ENC_LZ4 || h[6] != 0 || h[7] != 0 {
        return Err(format!("bad header (encoding {enc})"));
    }
    let raw = u32::from_le_bytes(h[8..12].try_into().unwrap()) as usize;
    let payload = u32::from_le_bytes(h[12..16].try_into().unwrap()) as usize;
    if raw > MAX_CHUNK_SIZE as usize {
        return Err(format!("uncompressed length {raw} above the 16 MiB limit"));
    }
    if enc == ENC_RAW && payload != raw {
        return Err("raw chunk with payload length != length".into());
    }
    // An encoder stores a chunk compressed only when that saves at least 1/32 of it (always
    // so, in every release): a longer payload is not one it wrote (a host's padding, e.g. zstd
    // skippable frames, stored and shared in the pool).
    if enc != ENC_RAW && payload >= raw - raw / 32 {
        return Err(format!("compressed payload of {payload} bytes for a chunk of {raw}: not what an encoder writes"));
    }
    Ok((enc, raw, payload))
}

/// The magic number of a zstd frame (format 1.0 and later), as it is stored (little-endian).
const ZSTD_MAGIC: [u8; 4] = 0xFD2F_B528u32.to_le_bytes();

/// Decode a whole chunk file into `out` (resized to the uncompressed length).
pub fn decode(blob: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
    let (enc, raw, payload) = parse_header(blob)?;
    if blob.len() - HEADER_LEN != payload {
        return Err(format!(
            "truncated or extended: payload is {} bytes, header says {payload}",
            blob.len() - HEADER_LEN
        ));
    }
    let src = &blob[HEADER_LEN..];
    out.clear();
    out.resize(raw, 0);
    let n = match enc {
        ENC_RAW => {
            out.copy_from_slice(src);
            raw
        }
        ENC_ZSTD => {
            // A zstd frame of the current format (magic 0xFD2FB528): never a legacy one (the
            // pre-1.0 formats' decoders are old code no encoder of ours needs), nor a skippable
            // frame first.
            if !src.starts_with(&ZSTD_MAGIC) {
                return Err("zstd payload does not start with a zstd frame (magic 0xFD2FB528)".into());
            }
            // Exactly one frame, the whole payload (the decoder would skip skippable frames
            // and go on through concatenated ones).
            if zstd::zstd_safe::find_frame_compressed_size(src) != Ok(src.len()) {
                return Err("zstd payload is not exactly one frame".into());
            }
            zstd::bulk::decompress_to_buffer(src, &mut out[..]).map_err(|e| format!("zstd data corrupt: {e}"))?
        }
        _ => lz4_flex::block::decompress_into(src, &mut out[..]).map_err(|e| format!("lz4 data corrupt: {e}"))?,
    };
    if n != raw {
        return Err(format!("decoded {n} bytes, header says {raw}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chunk file a host could send: a valid zstd frame followed by a skippable frame
    /// (padding the decoder ignores), or a payload no shorter than the chunk: refused.
    #[test]
    fn padding_after_a_zstd_frame_and_a_payload_that_saves_nothing_are_refused() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let mut enc = Encoder::new(Compression::Zstd(3)).unwrap();
        let mut good = Vec::new();
        enc.encode(&data, &mut good).unwrap();
        let mut out = Vec::new();
        decode(&good, &mut out).unwrap();
        assert_eq!(out, data);
        // + a skippable frame (magic 0x184D2A50, length 8, 8 bytes).
        let mut padded = good.clone();
        padded.extend_from_slice(&0x184D_2A50u32.to_le_bytes());
        padded.extend_from_slice(&8u32.to_le_bytes());
        padded.extend_from_slice(&[0u8; 8]);
        let payload = (padded.len() - HEADER_LEN) as u32;
        padded[12..16].copy_from_slice(&payload.to_le_bytes());
        assert!(decode(&padded, &mut out).unwrap_err().contains("not exactly one frame"));
        // A payload padded up to the chunk's length.
        let mut long = good.clone();
        long.resize(HEADER_LEN + data.len(), 0);
        let payload = (long.len() - HEADER_LEN) as u32;
        long[12..16].copy_from_slice(&payload.to_le_bytes());
        assert!(decode(&long, &mut out).unwrap_err().contains("not what an encoder writes"));
        // A frame of a pre-1.0 zstd format (magic 0xFD2FB527, v0.7): its decoder is not reached.
        let mut legacy = good.clone();
        legacy[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&0xFD2F_B527u32.to_le_bytes());
        assert!(decode(&legacy, &mut out).unwrap_err().contains("does not start with a zstd frame"));
        // A skippable frame first, then the real one.
        let mut skip_first = good[..HEADER_LEN].to_vec();
        skip_first.extend_from_slice(&0x184D_2A50u32.to_le_bytes());
        skip_first.extend_from_slice(&0u32.to_le_bytes());
        skip_first.extend_from_slice(&good[HEADER_LEN..]);
        let payload = (skip_first.len() - HEADER_LEN) as u32;
        skip_first[12..16].copy_from_slice(&payload.to_le_bytes());
        assert!(decode(&skip_first, &mut out).unwrap_err().contains("does not start with a zstd frame"));
    }

    fn sample() -> Vec<u8> {
        let mut v = Vec::new();
        for i in 0..100_000u32 {
            v.extend_from_slice(format!("line {} {}\n", i, i % 7).as_bytes());
        }
        v
    }

    #[test]
    fn roundtrip_every_encoding_and_raw_fallback() {
        let text = sample();
        let mut rnd = vec![0u8; 300_000];
        let mut x = 12345u64;
        for b in rnd.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        for comp in [Compression::None, Compression::Lz4, Compression::Zstd(1), Compression::Zstd(19)] {
            let mut e = Encoder::new(comp).unwrap();
            for data in [&text[..], &rnd[..], &[][..], &[7u8][..]] {
                let mut out = Vec::new();
                e.encode(data, &mut out).unwrap();
                let enc = out[5];
                if data.len() > 1000 && comp != Compression::None && data.as_ptr() == text.as_ptr() {
                    assert_ne!(enc, ENC_RAW, "{comp}");
                    assert!(out.len() < data.len() / 2);
                }
                if data.as_ptr() == rnd.as_ptr() {
                    assert_eq!(enc, ENC_RAW, "random data must be stored raw ({comp})");
                }
                let mut back = Vec::new();
                decode(&out, &mut back).unwrap();
                assert_eq!(&back[..], data);
            }
        }
    }

    #[test]
    fn damaged_blobs_are_errors_not_panics() {
        let text = sample();
        for comp in [Compression::None, Compression::Lz4, Compression::Zstd(3)] {
            let mut out = Vec::new();
            Encoder::new(comp).unwrap().encode(&text[..200_000], &mut out).unwrap();
            let mut back = Vec::new();
            for cut in [0, 3, 15, 16, 17, out.len() / 2, out.len() - 1] {
                assert!(decode(&out[..cut], &mut back).is_err());
            }
            // Lying header lengths.
            let mut bad = out.clone();
            bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
            assert!(decode(&bad, &mut back).is_err());
            let mut bad = out.clone();
            bad[8..12].copy_from_slice(&1000u32.to_le_bytes());
            assert!(decode(&bad, &mut back).is_err());
            // Flipped payload bytes either fail to decode or decode to other bytes (the hash
            // check above this layer catches those).
            for pos in [16, 100, out.len() - 1] {
                let mut bad = out.clone();
                bad[pos] ^= 0x40;
                if decode(&bad, &mut back).is_ok() {
                    assert_ne!(&back[..], &text[..200_000]);
                }
            }
        }
    }
}
