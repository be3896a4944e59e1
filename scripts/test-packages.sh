#!/usr/bin/env bash
# The packages as a sysadmin meets them (issue 17); scripts/test.sh runs it last. Builds both
# (scripts/build-packages.sh), then on THIS machine, as root: installs the .deb with apt-get,
# uses it (--version, man, bash completion of a job name, --configcheck on the samples, a real
# backup of a local job into a temp RootDir, the cron file), upgrades it (same package again,
# then a newer revision) with an edited sample job, removes it and purges it, checking what
# each step leaves (archives under a RootDir survive both, byte for byte). The .rpm is checked
# with rpm -qlvp (contents and modes), rpm -qcp (config files) and its scripts and requires.
# In both, affa and the agent are linked statically (glibc included: the .rpm runs on SME Server
# 10, EL7's glibc 2.17): `file` says so of the files unpacked from each package, the .rpm
# requires no libc symbol version, and the unpacked affa runs with an empty environment.
# It refuses to run where affa is installed (it would purge it); it leaves nothing installed.
# --reuse-build (scripts/test.sh): package the affa binary the test suite built (see
# scripts/build-packages.sh) instead of compiling the release one.
set -euo pipefail
cd "$(dirname "$0")/.."
reuse=()
case "${1:-}" in
  --reuse-build) reuse=(--reuse-build) ;;
  "") ;;
  *) echo "usage: $0 [--reuse-build]" >&2; exit 2 ;;
esac

fail() { echo "== packages FAILED: $*" >&2; exit 1; }
has() { grep -qF -- "$2" <<<"$1" || fail "$3: '$2' not in: $1"; }
mode() { stat -c %a "$1"; }
known() { # dpkg knows affa: installed, or removed with its configuration
  local s
  s=$(dpkg-query -W -f='${Status}' affa 2>/dev/null) || return 1
  [ "${s##* }" != not-installed ]
}

[ "$(id -u)" -eq 0 ] || fail "run it as root: it installs the package on this machine"
if known || [ -e /etc/affa ] || [ -e /usr/sbin/affa ]; then
  fail "affa is installed on this machine (or /etc/affa, /usr/sbin/affa exist): this test installs and purges the package; run it where affa is not installed"
fi
had_var_affa=no
[ -e /var/affa ] && had_var_affa=yes
had_lock_dir=no
[ -e /var/lock/affa ] && had_lock_dir=yes
tmp=$(mktemp -d /tmp/affa-pkg-test.XXXXXX)
cleanup() {
  if known; then
    dpkg --purge affa >/dev/null 2>&1 || true
  fi
  rm -rf /etc/affa "$tmp"
  [ "$had_var_affa" = yes ] || rmdir /var/affa 2>/dev/null || true
  [ "$had_lock_dir" = yes ] || rmdir /var/lock/affa 2>/dev/null || true
  # Started through sudo (scripts/test.sh as a user): the packages stay the user's.
  [ -z "${SUDO_UID:-}" ] || chown -R "$SUDO_UID:${SUDO_GID:-$SUDO_UID}" target/packages target/package-root 2>/dev/null || true
}
trap cleanup EXIT

./scripts/build-packages.sh "${reuse[@]}" >/dev/null
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
deb=target/packages/affa_${version}-1_amd64.deb
rpm=$(ls target/packages/affa-"${version}"-*.rpm)
root=target/package-root
[ -f "$deb" ] || fail "no $deb"

