//! Build script of the `affa` crate: the version `affa --version` prints, `VERSION (commit
//! HASH, DATE)`, read from git at build time.
//!
//! Owns: `AFFA_VERSION` (the crate's version and the commit it was built from). Must never: fail
//! the build: a tree without git (a source tarball) takes `AFFA_COMMIT` from the environment
//! when the packager sets it, else says `commit unknown`.

use std::path::Path;
use std::process::Command;

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let o = Command::new("git").arg("-C").arg(dir).args(args).output().ok()?;
    let s = String::from_utf8(o.stdout).ok()?.trim().to_string();
    (o.status.success() && !s.is_empty()).then_some(s)
}

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let dir = Path::new(&dir);
    let version = std::env::var("CARGO_PKG_VERSION").expect("cargo sets CARGO_PKG_VERSION");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=AFFA_COMMIT");
    let commit = match std::env::var("AFFA_COMMIT") {
        Ok(c) if !c.trim().is_empty() => Some(c.trim().to_string()),
        _ => {
            // Rebuild when HEAD moves: HEAD itself (a checkout), the branch it names (a commit)
            // and packed-refs (a gc). In a worktree these live in different git directories.
            // (Only files that exist: a missing one would rebuild affa every time.)
            let branch = git(dir, &["symbolic-ref", "-q", "HEAD"]);
            for p in ["HEAD", "packed-refs"].into_iter().chain(branch.as_deref()) {
                if let Some(f) = git(dir, &["rev-parse", "--path-format=absolute", "--git-path", p]) {
                    if Path::new(&f).exists() {
                        println!("cargo:rerun-if-changed={f}");
                    }
                }
            }
            git(dir, &["log", "-1", "--format=%h, %cs", "--abbrev=12"])
        }
    };
    let commit = commit.unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=AFFA_VERSION={version} (commit {commit})");
}
