//! Checks on parsers of what a host or an archive sends, shared by the proptests in
//! tests/it/hostile.rs (every `cargo test`) and the cargo-fuzz targets in fuzz/ (long runs, which
//! include this file by path). Each takes any bytes, must never panic, and asserts what the
//! parser promises.
#![allow(dead_code)]

use std::path::Path;

pub fn esxi_ini(data: &[u8]) {
    if let Ok(r) = affa::vmrecord::VmRecord::parse(&String::from_utf8_lossy(data)) {
        let _ = (r.files(), affa::esxi::model::split_ds_file(&r.vmx_path));
        // What it read, it writes back as it read it (format 2).
        if r.format == 2 {
            let text = r.to_text().expect("a record read back writes");
            assert_eq!(affa::vmrecord::VmRecord::parse(&text).unwrap(), r);
        }
    }
}

pub fn manifest_index(data: &[u8]) {
    if let Ok(files) = affa::chunk::index::parse(data) {
        for f in files {
            // Whatever the index lists stays inside the archive.
            assert!(affa::untrusted::check_archive_rel(&f).is_ok(), "{f:?}");
            assert!(f.components().all(|c| matches!(c, std::path::Component::Normal(_))), "{f:?}");
        }
    }
}

/// The one path-safety rule and the escaping, on any text a host could send.
pub fn host_names(data: &[u8]) {
    use affa::untrusted::{escape_controls, terminal_safe, SafeName, SafeRelPath, TerminalSafe};
    let s = String::from_utf8_lossy(data);
    if let Ok(n) = SafeName::new("name", &s) {
        let n = n.as_str();
        assert!(!n.is_empty() && n != "." && n != ".." && !n.contains('/') && !n.chars().any(char::is_control));
        assert_eq!(Path::new("/base").join(n).parent(), Some(Path::new("/base")));
    }
    if let Ok(p) = SafeRelPath::new("path", &s) {
        let joined = Path::new("/base").join(p.as_path());
        assert!(joined.starts_with("/base") && joined != Path::new("/base"));
        assert!(p.as_path().components().all(|c| matches!(c, std::path::Component::Normal(_))));
    }
    if let Ok((ds, dir, file)) = affa::esxi::model::split_ds_file(&s) {
        let p = Path::new("/r/vmfs/volumes").join(&ds).join(dir.as_path()).join(&file);
        assert!(p.starts_with("/r/vmfs/volumes") && !p.components().any(|c| c == std::path::Component::ParentDir));
    }
    assert!(!escape_controls(&s).chars().any(char::is_control));
    assert!(!terminal_safe(&s).chars().any(|c| c.is_control() && c != '\n' && c != '\t'));
    let mut out = Vec::new();
    {
        let mut w = TerminalSafe::new(&mut out);
        use std::io::Write;
        for part in data.chunks(3) {
            w.write_all(part).unwrap();
        }
    }
    assert!(!out.iter().any(|&b| (b < 0x20 && b != b'\n' && b != b'\t') || b == 0x7f), "{out:?}");
    assert!(!out.windows(2).any(|w| w[0] == 0xc2 && (0x80..=0x9f).contains(&w[1])));
}

/// Every parser of a VM's layout, on whatever a (mutated) answer yields.
pub fn vm_layout(data: &[u8]) {
    use affa::esxi::model::*;
    let Ok(affa::esxi::soap::Reply::Ok(b)) = affa::esxi::soap::parse_reply(data) else { return };
    let Ok((objs, _)) = parse_retrieve_result(b) else { return };
    for o in &objs {
        for (_, v) in &o.props {
            if let Ok(disks) = parse_disks(v) {
                for d in disks {
                    for b in &d.chain {
                        let _ = split_ds_file(&b.file_name);
                    }
                }
            }
            let _ = parse_snapshot_info(v);
            for f in parse_layout_files(v) {
                let _ = split_ds_file(&f.name);
            }
            let _ = split_ds_file(&parse_vm_files(v).vm_path_name);
            let _ = parse_moref_array(v);
            let _ = parse_task_info(v);
            let _ = url_to_host_path(v.text());
            let _ = decode_entity_name(v.text());
        }
    }
}
