#!/usr/bin/env bash
# dev.sh: set up a development machine and run the project's jobs.
#
#   ./dev.sh demo        install what is needed, then run the proxy in demo mode
#   ./dev.sh test        install what is needed, then run every test stage
#   ./dev.sh test fast   only the fast stage (unit and integration tests)
#   ./dev.sh setup       only install (apt packages and .venv)
#
# Works on a fresh Debian 12 or Ubuntu machine as root (or with sudo).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV="$ROOT/.venv"
APT_PACKAGES=(python3 python3-venv openssh-server openssh-client socat curl shellcheck
              prometheus debootstrap systemd-container util-linux iproute2 iptables lm-sensors
              qemu-user-static binfmt-support lxc)

say() { printf 'dev.sh: %s\n' "$*" >&2; }
err() { say "error: $*"; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

install_apt_packages() {
    local missing=() pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    say "installing apt packages: ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

install_venv() {
    local stamp="$VENV/.installed" want
    want=$(cat "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" | sha256sum | cut -d' ' -f1)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return 0; fi
    say "creating $VENV"
    /usr/bin/python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check --require-hashes -r "$ROOT/requirements.txt"
    "$VENV/bin/pip" install -q --disable-pip-version-check -r "$ROOT/requirements-dev.txt"
    echo "$want" > "$stamp"
}

# The aarch64 pyz is run under qemu-user-static when the kernel hands aarch64 binaries to it;
# best effort: without it that one test is skipped and says why.
enable_aarch64_binfmt() {
    local dir=/proc/sys/fs/binfmt_misc
    [ -e "$dir/qemu-aarch64" ] && return 0
    command -v update-binfmts >/dev/null || return 0
    if [ ! -e "$dir/register" ]; then
        as_root mount -t binfmt_misc binfmt_misc "$dir" 2>/dev/null || return 0
    fi
    as_root update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 \
        || say "note: could not enable qemu-aarch64 in binfmt_misc; the aarch64 run test will be skipped"
}

setup() {
    install_apt_packages
    install_venv
}

run_tests() {
    local stage=${1:-all}
    cd "$ROOT"
    case "$stage" in
        fast) "$VENV/bin/python" -m pytest -q tests --ignore=tests/system ;;
        system) "$VENV/bin/python" -m pytest -q tests/system ;;
        all) "$VENV/bin/python" -m pytest -q tests --ignore=tests/system
             "$VENV/bin/python" -m pytest -q tests/system ;;
        *) err "unknown test stage '$stage' (fast, system or all)" ;;
    esac
}

main() {
    local cmd=${1:-}
    [ $# -gt 0 ] && shift
    case "$cmd" in
        setup) setup ;;
        demo) setup; exec "$VENV/bin/python" "$ROOT/pulse_sensor_proxy.py" demo "$@" ;;
        test) setup; enable_aarch64_binfmt; run_tests "$@" ;;
        -h|--help|help|"") sed -n '2,9s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" ;;
        *) err "unknown command '$cmd' (try --help)" ;;
    esac
}

main "$@"
