//! The files a restored VM's own files name, and the check that every one of them is among the
//! files the restore writes: the disks of the `.vmx` (and of every snapshot in the `.vmsd`, with
//! its `.vmsn`), each descriptor's extents and its `parentFileNameHint`, down to the base of
//! every chain. Also the rewrite of absolute paths in those files for a new place.
//!
//! Owns: reading those references. Must never: read more than [`MAX_READ`] bytes of a file (a
//! bigger `.vmx`, `.vmsd` or descriptor is refused, never read in part: padding past a prefix
//! would hide what it names), pass over a file it cannot read, take a file named where a
//! `.vmx`, `.vmsd` or descriptor is expected for a disk (a chunked one past the limit is
//! refused as too big, not skipped), read a chunked disk as text, follow a link to a file,
//! resolve a reference outside the archived datastores, or panic on what an archive holds (its
//! files came from a host that may be hostile).

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};

/// A file the restore writes: where it was on the source host, and where to read it now.
pub(super) struct VmFile {
    pub ds: String,
    pub dir: String,
    pub name: String,
    pub local: PathBuf,
    /// A chunked file larger than [`MAX_READ`]: a disk (the restore may hold no local copy of
    /// it), never read as text. Named as an extent it is data; named where a `.vmx`, `.vmsd` or
    /// descriptor is expected it is refused as too big to check (with `chunkFiles=*.vmdk` the
    /// descriptors are chunked too, and one padded past the limit could hide a name).
    pub disk: bool,
}

/// Descriptors, `.vmx` and `.vmsd` files are small: a bigger one is refused.
pub(super) const MAX_READ: u64 = 1 << 20;

/// The whole of a `.vmx`, `.vmsd` or disk descriptor (`name` in messages): at most
/// [`MAX_READ`] bytes, opened without following a link. A bigger file, or one that cannot be
/// read, is an error naming it and the limit: the check must see every name it gives.
pub(super) fn read_config(name: &str, p: &Path) -> Result<Vec<u8>, String> {
    let mut buf = Vec::new();
    crate::untrusted::open_regular(p)
        .and_then(|f| f.take(MAX_READ + 1).read_to_end(&mut buf))
        .map_err(|e| format!("{name} cannot be read ({e}); every file the VM names is checked"))?;
    if buf.len() as u64 > MAX_READ {
        return Err(format!(
            "{name} is larger than {MAX_READ} bytes, the most a .vmx, .vmsd or disk descriptor may hold to be checked"
        ));
    }
    Ok(buf)
}

/// `key = "value"` / `key="value"` lines: (key, value).
fn pairs(text: &str) -> impl Iterator<Item = (&str, &str)> {
    text.lines().filter_map(|l| {
        let (k, v) = l.split_once('=')?;
        let v = v.trim();
        let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v);
        Some((k.trim(), v))
    })
}

