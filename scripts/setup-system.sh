#!/usr/bin/env bash
# Install the Debian packages the test suite and the bench need, only those missing.
# `make test`, `make bench` and .ci/run call this; `make run` does not (it needs only
# Python and git).
#
#   scripts/setup-system.sh          install what is missing (apt-get as root, else sudo -n)
#   scripts/setup-system.sh --check  list what is missing, install nothing; exit 1 if any
set -euo pipefail

PYTHON="${PYTHON:-python3}"

# What the tests need, one entry a line: "<probe>|<Debian packages>". The probe is a
# shell command that succeeds when the packages are present. Add later needs here.
REQUIREMENTS=(
  "have git|git"
  "have make|make"
  "have curl|curl"                              # the README's tour
  "have zstd|zstd"                              # the README's tour
  "python_ok|python3 python3-venv"              # the virtualenv make test builds
  "have_browser|chromium"                       # the status page's browser test
  "[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]|fonts-dejavu-core"
  "have_postgres|postgresql"                    # the PostgreSQL catalogue's tests
  "have runuser|util-linux"                     # initdb runs as the postgres user
  "have_nginx|nginx"                            # the load balancer in front of receivers
  "have wrk|wrk"                                # the bench's small-wrk figure and its smoke test
)

have() { command -v "$1" >/dev/null 2>&1; }
have_browser() { have chromium || have chromium-browser || have google-chrome; }
have_postgres() { compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; }
have_nginx() { have nginx || [ -x /usr/sbin/nginx ]; }

# Debian starts a package's service when it is installed (nginx on port 80, a PostgreSQL
# cluster on 5432). The tests start their own servers on loopback ports; keep these off.
POLICY_RC_D="${SETUP_POLICY_RC_D:-/usr/sbin/policy-rc.d}"
python_ok() {
  "$PYTHON" -c 'import sys, venv, ensurepip; assert sys.version_info >= (3, 11)' 2>/dev/null
}

missing_packages() {
  local entry probe packages
  for entry in "${REQUIREMENTS[@]}"; do
    probe="${entry%%|*}"
    packages="${entry#*|}"
    eval "$probe" || printf '%s ' $packages
  done
}

# How to reach apt-get: "root" as root, "sudo" when `sudo -n` works, else nothing.
apt_access() {
  if [ "$(id -u)" -eq 0 ]; then
    echo root
  elif have sudo && sudo -n true 2>/dev/null; then
    echo sudo
  fi
}

install() {
  local access="$1"
  shift
  local apt=(apt-get)
  # sudo's env_reset would drop an exported DEBIAN_FRONTEND; pass it through env.
  [ "$access" = sudo ] && apt=(sudo -n env DEBIAN_FRONTEND=noninteractive apt-get)
  export DEBIAN_FRONTEND=noninteractive
  echo "setup-system: installing $*" >&2
  "${apt[@]}" update -qq
  local placed=""
  if [ "$access" = root ] && [ ! -e "$POLICY_RC_D" ]; then
    printf '#!/bin/sh\n# setup-system: no service starts while it installs\nexit 101\n' >"$POLICY_RC_D"
    chmod +x "$POLICY_RC_D"
    placed=yes
  fi
  "${apt[@]}" install -y -qq "$@" >/dev/null || { [ -n "$placed" ] && rm -f "$POLICY_RC_D"; return 1; }
  [ -n "$placed" ] && rm -f "$POLICY_RC_D"
  return 0
}

main() {
  local missing access
  read -r -a missing <<<"$(missing_packages)"
  [ "${#missing[@]}" -eq 0 ] && exit 0
  if [ "${1:-}" = "--check" ]; then
    echo "setup-system: missing: ${missing[*]}" >&2
    exit 1
  fi
  access="$(apt_access)"
  if [ -z "$access" ] || ! have apt-get; then
    echo "setup-system: missing system packages; run: sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  install "$access" "${missing[@]}"
  # Probe again: a package name that installs something else must not pass silently.
  read -r -a missing <<<"$(missing_packages)"
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup-system: still missing after apt-get install: ${missing[*]}" >&2
    exit 1
  fi
}

main "$@"