# ---- contents: every file of the PREFIX install (but the cron file, which the postinst
# writes from the configuration) is in both packages with its mode; man pages gzipped in the .deb.
debls=$(dpkg-deb -c "$deb" | awk '{print $1, substr($6, 2)}')
rpmls=$(rpm -qlvp "$rpm" | awk '{print $1, $9}')
while read -r f; do
  p=${f#"$root"}
  [ "$p" = /etc/cron.d/affa ] && continue
  m=$(stat -c %A "$f")
  case "$p" in /usr/share/man/*) d="$p.gz" ;; *) d="$p" ;; esac
  grep -qxF -- "$m $d" <<<"$debls" || fail ".deb lacks $m $d"
  case "$p" in /usr/share/zsh/vendor-completions/_affa) r=/usr/share/zsh/site-functions/_affa ;; *) r="$p" ;; esac
  grep -qxF -- "$m $r" <<<"$rpmls" || fail ".rpm lacks $m $r"
done < <(find "$root" -type f | sort)
# Nothing else but the documentation.
extra=$(grep -v '/$' <<<"$debls" | awk '{print $2}' | grep -v '^/usr/share/doc/affa/' | while read -r p; do
  q=${p%.gz}; [ -f "$root$p" ] || [ -f "$root$q" ] || echo "$p"; done)
[ -z "$extra" ] || fail ".deb has files the install does not: $extra"
for d in "drwx------ /etc/affa" "drwx------ /etc/affa/scripts" "drwxr-x--- /var/log/affa" "drwxr-xr-x /usr/lib/affa"; do
  grep -qxF -- "$d" <<<"$rpmls" || fail ".rpm lacks the directory $d: $rpmls"
done
[ "$(rpm -qcp "$rpm" | sort | tr '\n' ' ')" = "/etc/affa/00-global.conf /etc/affa/example-esxi.conf /etc/affa/example-linux.conf /etc/logrotate.d/affa " ] \
  || fail "rpm config files: $(rpm -qcp "$rpm")"
has "$(rpm -qp --requires "$rpm")" "openssh-clients" "rpm requires"
has "$(rpm -qp --requires "$rpm")" "rsync" "rpm requires"
has "$(rpm -qp --scripts "$rpm")" "/usr/sbin/affa --_setup" "rpm %post"
[ "$(rpm -qp --queryformat '%{VERSION}' "$rpm")" = "$version" ] || fail "rpm version"
[ "$(dpkg-deb -f "$deb" Version)" = "$version-1" ] || fail "deb version $(dpkg-deb -f "$deb" Version)"
has "$(dpkg-deb -f "$deb" Depends)" "openssh-client" "deb Depends"
has "$(dpkg-deb -f "$deb" Depends)" "rsync" "deb Depends"
# Static binaries: no libc to depend on (a dynamic affa needed libc6 >= 2.34, GLIBC_2.34).
[[ "$(dpkg-deb -f "$deb" Depends)" != *libc* ]] || fail "deb Depends names a libc: $(dpkg-deb -f "$deb" Depends)"
requires=$(rpm -qp --requires "$rpm")
! grep -qiE "glibc|libc\.so|ld-linux|rtld" <<<"$requires" || fail "rpm requires a libc or a loader: $requires"
mkdir -p "$tmp/deb" "$tmp/rpm"
dpkg-deb -x "$deb" "$tmp/deb"
rpm2archive - <"$rpm" | tar -xz -C "$tmp/rpm"
for f in deb/usr/sbin/affa rpm/usr/sbin/affa deb/usr/lib/affa/affa-agent rpm/usr/lib/affa/affa-agent; do
  file "$tmp/$f" | grep -qE "statically linked|static-pie linked" || fail "$f is not statically linked: $(file "$tmp/$f")"
done
has "$(env -i "$tmp/rpm/usr/sbin/affa" --version)" "affa $version" "the .rpm's affa under env -i"
[ "$(dpkg-deb -I "$deb" conffiles | sort | tr '\n' ' ')" = "/etc/affa/00-global.conf /etc/affa/example-esxi.conf /etc/affa/example-linux.conf /etc/logrotate.d/affa " ] \
  || fail "deb conffiles: $(dpkg-deb -I "$deb" conffiles)"

# ---- install, as a sysadmin: one command.
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "./$deb" >/dev/null
v=$(affa --version)
commit=$(git log -1 --format=%h --abbrev=12 2>/dev/null || echo unknown)
has "$v" "affa $version (commit $commit" "affa --version"
[ "$(man -w affa)" = /usr/share/man/man8/affa.8.gz ] || fail "man -w affa: $(man -w affa)"
[ "$(man -w affa-agent)" = /usr/share/man/man8/affa-agent.8.gz ] || fail "man -w affa-agent"
page=$(MANPAGER=cat MANWIDTH=100 man affa 2>/dev/null)
has "$page" "remoteHostName" "man affa: the configuration keys"
has "$page" "--list-archives" "man affa: the options"
[ "$(mode /etc/affa)" = 700 ] || fail "/etc/affa mode $(mode /etc/affa)"
[ "$(mode /etc/affa/scripts)" = 700 ] || fail "/etc/affa/scripts mode"
[ "$(mode /etc/affa/example-esxi.conf)" = 600 ] || fail "example-esxi.conf mode"
[ "$(mode /var/log/affa)" = 750 ] || fail "/var/log/affa mode"
[ "$(mode /var/affa)" = 700 ] || [ "$had_var_affa" = yes ] || fail "/var/affa mode"
[ "$(mode /usr/lib/affa/affa-agent)" = 755 ] || fail "agent mode"
/usr/lib/affa/affa-agent --version | grep -q "^affa-agent $version" || fail "the agent does not run"
cron=$(cat /etc/cron.d/affa)
has "$cron" "*/15 * * * * root /usr/sbin/affa --silent --_cronupdate" "the cron file"
check=$(affa --configcheck)
has "$check" "configuration OK: 2 job(s)" "--configcheck on the samples"

# Completion: a bash started with the completion file completes a job name and an option,
# through the function the file registers for affa.
complete_words() { # complete_words WORD... : what TAB offers for the last word
  bash --norc --noprofile -c '
    . /usr/share/bash-completion/completions/affa
    f=$(complete -p affa | sed -n "s/.* -F \([^ ]*\) .*/\1/p")
    COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 )); COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}
    "$f" affa "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
    printf "%s\n" "${COMPREPLY[@]}"' bash "$@"
}
[ "$(complete_words affa --run example-l)" = example-linux ] || fail "bash completion of a job name: $(complete_words affa --run example-l)"
has "$(complete_words affa --list-a)" "--list-archives" "bash completion of an option"

