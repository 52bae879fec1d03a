#!/bin/sh
# Installs muscle-agent @VERSION@ from the deployer at @SERVER@ and enrols this host:
#   curl -fsSL @SERVER@/install.sh | sh -s -- --enroll-token TOKEN [--label KEY=VALUE]...
# Written for this deployer by `muscle-deploy serve` (GET /install.sh).
set -eu

# All in one function called on the last line: a download cut short runs nothing.
main() {
server='@SERVER@'
version='@VERSION@'
token="${MUSCLE_ENROLL_TOKEN:-}"
prefix=/usr/local
state_dir=/var/lib/muscle-agent
config_dir=/etc/muscle-agent
unit_dir=/etc/systemd/system
supervisor=auto
flags=''
keys=''
# The release's manifest (base64) and its signature (hex; empty when unsigned), for --trusted-key.
manifest='@MANIFEST@'
signature='@SIGNATURE@'

say() { echo "muscle install: $*" >&2; }
die() { say "$*"; exit 1; }

usage() {
  cat >&2 <<EOF
Usage: curl -fsSL $server/install.sh | sh -s -- --enroll-token TOKEN [OPTIONS]

  --enroll-token TOKEN   The fleet's enrolment token [env: MUSCLE_ENROLL_TOKEN]
  --label KEY=VALUE      A label for rollout selectors (repeatable)
  --var KEY=VALUE        A value for \${KEY} in service specs (repeatable)
  --trusted-key HEX      Pin a release signing key (repeatable): the agent's release must be
                         signed by one (checked with openssl before it is installed), and the
                         agent then runs only releases such a key signed
  --supervisor KIND      systemd, builtin, or auto (systemd where it runs) [default: auto]
  --prefix DIR           The agent goes to DIR/bin [default: /usr/local]
  --state-dir DIR        [default: /var/lib/muscle-agent]
  --config-dir DIR       Where the token is kept [default: /etc/muscle-agent]
  --unit-dir DIR         Where the systemd unit is written [default: /etc/systemd/system]
EOF
}

# A word that goes onto the agent's command line: letters, digits and . _ - = only.
plain() {
  case "$2" in
    '' | *[!A-Za-z0-9._=-]*) die "$1 $2: expected letters, digits and . _ - = only" ;;
  esac
}

while [ $# -gt 0 ]; do
  case "$1" in
    --enroll-token | --label | --var | --trusted-key | --supervisor | --prefix | --state-dir | --config-dir | --unit-dir)
      [ $# -ge 2 ] || die "$1 needs a value"
      ;;
  esac
  case "$1" in
    --enroll-token) token="$2" ;;
    --label)
      plain "$1" "$2"
      case "$2" in [A-Za-z]*=[!-]*) ;; *) die "--label $2: expected KEY=VALUE, KEY starting with a letter" ;; esac
      flags="$flags --label $2"
      ;;
    --var)
      plain "$1" "$2"
      case "$2" in [A-Za-z]*=*) ;; *) die "--var $2: expected KEY=VALUE, KEY starting with a letter" ;; esac
      flags="$flags --var $2"
      ;;
    --trusted-key)
      case "$2" in
        *[!0-9a-f]*) die "--trusted-key $2: expected 64 lowercase hex digits" ;;
      esac
      [ "${#2}" -eq 64 ] || die "--trusted-key $2: expected 64 lowercase hex digits"
      keys="$keys $2"
      flags="$flags --trusted-key $2"
      ;;
    --supervisor)
      case "$2" in auto | systemd | builtin) supervisor="$2" ;; *) die "--supervisor $2: expected auto, systemd or builtin" ;; esac
      ;;
    --prefix) prefix="$2" ;;
    --state-dir) state_dir="$2" ;;
    --config-dir) config_dir="$2" ;;
    --unit-dir) unit_dir="$2" ;;
    -h | --help) usage; exit 0 ;;
    *) usage; die "unknown option $1" ;;
  esac
  shift 2
