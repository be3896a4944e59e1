#!/usr/bin/env bash
# Build the statically linked affa-agent (docs/PROTOCOL.md): glibc linked statically
# (`+crt-static`; there is no musl target here), for x86_64-unknown-linux-gnu, in its own
# target directory (target/x86_64-unknown-linux-gnu/release/affa-agent) so the flags never
# reach the rest of the workspace; symbols stripped (2.5 MB instead of 21: affa copies it to every
# host it deploys to). Prints the binary's path.
set -euo pipefail
cd "$(dirname "$0")/.."
RUSTFLAGS="-C target-feature=+crt-static -C strip=symbols" \
  cargo build --release -p affa-agent --target x86_64-unknown-linux-gnu "$@" >&2
bin=target/x86_64-unknown-linux-gnu/release/affa-agent
file -L "$bin" | grep -qE "statically linked|static-pie linked" || { file -L "$bin" >&2; echo "affa-agent is not statically linked" >&2; exit 1; }
echo "$PWD/$bin"
