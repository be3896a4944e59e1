#!/usr/bin/env bash
# Build affa's Debian and RPM packages into target/packages/ (issue 17):
#   target/packages/affa_VERSION-1_amd64.deb      (cargo deb)
#   target/packages/affa-VERSION-1.x86_64.rpm     (rpmbuild, packaging/rpm/affa.spec)
# Both hold the files of one PREFIX install, `affa --install --prefix target/package-root --agent
# STATIC_AGENT`: the binary, the static agent, the man pages and completions the binary makes
# from its own definitions, the sample jobs and the logrotate file. Their postinst runs
# `affa --_setup` (state directories, cron file). The package version is the crate's.
# Both binaries are linked statically against glibc (scripts/static-env.sh; checked here): one
# .rpm for SME Server 10 and 11 and EL 7 to 9 (glibc 2.17 and later), neither package requires
# a libc.
#
# The release build is the one users get: no test hooks (scripts/test.sh builds with them; the
# dependencies of both variants stay cached in target/, so switching costs only the affa crate).
# cargo-deb is installed once, at a pinned version (cargo install --locked). The .rpm is made by
# rpmbuild (Debian's `rpm` package) from the same tree and packaging/rpm/affa.spec: it compiles
# nothing, where cargo-generate-rpm would first be compiled from source (minutes, on each
# clean CI machine).
# Options: --deb-revision N (default 1; the upgrade test builds a -2), --deb-only,
# --reuse-build: package target/x86_64-unknown-linux-gnu/release/affa as it is, as
# scripts/test.sh built it and ran the tests with it (static too; with
# test-hooks: the crash hook, inert unless AFFA_TEST_CRASH_AT is set), so the package test
# compiles affa once with the suite, not a second time; such packages are for the test only
# (and compressed fast). --install-tools: install the tools, build nothing (scripts/test.sh,
# as the user, before it runs the package test as root).
set -euo pipefail
cd "$(dirname "$0")/.."

revision=1
rpm=yes
build=yes
fast=()
tools_only=no
while [ $# -gt 0 ]; do
  case "$1" in
    --deb-revision) revision=$2; shift 2 ;;
    --deb-only) rpm=no; shift ;;
    --reuse-build) build=no; fast=(--fast); shift ;;
    --install-tools) tools_only=yes; shift ;;
    *) echo "usage: $0 [--deb-revision N] [--deb-only] [--reuse-build] [--install-tools]" >&2; exit 2 ;;
  esac
done

. scripts/static-env.sh
# The tools are built for (and run on) this machine, without the static build's target and flags.
host_cargo() { env -u CARGO_BUILD_TARGET -u RUSTFLAGS cargo "$@"; }
CARGO_DEB_VERSION=3.8.0
host_cargo deb --version 2>/dev/null | grep -qxF "cargo-deb $CARGO_DEB_VERSION" \
  || host_cargo install --locked "cargo-deb@$CARGO_DEB_VERSION"
[ "$rpm" = no ] || command -v rpmbuild >/dev/null \
  || { echo "rpmbuild is missing: apt-get install rpm (or run with --deb-only)" >&2; exit 1; }
[ "$tools_only" = no ] || exit 0

root=target/package-root
out=target/packages
if [ "$revision" = 1 ]; then
  [ "$build" = no ] || cargo build --release -p affa --bin affa
  agent=$(./scripts/build-agent.sh)
  is_static "$STATIC_BIN_DIR/affa" || { file "$STATIC_BIN_DIR/affa" >&2; echo "affa is not statically linked" >&2; exit 1; }
  rm -rf "$root"
  mkdir -p "$root"
  "./$STATIC_BIN_DIR/affa" --install --prefix "$root" --agent "$agent" >/dev/null
  # The debug line tables of the release profile (debug = 1) are most of the binary's size;
  # the symbols stay (a backtrace still names the functions).
  strip --strip-debug "$root/usr/sbin/affa"
  rm -rf "$out"
fi
[ -x "$root/usr/sbin/affa" ] || { echo "$root is missing: build revision 1 first" >&2; exit 1; }
mkdir -p "$out"
host_cargo deb --no-build --no-strip "${fast[@]}" --deb-revision "$revision" --output "$out/" >/dev/null
if [ "$rpm" = yes ]; then
  version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
  top=$(mktemp -d)
  rpmbuild -bb --quiet --target x86_64 \
    --define "_topdir $top" --define "_rpmdir $PWD/$out" \
    --define "_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm" \
    --define "affa_version $version" --define "affa_release 1" \
    --define "affa_root $PWD/$root" --define "affa_docs $(echo "$PWD"/README.md "$PWD"/docs/*.md)" \
    packaging/rpm/affa.spec >/dev/null
  rm -rf "$top"
fi
ls "$out"/*