# ---- a real backup with the installed affa: a local job into a RootDir of its own.
mkdir -p "$tmp/src/etc" "$tmp/archives"
head -c 300000 /dev/urandom >"$tmp/src/etc/data.bin"
cat >/etc/affa/pkgtest.conf <<EOF
[pkgtest]
remoteHostName=localhost
RootDir=$tmp/archives
Include=$tmp/src/etc
TimeSchedule=0315
EOF
chmod 600 /etc/affa/pkgtest.conf
affa --silent --run pkgtest || fail "affa --run pkgtest"
archived="$tmp/archives/pkgtest/scheduled.0$tmp/src/etc/data.bin"
sum=$(sha256sum <"$tmp/src/etc/data.bin")
[ "$(sha256sum <"$archived")" = "$sum" ] || fail "the archive differs from the source"
affa --make-cronjobs >/dev/null
has "$(cat /etc/cron.d/affa)" "15 3 * * * root /usr/sbin/affa --silent --run pkgtest" "the job's cron line"
# An edited sample job.
sed -i 's/^Description=.*/Description=edited by the package test/' /etc/affa/example-linux.conf
edited=$(sha256sum </etc/affa/example-linux.conf)

# ---- upgrades: the same package again, then a newer revision. The edit, the job, the cron
# schedule, the archive and the directory modes stay.
after_upgrade() {
  [ "$(sha256sum </etc/affa/example-linux.conf)" = "$edited" ] || fail "$1: the edited sample was replaced"
  [ -f /etc/affa/example-linux.conf.dpkg-new ] && fail "$1: dpkg left a .dpkg-new"
  has "$(cat /etc/cron.d/affa)" "15 3 * * * root /usr/sbin/affa --silent --run pkgtest" "$1: the cron schedule"
  [ "$(sha256sum <"$archived")" = "$sum" ] || fail "$1: the archive changed"
  [ "$(mode /etc/affa)" = 700 ] || fail "$1: /etc/affa mode $(mode /etc/affa)"
  has "$(affa --configcheck)" "configuration OK: 3 job(s)" "$1: --configcheck"
}
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --reinstall --no-install-recommends "./$deb" >/dev/null
after_upgrade "reinstall"
./scripts/build-packages.sh "${reuse[@]}" --deb-revision 2 --deb-only >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "./target/packages/affa_${version}-2_amd64.deb" >/dev/null
[ "$(dpkg-query -W -f='${Version}' affa)" = "$version-2" ] || fail "the upgrade did not happen"
after_upgrade "upgrade"

# ---- remove: the programs and the cron file go; configuration, logs and archives stay.
dpkg -r affa >/dev/null
for f in /usr/sbin/affa /usr/lib/affa/affa-agent /usr/share/man/man8/affa.8.gz /usr/share/bash-completion/completions/affa /etc/cron.d/affa; do
  [ ! -e "$f" ] || fail "dpkg -r left $f"
done
for f in /etc/affa/example-linux.conf /etc/affa/pkgtest.conf /etc/affa/00-global.conf /etc/logrotate.d/affa /var/log/affa/pkgtest.log; do
  [ -e "$f" ] || fail "dpkg -r removed $f"
done
[ "$(sha256sum </etc/affa/example-linux.conf)" = "$edited" ] || fail "dpkg -r changed the edited sample"
[ "$(sha256sum <"$archived")" = "$sum" ] || fail "dpkg -r changed the archive"

# ---- purge: the configuration and the logs go; the archives stay.
dpkg --purge affa >/dev/null
for f in /etc/affa /etc/logrotate.d/affa /var/log/affa /etc/cron.d/affa; do
  [ ! -e "$f" ] || fail "dpkg --purge left $f"
done
[ ! -e /var/lock/affa ] || [ "$had_lock_dir" = yes ] || fail "dpkg --purge left the lock directory /var/lock/affa"
[ "$(sha256sum <"$archived")" = "$sum" ] || fail "dpkg --purge changed the archive"
[ -f "$tmp/archives/pkgtest/scheduled.0/.AFFA3-REPORT" ] || fail "dpkg --purge removed the archive's report"

# A RootDir inside /etc/affa: purge keeps the whole directory (never an archive).
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "./$deb" >/dev/null
mkdir -p /etc/affa/inside/job/scheduled.0
echo report >/etc/affa/inside/job/scheduled.0/.AFFA3-REPORT
dpkg --purge affa >/dev/null 2>&1
[ -f /etc/affa/inside/job/scheduled.0/.AFFA3-REPORT ] || fail "dpkg --purge removed an archive inside /etc/affa"
rm -rf /etc/affa

echo "== packages OK: $(basename "$deb") and $(basename "$rpm") built, installed, used, upgraded, removed, purged"
