#!/usr/bin/env bash
# Build affa's Debian and RPM packages into target/packages/ (issue 17):
#   target/packages/affa_VERSION-1_amd64.deb      (cargo deb)
#   target/packages/affa-VERSION-1.x86_64.rpm     (cargo generate-rpm)
# Both hold the files of one PREFIX install, `affa --install --prefix target/package-root --agent
# STATIC_AGENT`: the binary, the static agent, the man pages and completions the binary makes
# from its own definitions, the sample jobs and the logrotate file. Their postinst runs
# `affa --_setup` (state directories, cron file). The package version is the crate's.
#
# The release build is the one users get: no test hooks (scripts/test.sh builds with them; the
# dependencies of both variants stay cached in target/, so switching costs only the affa crate).
# The packaging tools are installed once, at pinned versions (cargo install --locked).
# Options: --deb-revision N (default 1; the upgrade test builds a -2), --deb-only.
set -euo pipefail
cd "$(dirname "$0")/.."

revision=1
rpm=yes
while [ $# -gt 0 ]; do
  case "$1" in
    --deb-revision) revision=$2; shift 2 ;;
    --deb-only) rpm=no; shift ;;
    *) echo "usage: $0 [--deb-revision N] [--deb-only]" >&2; exit 2 ;;
  esac
done

CARGO_DEB_VERSION=3.8.0
CARGO_GENERATE_RPM_VERSION=0.21.1
tool() { # tool CRATE VERSION: install cargo-CRATE unless that version is there
  cargo "${1#cargo-}" --version 2>/dev/null | grep -qF "$2" || cargo install --locked "$1@$2"
}
tool cargo-deb "$CARGO_DEB_VERSION"
[ "$rpm" = no ] || tool cargo-generate-rpm "$CARGO_GENERATE_RPM_VERSION"

root=target/package-root
out=target/packages
if [ "$revision" = 1 ]; then
  cargo build --release -p affa --bin affa
  agent=$(./scripts/build-agent.sh)
  rm -rf "$root"
  mkdir -p "$root"
  ./target/release/affa --install --prefix "$root" --agent "$agent" >/dev/null
  # The debug line tables of the release profile (debug = 1) are most of the binary's size;
  # the symbols stay (a backtrace still names the functions).
  strip --strip-debug "$root/usr/sbin/affa"
  rm -rf "$out"
fi
[ -x "$root/usr/sbin/affa" ] || { echo "$root is missing: build revision 1 first" >&2; exit 1; }
mkdir -p "$out"
cargo deb --no-build --no-strip --deb-revision "$revision" --output "$out/" >/dev/null
if [ "$rpm" = yes ]; then
  cargo generate-rpm --output "$out/" >/dev/null
fi
ls "$out"/*
