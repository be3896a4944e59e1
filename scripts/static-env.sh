# Sourced by scripts/test.sh, build-agent.sh, build-packages.sh and demo.sh (issue 17): every
# binary they build (affa, affa-agent, the test binaries) is linked statically against glibc
# (`+crt-static`) for x86_64-unknown-linux-gnu, into target/x86_64-unknown-linux-gnu/release, so
# the affa the tests run is the affa the packages ship, and it runs on any x86_64 Linux (EL7's
# glibc 2.17 included): one compile of the workspace for both. With an explicit target
# (CARGO_BUILD_TARGET), cargo applies RUSTFLAGS only to that target's artifacts: build scripts and
# proc-macros are still built for the host, without crt-static (they could not be), in
# target/release. The same flags everywhere: a script never invalidates another's artifacts.
# Plain `cargo build --release` (a source install, a developer's test run) is untouched and
# builds the dynamically linked affa in target/release.
export CARGO_BUILD_TARGET=x86_64-unknown-linux-gnu
export RUSTFLAGS="-C target-feature=+crt-static"
STATIC_BIN_DIR=target/x86_64-unknown-linux-gnu/release
# `file` names a binary statically linked (or static-pie linked).
is_static() { file -L "$1" | grep -qE "statically linked|static-pie linked"; }
