//! The offsite key and sealed objects (docs/FORMAT.md "Offsite bucket layout, version 1").
//!
//! Owns: the key file (read with its checks, made once), the keys derived from it, the object
//! names of chunks and archive indexes, and sealing and opening objects (XChaCha20-Poly1305, the
//! object's name bound as associated data), and the check of the private files the offsite keys
//! name (key file, credentials file). Must never: write the key anywhere but its own new file
//! (the caller shows it once), accept a private file that group or others may read or another
//! user owns, or open an object under another name than the one it was sealed for.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};

use crate::chunk::{id_hex, parse_id, ChunkId};
use crate::error::{IoContext, Result};

const KEY_MAGIC: &str = "affa-offsite-key 1";
const OBJECT_MAGIC: &[u8; 4] = b"AFOB";
const OBJECT_VERSION: u8 = 1;
/// magic, version, 3 zero bytes, 24-byte nonce.
const HEADER_LEN: usize = 32;
const TAG_LEN: usize = 16;

/// The contents of a file only root may read (`what` names it in errors: `offsiteKeyFile of job
/// web`); None when it does not exist. Refused: another owner than this process's user, a mode
/// that lets group or others read or write it, not a regular file, over 64 KiB.
pub fn read_private(path: &Path, what: &str) -> Result<Option<String>> {
    let md = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).ctx(|| format!("cannot read {what} {}", path.display())),
    };
    if !md.file_type().is_file() {
        bail!(Config, "{what} {} is not a regular file; expected a file of mode 0600", path.display());
    }
    let euid = rustix::process::geteuid().as_raw();
    if md.uid() != euid {
        bail!(
            Config,
            "{what} {} is owned by uid {}; expected it owned by uid {euid} (root), mode 0600",
            path.display(),
            md.uid()
        );
    }
    if md.mode() & 0o077 != 0 {
        bail!(
            Config,
            "{what} {} may be read or changed by group or others (mode {:o}); expected mode 0600: run chmod 600 {}",
            path.display(),
            md.mode() & 0o777,
            path.display()
        );
    }
    let mut s = String::new();
    fs::File::open(path)
        .and_then(|f| f.take(64 << 10).read_to_string(&mut s))
        .ctx(|| format!("cannot read {what} {}", path.display()))?;
    Ok(Some(s))
}

/// The 32-byte key of `path` (`offsiteKeyFile`), None when the file does not exist.
pub fn read_key(path: &Path, job: &str) -> Result<Option<[u8; 32]>> {
    let what = format!("offsiteKeyFile of job {job}");
    let Some(text) = read_private(path, &what)? else { return Ok(None) };
    let bad = |why: &str| -> crate::Error {
        crate::Error::config(format!(
            "{what} {} {why}; expected the lines '{KEY_MAGIC}', 'created TIME' and 'key' + 64 hex digits (docs/FORMAT.md)",
            path.display()
        ))
    };
    let mut lines = text.lines();
    if lines.next() != Some(KEY_MAGIC) {
        return Err(bad("does not start with the line 'affa-offsite-key 1'"));
    }
    let mut key = None;
    for l in lines {
        match l.split_once(' ') {
            Some(("created", _)) => {}
            Some(("key", hex)) if key.is_none() => {
                key = Some(parse_id(hex.trim()).ok_or_else(|| bad("has a key that is not 64 lowercase hex digits"))?)
            }
            _ if l.trim().is_empty() => {}
            _ => {
                return Err(bad(&format!(
                    "has an unknown or repeated line '{}'",
                    l.chars().take(40).collect::<String>()
                )))
            }
        }
    }
    key.map(Some).ok_or_else(|| bad("has no key line"))
}

/// Make a new key file at `path` (mode 0600, created exclusively: an existing one is never
/// replaced) and return the key and the file's text (for the admin to keep elsewhere).
pub fn create_key(path: &Path, created: &str) -> Result<([u8; 32], String)> {
    let mut key = [0u8; 32];
    fill_random(&mut key)?;
    let text = format!("{KEY_MAGIC}\ncreated {created}\nkey {}\n", id_hex(&key));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .ctx(|| format!("cannot create offsiteKeyFile {}", path.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .ctx(|| format!("cannot write offsiteKeyFile {}", path.display()))?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir).and_then(|d| d.sync_all()).ctx(|| format!("cannot sync {}", dir.display()))?;
    }
    Ok((key, text))
}

fn fill_random(b: &mut [u8]) -> Result<()> {
    let mut filled = 0;
    while filled < b.len() {
        filled += rustix::rand::getrandom(&mut b[filled..], rustix::rand::GetRandomFlags::empty())
            .map_err(std::io::Error::from)
            .ctx(|| "cannot get random bytes".to_string())?;
    }
    Ok(())
}

/// The keys derived from an offsite key: object names and object encryption.
pub struct Keys {
    names: [u8; 32],
    cipher: XChaCha20Poly1305,
}

impl Keys {
    pub fn new(master: &[u8; 32]) -> Keys {
        let names = blake3::derive_key("affa offsite v1 object names", master);
        let enc = blake3::derive_key("affa offsite v1 object encryption", master);
        Keys { names, cipher: XChaCha20Poly1305::new(Key::from_slice(&enc)) }
    }

