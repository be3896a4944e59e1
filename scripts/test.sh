#!/usr/bin/env bash
# Install the system packages the tests need (Debian), then build and run every test.
# This is the README's test command; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  openssh-server openssh-client rsync          # the transport, on both ends
  golang-go golang-github-vmware-govmomi-dev    # the vSphere simulator harness
  python3-aiosmtpd                              # the SMTP server of the mail tests
  samba smbclient                               # the Samba share tests
  qemu-utils                                    # qemu-img: reads VMware snapshot chains independently of affa
  bsdutils                                      # script(1): affa on a pseudo-terminal (tests/it/terminal.rs)
  curl                                          # scripts/demo.sh, which .ci/run runs too
  e2fsprogs mount                               # the USB-disk test (mkfs.ext4, losetup, mount)
  file                                          # crates/agent/tests: the agent is statically linked
  fuse3 fdisk util-linux                        # the mount tests (fusermount3; sfdisk, partx for the VM-disk recipe)
  btrfs-progs                                   # mkfs.btrfs: a read error (EIO) at the agent's source (tests/it/agent_transport.rs)
  rpm man-db binutils dpkg-dev                  # the package test: rpm -qlvp, man -w, strip, dpkg-shlibdeps
  ceph-mon ceph-mgr ceph-osd radosgw ceph-common # a single-node Ceph with its S3 gateway (tests/it/offsite.rs)
  ceph-mds ceph-fuse                            # CephFS on it, mounted by two clients (tests/it/cephfs.rs)
)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "installing: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# sshd's privilege-separation directory (the tests start their own sshd on a high port).
[ -d /run/sshd ] || { [ "$(id -u)" -eq 0 ] && mkdir -p /run/sshd; } || true

# Build the simulator once up front (the tests would build it too).
(cd harness/esxi-sim && GO111MODULE=off GOPATH=/usr/share/gocode go build -o esxi-sim .)

# Everything below builds with scripts/static-env.sh: glibc linked statically, for
# x86_64-unknown-linux-gnu, into target/x86_64-unknown-linux-gnu/release. The affa the tests run
# is the affa the packages ship (it runs on EL7's glibc 2.17 too), compiled once for both.
. scripts/static-env.sh

# The statically linked agent (crates/agent/tests checks it and runs it under env -i).
./scripts/build-agent.sh >/dev/null

# Every test, with the test-only hooks (the fault tests' AFFA_TEST_CRASH_AT needs them; the
# module faults of the integration test binary `it` is not compiled without them). The
# integration tests are one binary (tests/it/main.rs): one area alone is `--test it AREA::`.
cargo test --release --workspace --all-targets --features affa/test-hooks "$@"
# The build users install (`cargo build --release`, no test-hooks) has no crash hook: this unit
# test sets AFFA_TEST_CRASH_AT and reaches a crash point; it only exists without the feature.
cargo test --release -p affa-core --lib -- interrupt::tests::
# Last, the packages (scripts/build-packages.sh: the .deb with cargo deb, the .rpm with
# rpmbuild), checked by scripts/test-packages.sh: installed on this machine with apt-get, used,
# upgraded, removed and purged (as root; it refuses where affa is installed). They package the
# static affa binary the tests above built and ran (--reuse-build): affa is compiled once.
# cargo-deb is installed first, as this user (cargo install, once; for the host, whatever the
# target above says).
./scripts/build-packages.sh --install-tools
if [ "$(id -u)" -eq 0 ]; then
  ./scripts/test-packages.sh --reuse-build
else
  sudo env PATH="$PATH" CARGO_HOME="${CARGO_HOME:-$HOME/.cargo}" RUSTUP_HOME="${RUSTUP_HOME:-$HOME/.rustup}" \
    ./scripts/test-packages.sh --reuse-build
fi