done
for dir in "$prefix" "$state_dir" "$config_dir" "$unit_dir"; do
  case "$dir" in
    /*) case "$dir" in *[!A-Za-z0-9._/-]*) die "$dir: expected an absolute path of letters, digits and . _ - /" ;; esac ;;
    *) die "$dir: expected an absolute path" ;;
  esac
done
[ -n "$token" ] || die "no enrolment token: pass --enroll-token TOKEN (or set MUSCLE_ENROLL_TOKEN)"
case "$token" in *[!A-Za-z0-9._+/=-]*) die "the enrolment token has characters no token has" ;; esac

arch=$(uname -m)
case "$arch" in
@CASES@  *) die "unknown architecture $arch: this deployer has muscle-agent $version for @ARCHES@" ;;
esac

fetch() {
  if command -v curl >/dev/null 2>&1; then
    curl -fsS --retry 3 -o "$2" "$1"
  elif command -v wget >/dev/null 2>&1; then
    wget -q -O "$2" "$1"
  else
    die "neither curl nor wget is installed"
  fi
}

# Bytes from hex digits, in any POSIX sh (dash's printf has no \x: octal escapes).
hex_to_bin() {
  h=$1
  while [ -n "$h" ]; do
    byte=${h%"${h#??}"}
    h=${h#??}
    # shellcheck disable=SC2059 # an octal escape made from the byte
    printf "\\$(printf '%03o' "0x$byte")"
  done
}

# The release manifest must be signed by one of the keys, and list the agent's sha256.
check_signature() {
  dir=$1
  [ -n "$signature" ] || die "muscle-agent $version is not signed, and --trusted-key asks for a signed release: not installed"
  command -v openssl >/dev/null 2>&1 || die "checking the release's signature needs openssl: not installed"
  mkdir -p "$dir"
  printf '%s' "$manifest" | openssl base64 -d -A >"$dir/manifest.json"
  hex_to_bin "$signature" >"$dir/signature"
  signed_by=''
  for key in $keys; do
    # An ed25519 public key as DER: the algorithm's prefix, then the 32 bytes.
    { hex_to_bin 302a300506032b6570032100; hex_to_bin "$key"; } >"$dir/key.der"
    openssl pkey -pubin -inform DER -in "$dir/key.der" -out "$dir/key.pem" 2>/dev/null || continue
    if openssl pkeyutl -verify -pubin -inkey "$dir/key.pem" -rawin -in "$dir/manifest.json" \
      -sigfile "$dir/signature" >/dev/null 2>&1; then
      signed_by=$key
    fi
  done
  [ -n "$signed_by" ] || die "the release's signature is by none of the --trusted-key keys: not installed"
  grep -q "\"$sha256\"" "$dir/manifest.json" ||
    die "the signed manifest does not list sha256 $sha256: not installed"
  say "the release is signed by $signed_by"
}

sha256_of() {
  if command -v sha256sum >/dev/null 2>&1; then
    sha256sum "$1" | cut -d' ' -f1
  elif command -v shasum >/dev/null 2>&1; then
    shasum -a 256 "$1" | cut -d' ' -f1
  else
    openssl dgst -sha256 -r "$1" | cut -d' ' -f1
  fi
}

if [ "$supervisor" = auto ]; then
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    supervisor=systemd
  else
    supervisor=builtin
  fi
fi

bin="$prefix/bin/muscle-agent"
mkdir -p "$prefix/bin" "$state_dir" "$config_dir"
# Downloaded beside its final place, checked, then renamed over it: never half a binary.
tmp="$prefix/bin/.muscle-agent.$$"
trap 'rm -rf "$tmp" "$tmp.check"' EXIT
say "downloading muscle-agent $version for $arch"
fetch "$server/v1/blobs/sha256/$sha256" "$tmp"
got=$(sha256_of "$tmp")
[ "$got" = "$sha256" ] || die "the download's sha256 is $got, expected $sha256: not installed"
[ "$(wc -c <"$tmp" | tr -d ' ')" = "$size" ] || die "the download is not $size bytes: not installed"
[ -z "$keys" ] || check_signature "$tmp.check"
chmod 755 "$tmp"
"$tmp" --version >/dev/null || die "the downloaded agent does not run on this host"
mv -f "$tmp" "$bin"
trap - EXIT
say "installed $bin ($version, sha256 $sha256)"

rm -f "$config_dir/env"
(umask 077 && printf 'MUSCLE_ENROLL_TOKEN=%s\n' "$token" >"$config_dir/env")

case "$supervisor" in
systemd)
  mkdir -p "$unit_dir/muscle-agent.service.d"
  # The agent's own unit (what `muscle-agent systemd-unit --self` prints), and a drop-in with
  # the token's file and what the agent never needs of the host.
  # shellcheck disable=SC2086 # flags: --label/--var/--trusted-key pairs, checked above
  "$bin" systemd-unit --self --state-dir "$state_dir" -- --server "$server" --supervisor systemd --unit-dir "$unit_dir" $flags \
    >"$unit_dir/.muscle-agent.service.$$"
  mv -f "$unit_dir/.muscle-agent.service.$$" "$unit_dir/muscle-agent.service"
  # Jobs and health commands run inside the agent's unit: only what none of them needs is taken.
  cat >"$unit_dir/muscle-agent.service.d/install.conf" <<UNIT
# Written by the deployer's install.sh.
[Service]
EnvironmentFile=$config_dir/env
RestrictRealtime=yes
LockPersonality=yes
UNIT
  systemctl daemon-reload
  systemctl enable muscle-agent.service
  # restart, not start: a second run of this script takes the new binary and flags.
  systemctl restart muscle-agent.service
  say "started muscle-agent.service (systemd)"
  ;;
builtin)
  log="$state_dir/agent.log"
  pidfile="$state_dir/agent.pid"
  # The agent this script started before, if that process is still this agent (not a pid reused
  # since a reboot): stopped, and waited for (it stops its services first), not doubled.
  # (Its binary was just replaced: the kernel names it "(deleted)".)
  old=$(cat "$pidfile" 2>/dev/null || true)
  exe=$(readlink "/proc/${old:-none}/exe" 2>/dev/null || true)
  if [ -n "$old" ] && { [ "$exe" = "$bin" ] || [ "$exe" = "$bin (deleted)" ]; }; then
    kill "$old"
    i=0
    while kill -0 "$old" 2>/dev/null; do
      i=$((i + 1))
      [ "$i" -le 60 ] || die "the agent started before (pid $old) has not stopped within 60 s"
      sleep 1
    done
    say "stopped the agent this script started before (pid $old)"
  fi
  # shellcheck disable=SC2086 # flags: --label/--var/--trusted-key pairs, checked above
  MUSCLE_ENROLL_TOKEN="$token" nohup "$bin" run --server "$server" --state-dir "$state_dir" $flags \
    >>"$log" 2>&1 </dev/null &
  echo $! >"$pidfile"
  say "started the agent in the background (pid $!, log $log); no systemd here: add it to this host's init system to start it at boot"
  ;;
esac

say "waiting for the agent to enrol"
i=0
while [ ! -s "$state_dir/credential" ]; do
  i=$((i + 1))
  if [ "$i" -gt 60 ]; then
    [ -f "$state_dir/agent.log" ] && tail -n 20 "$state_dir/agent.log" >&2
    die "the agent has not enrolled within 60 s (its log says why: $state_dir/agent.log, or journalctl -u muscle-agent)"
  fi
  sleep 1
done
say "enrolled as $(cat "$state_dir/agent-id")"
}

main "$@"