    fn keyed(&self, parts: &[&[u8]]) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.names);
        for p in parts {
            h.update(p);
        }
        h.finalize()
    }

    /// `c/<64 hex>`: the object of a chunk.
    pub fn chunk_name(&self, id: &ChunkId) -> String {
        format!("c/{}", self.keyed(&[b"c", id]).to_hex())
    }

    /// `i/<32 hex>/`: where the indexes of a job's archives are.
    pub fn job_dir(&self, job: &str) -> String {
        format!("i/{}/", &self.keyed(&[b"j", job.as_bytes()]).to_hex()[..32])
    }

    /// `i/<32 hex>/<64 hex>`: the index of the archive `archive_id` (hex) of `job`.
    pub fn index_name(&self, job: &str, archive_id: &str) -> String {
        let h = self.keyed(&[b"a", job.as_bytes(), b"\0", archive_id.as_bytes()]);
        format!("{}{}", self.job_dir(job), h.to_hex())
    }

    /// `lock/KIND-<32 hex>`: the marker of a running upload or cleanup, named by a keyed hash
    /// of `parts` (the host, and the job of an upload): a rerun on the same host replaces the
    /// marker a killed run left.
    pub fn marker_name(&self, kind: &str, parts: &[&[u8]]) -> String {
        let mut all: Vec<&[u8]> = vec![b"m", kind.as_bytes()];
        for p in parts {
            all.push(b"\0");
            all.push(p);
        }
        format!("lock/{kind}-{}", &self.keyed(&all).to_hex()[..32])
    }

    fn aad(header: &[u8], name: &str) -> Vec<u8> {
        let mut aad = header[..8].to_vec();
        aad.extend_from_slice(name.as_bytes());
        aad
    }

    /// The object `name` (below the prefix) holding `plain`, sealed.
    pub fn seal(&self, name: &str, plain: &[u8]) -> Result<Vec<u8>> {
        let mut out = vec![0u8; HEADER_LEN];
        out[..4].copy_from_slice(OBJECT_MAGIC);
        out[4] = OBJECT_VERSION;
        fill_random(&mut out[8..HEADER_LEN])?;
        let nonce = XNonce::clone_from_slice(&out[8..HEADER_LEN]);
        let aad = Self::aad(&out, name);
        let sealed = self
            .cipher
            .encrypt(&nonce, Payload { msg: plain, aad: &aad })
            .map_err(|_| crate::Error::new(format!("cannot encrypt offsite object {name}")))?;
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// The plaintext of the object `name`; Err says why it does not open (damaged, another
    /// name's object, another key).
    pub fn open(&self, name: &str, sealed: &[u8]) -> std::result::Result<Vec<u8>, String> {
        if sealed.len() < HEADER_LEN + TAG_LEN || &sealed[..4] != OBJECT_MAGIC {
            return Err("not an affa offsite object (no AFOB header)".into());
        }
        if sealed[4] != OBJECT_VERSION || sealed[5..8] != [0, 0, 0] {
            return Err(format!("object version {} (this affa reads version {OBJECT_VERSION})", sealed[4]));
        }
        let nonce = XNonce::from_slice(&sealed[8..HEADER_LEN]);
        let aad = Self::aad(sealed, name);
        self.cipher
            .decrypt(nonce, Payload { msg: &sealed[HEADER_LEN..], aad: &aad })
            .map_err(|_| "does not decrypt (damaged, moved from another name, or sealed with another key)".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_object_opens_only_under_its_own_name_and_key() {
        let k = Keys::new(&[7u8; 32]);
        let a = k.chunk_name(&[1u8; 32]);
        let b = k.chunk_name(&[2u8; 32]);
        assert!(a.starts_with("c/") && a.len() == 66 && a != b);
        let s = k.seal(&a, b"secret chunk").unwrap();
        assert!(!s.windows(6).any(|w| w == b"secret"));
        assert_eq!(k.open(&a, &s).unwrap(), b"secret chunk");
        assert!(k.open(&b, &s).is_err(), "an object moved to another name must not open");
        assert!(Keys::new(&[8u8; 32]).open(&a, &s).is_err(), "another key must not open it");
        let mut bent = s.clone();
        *bent.last_mut().unwrap() ^= 1;
        assert!(k.open(&a, &bent).is_err());
        assert_ne!(k.seal(&a, b"x").unwrap(), k.seal(&a, b"x").unwrap(), "a random nonce per object");
        assert!(k.index_name("web", "00").starts_with(&k.job_dir("web")));
        assert_ne!(k.job_dir("web"), k.job_dir("db"));
    }

    #[test]
    fn a_key_file_is_private_and_well_formed() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("offsite.key");
        assert_eq!(read_key(&p, "web").unwrap(), None);
        let (key, text) = create_key(&p, "2026-12-01T05:00:00").unwrap();
        assert!(text.contains(&id_hex(&key)));
        assert_eq!(read_key(&p, "web").unwrap(), Some(key));
        assert!(create_key(&p, "x").is_err(), "an existing key is never replaced");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        let e = read_key(&p, "web").unwrap_err().to_string();
        assert!(e.contains("mode 640") && e.contains("chmod 600"), "{e}");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&p, "affa-offsite-key 1\nkey abc\n").unwrap();
        let e = read_key(&p, "web").unwrap_err().to_string();
        assert!(e.contains("offsiteKeyFile of job web") && e.contains("64 lowercase hex"), "{e}");
    }
}
