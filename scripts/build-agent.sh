#!/usr/bin/env bash
# Build the statically linked affa-agent (docs/PROTOCOL.md): glibc linked statically
# (`+crt-static`; there is no musl target here), for x86_64-unknown-linux-gnu, with the flags
# of scripts/static-env.sh (the same build as the tests' and the packaged affa's), into
# target/x86_64-unknown-linux-gnu/release/affa-agent; symbols stripped by its release profile
# (Cargo.toml: 2.5 MB instead of 21; affa copies it to every host it deploys to). Prints the
# binary's path.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/static-env.sh
cargo build --release -p affa-agent "$@" >&2
bin=$STATIC_BIN_DIR/affa-agent
is_static "$bin" || { file -L "$bin" >&2; echo "affa-agent is not statically linked" >&2; exit 1; }
echo "$PWD/$bin"