/// What a `.vmx` names: the disk of each present device.
fn vmx_refs(text: &str) -> Vec<(String, String)> {
    let absent: BTreeSet<String> = pairs(text)
        .filter(|(k, v)| k.to_ascii_lowercase().ends_with(".present") && v.eq_ignore_ascii_case("false"))
        .map(|(k, _)| k[..k.len() - ".present".len()].to_ascii_lowercase())
        .collect();
    pairs(text)
        .filter(|(k, v)| {
            let kl = k.to_ascii_lowercase();
            kl.ends_with(".filename")
                && v.to_ascii_lowercase().ends_with(".vmdk")
                && !absent.contains(&kl[..kl.len() - ".filename".len()])
        })
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// What a `.vmsd` names: each snapshot's `.vmsn` and disks.
fn vmsd_refs(text: &str) -> Vec<(String, String)> {
    pairs(text)
        .filter(|(k, v)| {
            let kl = k.to_ascii_lowercase();
            kl.starts_with("snapshot") && kl.ends_with(".filename") && !v.is_empty()
        })
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// What a disk descriptor names: its extents and its parent (nothing if it is not a text
/// descriptor).
fn descriptor_refs(text: &str) -> Vec<(String, String)> {
    if !text.contains("createType") {
        return Vec::new();
    }
    let mut out = Vec::new();
    for l in text.lines() {
        let l = l.trim();
        let mut w = l.split_whitespace();
        let access = w.next().unwrap_or("");
        if matches!(access, "RW" | "RDONLY" | "NOACCESS") && w.next().is_some_and(|n| n.parse::<u64>().is_ok()) {
            let kind = w.next().unwrap_or("");
            if let (Some(a), Some(b)) = (l.find('"'), l.rfind('"')) {
                if b > a + 1 && kind != "ZERO" {
                    out.push(("extent".to_string(), l[a + 1..b].to_string()));
                }
            }
        }
    }
    for (k, v) in pairs(text) {
        if k == "parentFileNameHint" && !v.is_empty() {
            out.push(("parentFileNameHint".to_string(), v.to_string()));
        }
    }
    out
}

/// Where a name points on the source host: relative to the naming file's directory, or an
/// absolute `/vmfs/volumes/<datastore or its url>/dir/file`. None when it leaves the datastores.
pub(super) fn resolve(name: &str, ds: &str, dir: &str, urls: &[(String, String)]) -> Option<(String, String, String)> {
    let (ds, rest) = if name.starts_with('/') {
        urls.iter().find_map(|(n, url)| {
            let url = url.trim_end_matches('/');
            [format!("{url}/"), format!("/vmfs/volumes/{n}/")]
                .iter()
                .find_map(|p| name.strip_prefix(p.as_str()))
                .map(|r| (n.clone(), r.to_string()))
        })?
    } else if dir.is_empty() {
        (ds.to_string(), name.to_string())
    } else {
        (ds.to_string(), format!("{dir}/{name}"))
    };
    let mut parts: Vec<&str> = Vec::new();
    for c in rest.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    let file = parts.pop()?.to_string();
    Some((ds, parts.join("/"), file))
}

/// What [`walk`] found.
pub(super) struct Walk {
    /// The names that are not among the files, each as `NAME (named by FILE as KEY)`.
    pub missing: Vec<String>,
    /// The files read as a `.vmx`, `.vmsd` or disk descriptor (indexes into the files): the
    /// ones whose paths a restore to a new place may rewrite. Extents are data, never read.
    pub config: Vec<usize>,
}

/// Follow the references from the VM's `.vmx` (`vmx` = its datastore, dir, name) and the
/// `.vmsd` beside it through every descriptor reached. A `.vmx`, `.vmsd` or descriptor that is
/// too big or cannot be read is an error naming it: a chunked file past [`MAX_READ`] too (it
/// is not read, and never taken for a disk there: a disk is named by its descriptor, as an
/// extent).
pub(super) fn walk(files: &[VmFile], vmx: (&str, &str, &str), urls: &[(String, String)]) -> Result<Walk, String> {
    #[derive(Clone, Copy, PartialEq)]
    enum Kind {
        Vmx,
        Vmsd,
        Descriptor,
        Data,
    }
    let find =
        |ds: &str, dir: &str, name: &str| files.iter().position(|f| f.ds == ds && f.dir == dir && f.name == name);
    let mut w = Walk { missing: Vec::new(), config: Vec::new() };
    let mut seen = BTreeSet::new();
    // Each file to read, with what it is expected to be and who named it (`FILE as KEY`).
    let mut queue: Vec<(usize, Kind, Option<String>)> = Vec::new();
    let (ds, dir, name) = vmx;
    match find(ds, dir, name) {
        Some(i) => queue.push((i, Kind::Vmx, None)),
        None => w.missing.push(format!("{name} (the VM's configuration)")),
    }
    if let Some(i) = find(ds, dir, &format!("{}.vmsd", name.strip_suffix(".vmx").unwrap_or(name))) {
        queue.push((i, Kind::Vmsd, None));
    }
    while let Some((i, kind, by)) = queue.pop() {
        if kind == Kind::Data || !seen.insert(i) {
            continue;
        }
        let f = &files[i];
        if f.disk {
            let by = by.map(|b| format!(" (named by {b}, where a disk descriptor is expected)"));
            return Err(format!(
                "{} is a chunked file larger than {MAX_READ} bytes, the most a .vmx, .vmsd or disk descriptor may hold to be checked{}",
                f.name,
                by.unwrap_or_default()
            ));
        }
        let text = String::from_utf8_lossy(&read_config(&f.name, &f.local)?).into_owned();
        w.config.push(i);
        let refs = match kind {
            Kind::Vmx => vmx_refs(&text),
            Kind::Vmsd => vmsd_refs(&text),
            _ => descriptor_refs(&text),
        };
        for (key, target) in refs {
            let next = if key == "extent" || (kind == Kind::Vmsd && !target.to_ascii_lowercase().ends_with(".vmdk")) {
                Kind::Data
            } else {
                Kind::Descriptor
            };
            match resolve(&target, &f.ds, &f.dir, urls).and_then(|(d, r, n)| find(&d, &r, &n)) {
                Some(j) => queue.push((j, next, Some(format!("{} as {key}", f.name)))),
                None => {
                    let m = format!("{target} (named by {} as {key})", f.name);
                    if !w.missing.contains(&m) {
                        w.missing.push(m);
                    }
                }
            }
        }
    }
    Ok(w)
}

/// Rewrite the paths a `.vmx`, `.vmsd` or descriptor names (`*.fileName`, `parentFileNameHint`,
/// extent lines) with `map` (given each quoted name; None keeps it); None when nothing changed.
/// Works on the file's bytes: a `.vmx` may be in another encoding than UTF-8 (`.encoding =
/// "windows-1252"`), and every other byte stays as it was. A name `map` would change that is
/// not UTF-8 is an error (it cannot be rewritten faithfully), never skipped.
pub(super) fn rewrite_paths(text: &[u8], map: &dyn Fn(&str) -> Option<String>) -> Result<Option<Vec<u8>>, String> {
    let mut out = Vec::with_capacity(text.len());
    let mut changed = false;
    for (n, line) in text.split_inclusive(|&b| b == b'\n').enumerate() {
        let key = line.split(|&b| matches!(b, b'=' | b' ' | b'\t')).find(|w| !w.is_empty()).unwrap_or(b"");
        let key = String::from_utf8_lossy(key).to_ascii_lowercase();
        let names_a_path = key.ends_with(".filename")
            || key == "parentfilenamehint"
            || (matches!(key.as_str(), "rw" | "rdonly" | "noaccess") && !line.contains(&b'='));
        let quoted =
            line.iter().position(|&b| b == b'"').zip(line.iter().rposition(|&b| b == b'"')).filter(|(a, b)| b > a);
        let new = match (names_a_path, quoted) {
            (true, Some((a, b))) => {
                let v = &line[a + 1..b];
                match map(&String::from_utf8_lossy(v)) {
                    Some(_) if std::str::from_utf8(v).is_err() => {
                        return Err(format!(
                            "line {}: the path {:?} is not UTF-8 and cannot be rewritten for the new place",
                            n + 1,
                            String::from_utf8_lossy(v)
                        ));
                    }
                    Some(new) => Some((a, b, new)),
                    None => None,
                }
            }
            _ => None,
        };
        match new {
            Some((a, b, new)) => {
                out.extend_from_slice(&line[..a + 1]);
                out.extend_from_slice(new.as_bytes());
                out.extend_from_slice(&line[b..]);
                changed = true;
            }
            None => out.extend_from_slice(line),
        }
    }
    Ok(changed.then_some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &tempfile::TempDir, ds: &str, d: &str, name: &str, text: &str) -> VmFile {
        let local = dir.path().join(format!("{ds}-{}-{name}", d.replace('/', "_")));
        std::fs::write(&local, text).unwrap();
        VmFile { ds: ds.into(), dir: d.into(), name: name.into(), local, disk: false }
    }

    #[test]
    fn a_chain_with_a_missing_link_is_reported() {
        let t = tempfile::tempdir().unwrap();
        let urls =
            vec![("ds1".to_string(), "/vmfs/volumes/aaaa/".to_string()), ("ds2".into(), "/vmfs/volumes/bbbb".into())];
        let mut files = vec![
            file(&t, "ds1", "vm", "vm.vmx", "scsi0:0.fileName = \"vm-000001.vmdk\"\nscsi0:1.fileName = \"/vmfs/volumes/bbbb/vm/d.vmdk\"\nscsi0:2.fileName = \"gone.vmdk\"\nscsi0:2.present = \"FALSE\"\nide0:0.fileName = \"cd.iso\"\n"),
            file(&t, "ds1", "vm", "vm.vmsd", "snapshot0.filename = \"vm-Snapshot1.vmsn\"\nsnapshot0.disk0.fileName = \"vm.vmdk\"\n"),
            file(&t, "ds1", "vm", "vm-Snapshot1.vmsn", "x"),
            file(&t, "ds1", "vm", "vm-000001.vmdk", "createType=\"vmfsSparse\"\nparentFileNameHint=\"vm.vmdk\"\nRW 8 VMFSSPARSE \"vm-000001-delta.vmdk\"\n"),
            file(&t, "ds1", "vm", "vm-000001-delta.vmdk", "COWD"),
            file(&t, "ds1", "vm", "vm.vmdk", "createType=\"vmfs\"\nRW 8 VMFS \"vm-flat.vmdk\"\n"),
            file(&t, "ds1", "vm", "vm-flat.vmdk", ""),
            file(&t, "ds2", "vm", "d.vmdk", "createType=\"vmfs\"\nRW 8 VMFS \"d-flat.vmdk\"\n"),
            file(&t, "ds2", "vm", "d-flat.vmdk", ""),
        ];
        assert!(
            walk(&files, ("ds1", "vm", "vm.vmx"), &urls).unwrap().missing.is_empty(),
            "{:?}",
            walk(&files, ("ds1", "vm", "vm.vmx"), &urls).unwrap().missing
        );
        files.remove(5); // vm.vmdk, the base descriptor
        let m = walk(&files, ("ds1", "vm", "vm.vmx"), &urls).unwrap().missing;
        assert_eq!(m.len(), 2, "{m:?}");
        assert!(m.iter().any(|x| x == "vm.vmdk (named by vm-000001.vmdk as parentFileNameHint)"), "{m:?}");
        files.remove(3);
        let m = walk(&files, ("ds1", "vm", "vm.vmx"), &urls).unwrap().missing;
        assert!(m.iter().any(|x| x == "vm-000001.vmdk (named by vm.vmx as scsi0:0.fileName)"), "{m:?}");
        // A hint that climbs out, or an absolute path on no archived datastore, is missing.
        let f = vec![file(
            &t,
            "ds1",
            "vm",
            "vm.vmx",
            "scsi0:0.fileName = \"../../../etc/x.vmdk\"\nscsi0:1.fileName = \"/etc/y.vmdk\"\n",
        )];
        assert_eq!(walk(&f, ("ds1", "vm", "vm.vmx"), &urls).unwrap().missing.len(), 2);
    }

    #[test]
    fn resolving_names() {
        let urls = vec![("ds 1".to_string(), "/vmfs/volumes/u1".to_string())];
        assert_eq!(resolve("a.vmdk", "ds 1", "vm", &urls), Some(("ds 1".into(), "vm".into(), "a.vmdk".into())));
        assert_eq!(resolve("../o/a.vmdk", "ds 1", "vm", &urls), Some(("ds 1".into(), "o".into(), "a.vmdk".into())));
        assert_eq!(
            resolve("/vmfs/volumes/u1/vm/a.vmdk", "x", "y", &urls),
            Some(("ds 1".into(), "vm".into(), "a.vmdk".into()))
        );
        assert_eq!(
            resolve("/vmfs/volumes/ds 1/a.vmdk", "x", "y", &urls),
            Some(("ds 1".into(), "".into(), "a.vmdk".into()))
        );
        assert_eq!(resolve("../../a.vmdk", "ds 1", "vm", &urls), None);
        assert_eq!(resolve("/vmfs/volumes/u2/a.vmdk", "ds 1", "vm", &urls), None);
    }

    #[test]
    fn rewriting_absolute_paths_keeps_the_format() {
        let map = |p: &str| p.strip_prefix("/old/").map(|r| format!("/new/{r}"));
        let rw = |t: &str| rewrite_paths(t.as_bytes(), &map).unwrap().map(|b| String::from_utf8(b).unwrap());
        let d = "version=1\nCID=1\nparentFileNameHint=\"/old/vm/b.vmdk\"\nRW 8 VMFSSPARSE \"x-delta.vmdk\"\n";
        assert_eq!(
            rw(d).unwrap(),
            "version=1\nCID=1\nparentFileNameHint=\"/new/vm/b.vmdk\"\nRW 8 VMFSSPARSE \"x-delta.vmdk\"\n"
        );
        let v = "displayName = \"/old/x\"\nscsi0:1.fileName = \"/old/vm/d.vmdk\"\r\n";
        assert_eq!(rw(v).unwrap(), "displayName = \"/old/x\"\nscsi0:1.fileName = \"/new/vm/d.vmdk\"\r\n");
        assert_eq!(rw("scsi0:0.fileName = \"a.vmdk\"\n"), None);
    }

    /// A `.vmx` in windows-1252 (bytes that are not UTF-8): its paths are rewritten, every other
    /// byte kept; a path that is not UTF-8 and would change is an error.
    #[test]
    fn a_vmx_that_is_not_utf8_is_rewritten_byte_for_byte() {
        let map = |p: &str| p.strip_prefix("/old/").map(|r| format!("/new/{r}"));
        let v = b".encoding = \"windows-1252\"\nannotation = \"caf\xe9\"\nscsi0:1.fileName = \"/old/vm/d.vmdk\"\n";
        let want = b".encoding = \"windows-1252\"\nannotation = \"caf\xe9\"\nscsi0:1.fileName = \"/new/vm/d.vmdk\"\n";
        assert_eq!(rewrite_paths(v, &map).unwrap().as_deref(), Some(&want[..]));
        let bad = b"scsi0:1.fileName = \"/old/vm/caf\xe9.vmdk\"\n";
        let e = rewrite_paths(bad, &map).unwrap_err();
        assert!(e.starts_with("line 1: the path \"/old/vm/caf") && e.contains("not UTF-8"), "{e}");
        // Not changed by the map: kept as it is, whatever its bytes.
        assert_eq!(rewrite_paths(b"ide0:0.fileName = \"/iso/\xe9.iso\"\n", &map).unwrap(), None);
    }

    /// A `.vmx` padded past the limit (then naming another VM's disk), a `.vmsd` or descriptor
    /// that cannot be read, and a plain file past the limit named as a descriptor are refused,
    /// naming the file and the limit; a chunked disk named as one is not read (it is a disk).
    #[test]
    fn a_config_file_too_big_to_check_or_unreadable_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let urls = vec![("ds1".to_string(), "/vmfs/volumes/aaaa".to_string())];
        let vm = ("ds1", "vm", "vm.vmx");
        let vmdk = |t: &tempfile::TempDir| {
            vec![
                file(t, "ds1", "vm", "vm.vmdk", "RW 8 VMFS \"vm-flat.vmdk\"\n"),
                file(t, "ds1", "vm", "vm-flat.vmdk", ""),
            ]
        };
        let mut padded = "scsi0:0.fileName = \"vm.vmdk\"\n".to_string();
        padded.push_str(&"#".repeat(MAX_READ as usize));
        padded.push_str("\nscsi0:1.fileName = \"/vmfs/volumes/aaaa/other/other.vmdk\"\n");
        let mut files = vmdk(&t);
        files.push(file(&t, "ds1", "vm", "vm.vmx", &padded));
        let e = walk(&files, vm, &urls).err().expect("a padded .vmx was checked");
        assert!(e.starts_with("vm.vmx is larger than 1048576 bytes"), "{e}");

        // Exactly at the limit: read whole, and the name past the padding is checked.
        let mut at = "scsi0:0.fileName = \"vm.vmdk\"\nscsi0:1.fileName = \"other.vmdk\"\n".to_string();
        at.push_str(&"#".repeat(MAX_READ as usize - at.len()));
        let mut files = vmdk(&t);
        files.push(file(&t, "ds1", "vm", "vm.vmx", &at));
        let m = walk(&files, vm, &urls).unwrap().missing;
        assert_eq!(m, ["other.vmdk (named by vm.vmx as scsi0:1.fileName)"]);

        // A descriptor or .vmsd that cannot be read (here: not there, or a symlink).
        let mut files = vmdk(&t);
        files.push(file(&t, "ds1", "vm", "vm.vmx", "scsi0:0.fileName = \"vm.vmdk\"\n"));
        files[0].local = t.path().join("not-there");
        let e = walk(&files, vm, &urls).err().expect("an unreadable descriptor was passed over");
        assert!(e.starts_with("vm.vmdk cannot be read"), "{e}");
        let mut files = vmdk(&t);
        files.push(file(&t, "ds1", "vm", "vm.vmx", "scsi0:0.fileName = \"vm.vmdk\"\n"));
        files.push(file(&t, "ds1", "vm", "vm.vmsd", ""));
        let link = t.path().join("vmsd-link");
        std::os::unix::fs::symlink(&files[3].local, &link).unwrap();
        files[3].local = link;
        let e = walk(&files, vm, &urls).err().expect("a .vmsd behind a link was read");
        assert!(e.starts_with("vm.vmsd cannot be read"), "{e}");

        // A file past the limit named directly where a descriptor is expected is refused,
        // plain or chunked: a chunked one is not read (there may be no local copy), and not
        // taken for a disk either (a descriptor chunked with chunkFiles=*.vmdk and padded past
        // the limit would hide what it names).
        let big = t.path().join("big-flat");
        std::fs::File::create(&big).unwrap().set_len(64 << 20).unwrap();
        let flat = |disk: bool| VmFile {
            ds: "ds1".into(),
            dir: "vm".into(),
            name: "vm-flat.vmdk".into(),
            local: if disk { t.path().join("no-local-copy") } else { big.clone() },
            disk,
        };
        let direct = |disk: bool| {
            let vmx = file(&t, "ds1", "vm", "vm.vmx", "scsi0:0.fileName = \"vm-flat.vmdk\"\n");
            walk(&[vmx, flat(disk)], vm, &urls)
        };
        let e = direct(false).err().expect("a 64 MiB file was read as a descriptor");
        assert!(e.starts_with("vm-flat.vmdk is larger than 1048576 bytes"), "{e}");
        let e = direct(true)
            .err()
            .expect("a chunked file past the limit was taken for a disk where a descriptor is expected");
        assert!(
            e.starts_with("vm-flat.vmdk is a chunked file larger than 1048576 bytes")
                && e.contains("named by vm.vmx as scsi0:0.fileName"),
            "{e}"
        );
        // The .vmx itself is never taken for a disk.
        let mut vmx = flat(true);
        vmx.name = "vm.vmx".into();
        let e = walk(&[vmx], vm, &urls).err().expect("a chunked .vmx past the limit was passed over");
        assert!(e.starts_with("vm.vmx is a chunked file larger than 1048576 bytes"), "{e}");
        // A chunked disk named as an extent (by its descriptor) is data: not read, no local
        // copy needed.
        let vmx = file(&t, "ds1", "vm", "vm.vmx", "scsi0:0.fileName = \"vm.vmdk\"\n");
        let desc = file(&t, "ds1", "vm", "vm.vmdk", "createType=\"vmfs\"\nRW 8 VMFS \"vm-flat.vmdk\"\n");
        let w = walk(&[vmx, desc, flat(true)], vm, &urls).unwrap();
        assert!(w.missing.is_empty() && w.config == [0, 1], "{:?} {:?}", w.missing, w.config);
        // A parent descriptor (parentFileNameHint) that is a chunked file past the limit: refused.
        let vmx = file(&t, "ds1", "vm", "vm.vmx", "scsi0:0.fileName = \"vm-000001.vmdk\"\n");
        let delta = file(
            &t,
            "ds1",
            "vm",
            "vm-000001.vmdk",
            "createType=\"vmfsSparse\"\nparentFileNameHint=\"vm.vmdk\"\nRW 8 VMFSSPARSE \"vm-000001-delta.vmdk\"\n",
        );
        let d = file(&t, "ds1", "vm", "vm-000001-delta.vmdk", "");
        let padded = VmFile { name: "vm.vmdk".into(), ..flat(true) };
        let e =
            walk(&[vmx, delta, d, padded, flat(true)], vm, &urls).err().expect("a padded parent was taken for a disk");
        assert!(
            e.starts_with("vm.vmdk is a chunked file larger than 1048576 bytes")
                && e.contains("named by vm-000001.vmdk as parentFileNameHint"),
            "{e}"
        );
    }
}
