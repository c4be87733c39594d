#!/usr/bin/env bash
# install-sensor-proxy.sh: install, update or remove pulse-sensor-proxy on a Proxmox VE host.
# `install-sensor-proxy.sh --help` is the manual.
set -euo pipefail

usage() {
    cat <<'EOF'
install-sensor-proxy.sh: install, update or remove pulse-sensor-proxy on a Proxmox VE host.

pulse-sensor-proxy runs on the host as its own unprivileged account and reads temperatures
(`sensors -j`) from every cluster node over SSH. Containers running Pulse reach it through a Unix
socket that this script bind-mounts into them, so no SSH key ever has to live in a container.

USAGE
  curl -fsSL <url>/install-sensor-proxy.sh | bash -s -- --ctid 105 --version V --url BASE
  bash install-sensor-proxy.sh --pyz ./pulse-sensor-proxy-x86_64.pyz --ctid 105
  bash install-sensor-proxy.sh --uninstall [--purge | --restore-original]
  bash install-sensor-proxy.sh             (on a terminal: a menu)

WHAT TO INSTALL (one of; none keeps the binary already installed)
  --pyz PATH             the pulse-sensor-proxy .pyz to install (offline)
  --version V --url BASE download BASE/V/pulse-sensor-proxy-<uname -m>.pyz and check it
                         against BASE/V/SHA256SUMS

WHERE
  --ctid N               connect container N (repeatable, or a comma list: 105,106); several
                         containers share one proxy. The container must be unprivileged.
  --standalone           no container: the proxy serves this host only (Pulse installed natively
                         or in Docker on this host)

HTTPS MODE (a Pulse on another machine: a VM, Docker elsewhere, another cluster)
  --http-mode            also serve temperatures over HTTPS (GET /temps?node=NAME with a bearer
                         token); creates /etc/pulse-sensor-proxy/tls/ (self-signed certificate,
                         kept if present) and the token file /etc/pulse-sensor-proxy/http-token
  --http-addr ADDR       listen address (default 0.0.0.0:8443; [::]:8443 for IPv6)
  --pulse-server URL     register with that Pulse (POST URL/api/temperature-proxy/register) and
                         keep the token it answers; without it, the token is printed to paste
                         into Pulse. Skipped while the token file exists.
  --proxy-url URL        the address Pulse is told to use (default https://<this host's first
                         address>:<port>)
  --http-allowed-clients CIDR,...  addresses that may connect (default: allowed_source_subnets)
  Firewall: open the port (8443/tcp) from Pulse's address only, e.g. in the Proxmox firewall
  (Datacenter or Node > Firewall: accept tcp 8443 from Pulse's IP). A stolen token reads
  temperatures, and only from the allowed addresses.

OPTIONS
  --allowed-subnets CIDR,...  subnets the nodes accept the proxy's SSH key from (from="...");
                              without it (and none in the config) this host's own addresses
  --enable-rotation-timer     also enable the quarterly key rotation timer
  --allow-cleanup        with --ctid: the containers' uids may also call request_cleanup (what
                         Pulse calls when a node is removed from it), which has a root unit
                         remove the proxy's key from the node it names. WARNING: a container
                         allowed this can switch any node's temperatures off. Without the flag
                         only root on this host may; a later run without it takes nothing away
                         (remove `cleanup` from the entry in config.yaml for that).
  --no-restart           never restart a container; print what to do instead
  --uninstall            stop and remove the service, units and binary, revoke the proxy's key
                         on every node, remove only this script's lines from container configs,
                         remove the HTTPS token and TLS files; state (/var/lib/pulse-sensor-proxy) and config are kept
  --purge                with --uninstall: also remove state, config and the service account
  --restore-original     with --uninstall, on a host taken over from the original proxy: put
                         its files back from the newest /var/backups/pulse-sensor-proxy/original-*/
                         and its config from config.yaml.bak, and start it again; the key, its
                         lines on the nodes, the containers' mount lines, /run/pulse-sensor-proxy
                         and the TLS files stay, as it uses them too
  --dry-run              print every action, change nothing
  --quiet                print only warnings, errors and the summary
  -h, --help             this manual

STEPS (each idempotent, each reported in one line: "ok" already in place, "changed" done now)
  1 preflight: root, systemd, python3 >= 3.11, architecture, Proxmox VE or standalone
  2 service account pulse-sensor-proxy (system user, own group, no home, /usr/sbin/nologin)
  3 directories: /var/lib/pulse-sensor-proxy 0750, ssh/ 0700 (keys 0600/0640),
    ssh.d/{next,prev} 0750, /etc/pulse-sensor-proxy 0750
  4 the original proxy (Pulse's own, installed by Pulse's installer), if found: its self-heal
    timer and service, then its clean-up path unit, stopped and disabled (the self-heal would
    reinstall it); their units, its helpers, binary and installer copy moved to
    /var/backups/pulse-sensor-proxy/original-<time>/ (its key and state are kept where they
    are; its forced commands for the nodes move once every node has the new key line)
    binary /usr/local/bin/pulse-sensor-proxy, swapped atomically; if the new version does not
    start, the previous binary is put back
  5 /etc/pulse-sensor-proxy/config.yaml created or merged (your edits are kept), validated first;
    allowed_source_subnets always explicit (the daemon's sandbox cannot see this host's addresses);
    a config of the original proxy is first rewritten in this one's vocabulary (config migrate,
    the original kept as config.yaml.bak)
  6 systemd units installed, service enabled and started, socket checked
  7 the proxy's SSH key pushed to every cluster node (forced command: `sensors -j`, or with
    disk_temperatures the fixed SMART command line, see README)
  8 each container: mount entry, read access for its uid range, legacy SSH keys moved out of it
    (revoked on every node, kept in a root-only backup on the host), restart if needed, the
    files below pushed into it, check
  9 summary
  A second run changes nothing and says so.

CONTAINER CONFIG LINE (in /etc/pve/lxc/<CTID>.conf, main section; edited under pct's own lock)
  lxc.mount.entry: /run/pulse-sensor-proxy mnt/pulse-proxy none bind,create=dir,optional 0 0
  Not under /run: the container's systemd mounts a fresh tmpfs on /run after LXC's mounts and
  hides them. `optional` keeps the container starting where the proxy is not installed (another
  node after a migration, or after --uninstall). A socket-level entry or an
  `mpN: /run/pulse-sensor-proxy...` mount point left by an older installer is replaced by this
  line, keeping its container path unless that is under /run; such lines in [pve:pending] are
  dropped; snapshot sections are left as they are.

INSIDE A RUNNING CONTAINER (written with pct push; listed in the summary; --uninstall removes them)
  /etc/tmpfiles.d/pulse-sensor-proxy.conf   links /run/pulse-sensor-proxy to /mnt/pulse-proxy
                                            at every boot (for Pulse releases before v4.26)
  /etc/systemd/system/pulse.service.d/10-pulse-sensor-proxy.conf   (or pulse-backend.service.d)
                                            PULSE_SENSOR_PROXY_SOCKET for Pulse's service
  A path that is a link, or a file this script did not write, is left as it is (a warning).

EXIT STATUS
  0 done (or nothing to do), 1 a step failed, 2 bad usage
EOF
}

readonly ACCOUNT=pulse-sensor-proxy
readonly PVE_GROUP=www-data
readonly SERVICE=pulse-sensor-proxy.service
readonly ROTATION_TIMER=pulse-sensor-proxy-key-rotation.timer
readonly CLEANUP_PATH=pulse-sensor-proxy-cleanup.path
readonly SMART_SERVICE=pulse-sensor-proxy-smart.service
readonly SMART_TIMER=pulse-sensor-proxy-smart.timer
readonly MIN_PYTHON=3.11   # the pyz needs it (asyncio.timeout); Proxmox VE 8 has 3.11
readonly RUN_DIR=/run/pulse-sensor-proxy
readonly SOCKET_NAME=pulse-sensor-proxy.sock
readonly DEFAULT_CONTAINER_DIR=mnt/pulse-proxy
readonly MOUNT_OPTIONS=bind,create=dir,optional
readonly DEFAULT_UID_RANGE=100000-165535
readonly LEGACY_KEY_DIRS="/root/.ssh /home/pulse/.ssh /opt/pulse/.ssh /etc/pulse/.ssh"
readonly SOCKET_WAIT_SECONDS=30
# Written into a running container (each starting with CT_FILE_MARK; --uninstall removes them):
# a link from /run at every boot, and the socket's path for Pulse's service (pulse.service from
# Pulse's installer, pulse-backend.service from the Proxmox VE helper scripts).
readonly CT_TMPFILES=/etc/tmpfiles.d/pulse-sensor-proxy.conf
readonly CT_DROPIN=10-pulse-sensor-proxy.conf
readonly PULSE_UNITS="pulse.service pulse-backend.service"
readonly CT_FILE_MARK="# Written by install-sensor-proxy.sh (pulse-sensor-proxy); its --uninstall removes this file."
readonly HTTP_DEFAULT_ADDR=0.0.0.0:8443
# What the original proxy's installer (Pulse's scripts/install-sensor-proxy.sh, v4.24..v5.0.17)
# leaves on a host besides the state and config this proxy shares with it. Its self-heal timer
# reinstalls the original whenever pulse-sensor-proxy.service is missing or fails, so it goes
# first; its clean-up path unit runs its own root script on the nodes.
readonly ORIGINAL_UNITS=(pulse-sensor-proxy-selfheal.timer pulse-sensor-proxy-selfheal.service
                         pulse-sensor-cleanup.path pulse-sensor-cleanup.service)
readonly ORIGINAL_HOME=/opt/pulse/sensor-proxy
readonly ORIGINAL_FILES=("$ORIGINAL_HOME/bin/pulse-sensor-proxy" "$ORIGINAL_HOME/install-sensor-proxy.sh"
                         "$ORIGINAL_HOME/bin/pulse-sensor-proxy-selfheal.sh" "$ORIGINAL_HOME/bin/pulse-sensor-cleanup.sh")
# The forced commands of the original's key lines on the nodes: kept until keys push has
# upgraded every line, as this host is one of the nodes.
readonly ORIGINAL_WRAPPERS=("$ORIGINAL_HOME/bin/pulse-sensor-wrapper.sh"
                            /usr/local/libexec/pulse-sensor-proxy/temp-wrapper.sh)
# The original's service unit (as every release of its installer writes it) names its project;
# ours does not.
readonly ORIGINAL_UNIT_MARK='^Documentation=https://github.com/rcourtman/Pulse'

# Every path on the host hangs off ROOT, which is empty outside the installer's own tests (they
# set PULSE_INSTALL_ROOT, as a user would).
readonly ROOT=${PULSE_INSTALL_ROOT:-}
readonly BIN=$ROOT/usr/local/bin/pulse-sensor-proxy
readonly STATE_DIR=$ROOT/var/lib/pulse-sensor-proxy
readonly CONF_DIR=$ROOT/etc/pulse-sensor-proxy
readonly CONFIG=$CONF_DIR/config.yaml
readonly UNIT_DIR=$ROOT/etc/systemd/system
readonly PVE_DIR=$ROOT/etc/pve
readonly PVE_LOCK_DIR=$ROOT/run/lock/lxc
readonly SOCKET=$ROOT$RUN_DIR/$SOCKET_NAME
readonly BACKUP_DIR=$ROOT/var/backups/pulse-sensor-proxy
readonly TLS_DIR=$CONF_DIR/tls
readonly TOKEN_FILE=$CONF_DIR/http-token

# Options: set by parse_args only (by its menu too, when no action is given), readonly from main
# on, so no step changes them.
ACTION=
CTIDS=()
STANDALONE=0
PYZ=
VERSION=
URL=
SUBNETS=()
ROTATION=0
ALLOW_CLEANUP=0
NO_RESTART=0
PURGE=0
RESTORE_ORIGINAL=0
DRY_RUN=0
QUIET=0
HTTP_MODE=0
HTTP_ADDR=
PULSE_SERVER=
PROXY_URL=
HTTP_CLIENTS=()

# Run state: what this run found and did, each set only where its comment says.
IS_PVE=0                       # preflight (do_uninstall too): 1 on Proxmox VE
ARCH=                          # preflight: this host's architecture (uname -m)
WORK=                          # main: the work directory, removed on exit (cleanup)
CANDIDATE=                     # select_binary, download_pyz: the pyz to install; empty keeps the binary
PROXY=                         # select_binary: what proxy runs (the candidate under --dry-run)
PREVIOUS_BIN=                  # install_binary: the replaced binary until start_service (roll_back_binary)
CHANGED=()                     # the steps: what changed that a later step acts on (changed_this_run)
ORIGINAL_BACKUP=               # ensure_original_backup: this run's backup of the original proxy
ORIGINAL_MOVED=()              # retire_original_file: the original's paths put into ORIGINAL_BACKUP
KEYS_PUSHED=0                  # push_keys: 1 once every node has the proxy's key line
CHANGES=0                      # report_changed: changes made (or, under --dry-run, to be made)
declare -A CT_UID_RANGES=()    # check_containers: each container's host uid ranges
CT_FILES=()                    # ct_put_file: ID:PATH of our files inside containers
NOTES=()                       # note: lines for the summary

say() { [ "$QUIET" -eq 1 ] || printf '%s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
# err MESSAGE: stop the whole script, also from a pipeline or $(...), which run in a subshell
# whose exit alone would not: the subshell signals the script, whose trap stops it.
err() {
    printf 'error: %s\n' "$*" >&2
    if [ "$BASHPID" != "$$" ]; then kill -USR1 "$$"; exit 1; fi
    stop_failed
}
stop_failed() { roll_back_binary; original_backup_hint; exit 1; }
usage_err() { printf 'error: %s (see --help)\n' "$*" >&2; exit 2; }

# run CMD...: carry out one change, or under --dry-run only print it.
run() {
    if [ "$DRY_RUN" -eq 1 ]; then
        printf 'would run:'; printf ' %q' "$@"; printf '\n'
        return 0
    fi
    "$@"
}

# One line per step: "ok" when already in place, "changed" when this run did it.
report_ok() { say "ok       $*"; }
report_changed() {
    CHANGES=$((CHANGES + 1))
    if [ "$DRY_RUN" -eq 1 ]; then say "would    $*"; else say "changed  $*"; fi
}
note() { NOTES+=("$*"); }

# CHANGED names what this run changed that a later step acts on: binary, units, https (each
# restarts the service), config (reloads it), config-migrated (rolled back with the binary,
# named in the summary), new-token (printed in the summary to paste into Pulse).
# changed_this_run WHAT...: whether this run changed any of WHAT.
changed_this_run() {
    local what
    for what; do [[ " ${CHANGED[*]} " != *" $what "* ]] || return 0; done
    return 1
}

# ---------------------------------------------------------------- arguments

add_ctids() {
    local list=$1 id
    IFS=, read -r -a ids <<<"$list"
    for id in "${ids[@]}"; do
        [[ $id =~ ^[1-9][0-9]{2,8}$ ]] || usage_err "--ctid needs container IDs (100-999999999), got '$id'"
        [[ " ${CTIDS[*]} " == *" $id "* ]] || CTIDS+=("$id")
    done
}

add_subnets() {
    local list=$1 cidr
    IFS=, read -r -a cidrs <<<"$list"
    for cidr in "${cidrs[@]}"; do
        [[ $cidr =~ ^[0-9A-Fa-f.:]+(/[0-9]{1,3})?$ ]] || usage_err "--allowed-subnets needs CIDRs, got '$cidr'"
        SUBNETS+=("$cidr")
    done
}

need_value() { if [ $# -lt 2 ] || [ -z "$2" ]; then usage_err "$1 needs a value"; fi; }

parse_args() {
    while [ $# -gt 0 ]; do
        case "$1" in
            --ctid) need_value "$@"; add_ctids "$2"; shift ;;
            --ctid=*) add_ctids "${1#*=}" ;;
            --standalone) STANDALONE=1 ;;
            --pyz) need_value "$@"; PYZ=$2; shift ;;
            --version) need_value "$@"; VERSION=$2; shift ;;
            --url) need_value "$@"; URL=${2%/}; shift ;;
            --allowed-subnets) need_value "$@"; add_subnets "$2"; shift ;;
            --enable-rotation-timer) ROTATION=1 ;;
            --allow-cleanup) ALLOW_CLEANUP=1 ;;
            --no-restart) NO_RESTART=1 ;;
            --uninstall) ACTION=uninstall ;;
            --purge) PURGE=1 ;;
            --restore-original) RESTORE_ORIGINAL=1 ;;
            --dry-run) DRY_RUN=1 ;;
            --quiet) QUIET=1 ;;
            --http-mode) parse_http_arg "$1" ;;
            --http-addr|--pulse-server|--proxy-url|--http-allowed-clients)
                need_value "$@"; parse_http_arg "$1" "$2"; shift ;;
            -h|--help) usage; exit 0 ;;
            *) usage_err "unknown argument '$1'" ;;
        esac
        shift
    done
    if [ "${#CTIDS[@]}" -gt 0 ] || [ "$STANDALONE" -eq 1 ]; then
        [ "$ACTION" = uninstall ] && usage_err "--uninstall takes no --ctid or --standalone"
        ACTION=install
    fi
    [ "${#CTIDS[@]}" -gt 0 ] && [ "$STANDALONE" -eq 1 ] && usage_err "--standalone and --ctid exclude each other"
    [ "$ALLOW_CLEANUP" -eq 1 ] && [ "${#CTIDS[@]}" -eq 0 ] \
        && usage_err "--allow-cleanup goes with --ctid (root on this host may request clean-ups anyway)"
    check_http_args
    [ "$PURGE" -eq 1 ] && [ "$ACTION" != uninstall ] && usage_err "--purge goes with --uninstall"
    [ "$RESTORE_ORIGINAL" -eq 1 ] && [ "$ACTION" != uninstall ] && usage_err "--restore-original goes with --uninstall"
    [ "$RESTORE_ORIGINAL" -eq 1 ] && [ "$PURGE" -eq 1 ] \
        && usage_err "--restore-original and --purge exclude each other (the original needs the state and config)"
    [ -n "$PYZ" ] && [ -n "$VERSION$URL" ] && usage_err "--pyz and --version/--url exclude each other"
    if [ -n "$VERSION" ] || [ -n "$URL" ]; then
        if [ -z "$VERSION" ] || [ -z "$URL" ]; then usage_err "--version and --url go together"; fi
    fi
    if [ -z "$ACTION" ]; then
        [ -t 0 ] || usage_err "nothing to do: give --ctid N, --standalone or --uninstall"
        choose_from_menu
    fi
    return 0
}

# freeze_options: every option readonly once parse_args has set them, so no step changes one.
freeze_options() {
    readonly ACTION CTIDS STANDALONE PYZ VERSION URL SUBNETS ROTATION ALLOW_CLEANUP NO_RESTART PURGE \
             RESTORE_ORIGINAL DRY_RUN QUIET HTTP_MODE HTTP_ADDR PULSE_SERVER PROXY_URL HTTP_CLIENTS
}

choose_from_menu() {
    local answer ids
    printf 'pulse-sensor-proxy installer\n  [1] Install or update  [2] Remove  [3] Cancel\nChoice: '
    read -r answer || answer=3
    case "$answer" in
        1) ACTION=install
           printf 'Container IDs to connect (comma list, empty for none): '
           read -r ids || ids=
           if [ -n "$ids" ]; then add_ctids "$ids"; else STANDALONE=1; fi ;;
        2) ACTION=uninstall ;;
        *) say "Cancelled: nothing changed."; exit 0 ;;
    esac
}

# ---------------------------------------------------------------- container config text
# Only the main section (before the first "[snapshot]" header) is read or edited; every other
# line is copied byte for byte, CRLF line ends and a missing final newline included.

# awk program shared by the conf_* functions. MODE: "add" (our mount entry exactly once per
# container path), "remove" (drop every line mounting the proxy's directory), "report" (one line
# per legacy line that "add" replaces or drops). A container path under /run becomes
# DEFAULT_DIR: the container's systemd mounts a fresh tmpfs on /run after LXC's bind mounts,
# hiding them. [pve:pending] (pve-container's parse_pct_config: changes not applied yet) gets
# the same treatment for our lines, except that "add" drops them there, the main section
# holding the entry; snapshot sections are history and stay byte for byte.
# shellcheck disable=SC2016 # awk program, not shell
readonly CONF_AWK='
function container_dir(line,   rest, n, f, src, target, i, opts) {
    # -> container path of a line that mounts the proxy runtime dir or socket, "" otherwise
    rest = line
    if (rest ~ /^lxc\.mount\.entry[ \t]*[:=]/) {
        sub(/^lxc\.mount\.entry[ \t]*[:=][ \t]*/, "", rest)
        n = split(rest, f, /[ \t]+/)
        src = f[1]; target = f[2]
    } else if (rest ~ /^mp[0-9]+[ \t]*:/) {
        sub(/^mp[0-9]+[ \t]*:[ \t]*/, "", rest)
        n = split(rest, f, ",")
        src = f[1]; target = ""
        for (i = 2; i <= n; i++) if (f[i] ~ /^mp=/) target = substr(f[i], 4)
    } else return ""
    if (src !~ "^" RUN_DIR "(/|$)" || target == "") return ""
    if (src ~ /\.sock$/) sub(/\/[^\/]*$/, "", target)
    sub(/^\/+/, "", target)
    sub(/\/+$/, "", target)
    if (target ~ /^(var\/)?run(\/|$)/) target = DEFAULT_DIR
    return target
}
function entry(dir) { return "lxc.mount.entry: " RUN_DIR " " dir " none " OPTIONS " 0 0" }
function out(text) { if (MODE != "report") print text }
function flush_blanks() { if (MODE != "report") printf "%s", blanks; blanks = "" }
NR == 1 { eol = ($0 ~ /\r$/) ? "\r" : "" }
{
    line = $0; sub(/\r$/, "", line)
    if (in_snapshots) { out($0); next }
    if (line ~ /^\[/) {
        if (MODE == "add" && !emitted_any) { out(entry(DEFAULT_DIR) eol); emitted_any = 1 }
        flush_blanks(); out($0)
        if (line ~ /^\[pve:pending\][ \t]*$/) in_pending = 1; else in_snapshots = 1
        next
    }
    if (line ~ /^[ \t]*$/) { blanks = blanks $0 "\n"; next }
    flush_blanks()
    dir = container_dir(line)
    if (dir == "") { out($0); next }
    if (MODE == "report" && in_pending) { print "[pve:pending] " line " -> (removed)"; next }
    if (MODE == "remove" || in_pending) next
    if (MODE == "report") { if (line != entry(dir)) print line " -> " entry(dir); next }
    if (!(dir in emitted)) { out(entry(dir) eol); emitted[dir] = 1; emitted_any = 1 }
}
END {
    if (!in_snapshots) {
        if (MODE == "add" && !emitted_any) out(entry(DEFAULT_DIR) eol)
        flush_blanks()
    }
}'

conf_awk() {
    local mode=$1 file=$2 text eol=$'\n' missing_newline=0 out
    text=$(cat "$file"; printf x); text=${text%x}
    # awk ends every line with a newline: end the text with one (CRLF in a CRLF file) and take
    # it off again afterwards, so a file without a final newline keeps having none.
    if [ -n "$text" ] && [ "${text: -1}" != $'\n' ]; then
        missing_newline=1
        [[ ${text%%$'\n'*} == *$'\r' ]] && eol=$'\r\n'
        text+=$eol
    fi
    out=$(printf '%s' "$text" | awk -v MODE="$mode" -v RUN_DIR="$RUN_DIR" -v OPTIONS="$MOUNT_OPTIONS" \
              -v DEFAULT_DIR="$DEFAULT_CONTAINER_DIR" "$CONF_AWK"; printf x)
    out=${out%x}
    if [ "$missing_newline" -eq 1 ] && [ "$mode" != report ]; then out=${out%"$eol"}; fi
    printf '%s' "$out"
}

# conf_with_mount FILE: the file's text with our mount entry exactly once (legacy lines replaced).
conf_with_mount() { conf_awk add "$1"; }
# conf_without_mount FILE: the file's text without any line mounting the proxy directory.
conf_without_mount() { conf_awk remove "$1"; }
# conf_legacy_lines FILE: "OLD -> NEW" for each line conf_with_mount rewrites.
conf_legacy_lines() { conf_awk report "$1"; }

conf_main_section() { awk '/^\[/ { exit } { sub(/\r$/, ""); print }' "$1"; }

conf_is_unprivileged() { conf_main_section "$1" | grep -Eq '^unprivileged:[[:space:]]*1[[:space:]]*$'; }

# conf_uid_ranges FILE: host uid ranges ("LO-HI", one a line) the container's users map to.
# Fails when a container user maps to host root.
conf_uid_ranges() {
    local maps
    maps=$(conf_main_section "$1" | awk '
        /^lxc\.idmap[ \t]*[:=]/ {
            sub(/^lxc\.idmap[ \t]*[:=][ \t]*/, "")
            if ($1 == "u" && $3 ~ /^[0-9]+$/ && $4 ~ /^[1-9][0-9]*$/) print $3 "-" ($3 + $4 - 1)
        }')
    [ -n "$maps" ] || maps=$DEFAULT_UID_RANGE
    if printf '%s\n' "$maps" | grep -q '^0-'; then return 1; fi
    printf '%s\n' "$maps"
}

# ---------------------------------------------------------------- files

# write_file DEST MODE OWNER GROUP WHAT < CONTENT: replace DEST atomically when content or mode
# differ; a change counts in CHANGES (report_changed).
write_file() {
    local dest=$1 mode=$2 owner=$3 group=$4 what=$5 tmp
    tmp=$(mktemp "$WORK/new.XXXXXX")
    cat >"$tmp"
    if [ -f "$dest" ] && cmp -s "$tmp" "$dest" && [ "$(stat -c '%a %U %G' "$dest")" = "$mode $owner $group" ]; then
        report_ok "$what"
        return 0
    fi
    report_changed "$what"
    run install -m "$mode" -o "$owner" -g "$group" "$tmp" "$dest.new"
    run mv -f "$dest.new" "$dest"
}

# refuse_link PATH: the service account owns what is under the state dir and could plant a
# symlink or a hard link there; root must never chown or chmod whatever that points at.
refuse_link() {
    if [ -L "$1" ]; then
        err "$1 is a symlink; refusing to follow it (move it away, then run this again)"
    fi
    if [ -f "$1" ] && [ "$(stat -c %h -- "$1")" -ne 1 ]; then
        err "$1 has $(stat -c %h -- "$1") hard links; refusing to change it (move it away, then run this again)"
    fi
}

ensure_dir() {
    local path=$1 mode=$2 owner=$3 group=$4
    refuse_link "$path"
    if [ -d "$path" ] && [ "$(stat -c '%a %U %G' "$path")" = "$mode $owner $group" ]; then
        report_ok "$path $mode $owner:$group"
        return 0
    fi
    report_changed "$path $mode $owner:$group"
    run install -d -m "$mode" -o "$owner" -g "$group" "$path"
}

ensure_file_mode() {
    local path=$1 mode=$2 owner=$3 group=$4
    refuse_link "$path"
    [ -e "$path" ] || return 0
    [ -f "$path" ] || err "$path is not a regular file; refusing it (move it away, then run this again)"
    if [ "$(stat -c '%a %U %G' "$path")" = "$mode $owner $group" ]; then
        report_ok "$path $mode $owner:$group"
        return 0
    fi
    report_changed "$path $mode $owner:$group"
    run chown -h "$owner:$group" "$path"
    run chmod "$mode" "$path"
}

# ---------------------------------------------------------------- 1 preflight

check_containers() {
    local id conf ranges
    for id in "${CTIDS[@]}"; do
        conf=$PVE_DIR/lxc/$id.conf
        [ -f "$conf" ] || err "container $id: $conf not found; run this on the node that hosts it"
        conf_is_unprivileged "$conf" || err "container $id is privileged: its root is the host's root, so the proxy could not tell it from the host and the container could read the proxy's keys anyway. Convert it to an unprivileged container (backup, then restore with --unprivileged 1) and run this again."
        ranges=$(conf_uid_ranges "$conf") || err "container $id maps a user to host root (lxc.idmap); refusing to grant it access"
        CT_UID_RANGES[$id]=$ranges
    done
}

preflight() {
    local python_version
    [ "$(id -u)" -eq 0 ] || err "run as root (sudo bash $0 ...)"
    [ -d "$ROOT/run/systemd/system" ] || err "systemd is not running here; the proxy needs it"
    command -v python3 >/dev/null || err "python3 >= $MIN_PYTHON is required (apt-get install python3)"
    python_version=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    python3 -c "import sys; sys.exit(sys.version_info[:2] < tuple(map(int, '$MIN_PYTHON'.split('.'))))" \
        || err "python3 >= $MIN_PYTHON is required, found $python_version (Proxmox VE 8 or later has it)"
    ARCH=$(uname -m)
    case "$ARCH" in
        x86_64|aarch64) ;;
        *) err "unsupported architecture $ARCH (x86_64 or aarch64)" ;;
    esac
    if command -v pvecm >/dev/null || [ -d "$PVE_DIR" ]; then IS_PVE=1; fi
    if [ "${#CTIDS[@]}" -gt 0 ]; then
        [ "$IS_PVE" -eq 1 ] || err "--ctid needs Proxmox VE ($PVE_DIR not found); use --standalone"
        check_containers
    fi
    if [ "$IS_PVE" -eq 1 ]; then
        report_ok "preflight: root, systemd, python3 $python_version, $ARCH, Proxmox VE"
    else
        report_ok "preflight: root, systemd, python3 $python_version, $ARCH, standalone (no Proxmox VE)"
    fi
}

# ---------------------------------------------------------------- 2 account, 3 directories

ensure_account() {
    if getent passwd "$ACCOUNT" >/dev/null; then
        report_ok "service account $ACCOUNT"
        return 0
    fi
    report_changed "service account $ACCOUNT"
    run useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin "$ACCOUNT"
}

# pmxcfs serves /etc/pve (all but priv/) to group www-data only: the account joins it to read
# the cluster's membership and the nodes' host keys, as the original proxy's did.
ensure_cluster_group() {
    [ "$IS_PVE" -eq 1 ] && getent group "$PVE_GROUP" >/dev/null || return 0
    if id -nG "$ACCOUNT" 2>/dev/null | tr ' ' '\n' | grep -qx "$PVE_GROUP"; then
        report_ok "service account in group $PVE_GROUP (reads /etc/pve/.members)"
        return 0
    fi
    report_changed "service account in group $PVE_GROUP (reads /etc/pve/.members)"
    run usermod --append --groups "$PVE_GROUP" "$ACCOUNT"
}

ensure_directories() {
    ensure_dir "$STATE_DIR" 750 "$ACCOUNT" "$ACCOUNT"
    ensure_dir "$STATE_DIR/ssh" 700 "$ACCOUNT" "$ACCOUNT"
    ensure_file_mode "$STATE_DIR/ssh/id_ed25519" 600 "$ACCOUNT" "$ACCOUNT"
    ensure_file_mode "$STATE_DIR/ssh/id_ed25519.pub" 640 "$ACCOUNT" "$ACCOUNT"
    ensure_dir "$STATE_DIR/ssh.d" 750 "$ACCOUNT" "$ACCOUNT"
    ensure_dir "$STATE_DIR/ssh.d/next" 750 "$ACCOUNT" "$ACCOUNT"
    ensure_dir "$STATE_DIR/ssh.d/prev" 750 "$ACCOUNT" "$ACCOUNT"
    ensure_dir "$CONF_DIR" 750 root "$ACCOUNT"
}

# ---------------------------------------------------------------- 4 binary

download_pyz() {
    local name=pulse-sensor-proxy-$ARCH.pyz base=$URL/$VERSION
    command -v curl >/dev/null || err "--url needs curl"
    say "downloading $base/$name"
    curl -fsSL -o "$WORK/$name" "$base/$name" || err "download of $base/$name failed"
    curl -fsSL -o "$WORK/SHA256SUMS" "$base/SHA256SUMS" || err "download of $base/SHA256SUMS failed"
    grep -E "^[0-9a-f]{64}  \*?$name\$" "$WORK/SHA256SUMS" >"$WORK/SHA256SUMS.mine" \
        || err "SHA256SUMS has no line for $name"
    (cd "$WORK" && sha256sum --quiet -c SHA256SUMS.mine) || err "$name does not match SHA256SUMS"
    CANDIDATE=$WORK/$name
}

# proxy ARGS...: run the pulse-sensor-proxy being installed (the new one under --dry-run).
proxy() { "$PROXY" "$@"; }

select_binary() {
    if [ -n "$PYZ" ]; then
        [ -f "$PYZ" ] || err "--pyz $PYZ: no such file"
        CANDIDATE=$PYZ
    elif [ -n "$VERSION" ]; then
        download_pyz
    fi
    if [ -n "$CANDIDATE" ]; then
        chmod 0755 "$CANDIDATE" 2>/dev/null || true
        python3 "$CANDIDATE" version >/dev/null 2>"$WORK/version.err" \
            || err "$CANDIDATE does not run here: $(cat "$WORK/version.err")"
    elif [ ! -x "$BIN" ]; then
        err "nothing to install: give --pyz PATH or --version V --url BASE"
    fi
    if [ "$DRY_RUN" -eq 1 ] && [ -n "$CANDIDATE" ]; then PROXY=$WORK/candidate; else PROXY=$BIN; fi
    if [ "$PROXY" != "$BIN" ]; then
        printf '#!/bin/sh\nexec python3 %q "$@"\n' "$CANDIDATE" >"$PROXY"
        chmod 0755 "$PROXY"
    fi
}

service_active() { systemctl is-active --quiet "$SERVICE" 2>/dev/null; }

install_binary() {
    local version
    if [ -z "$CANDIDATE" ]; then
        report_ok "binary $BIN ($("$BIN" version)), no new one given"
        return 0
    fi
    version=$(python3 "$CANDIDATE" version)
    if [ -f "$BIN" ] && cmp -s "$CANDIDATE" "$BIN"; then
        report_ok "binary $BIN ($version)"
        return 0
    fi
    CHANGED+=(binary)
    report_changed "binary $BIN ($version)"
    run install -m 0755 -o root -g root "$CANDIDATE" "$BIN.new"
    if [ -f "$BIN" ]; then
        PREVIOUS_BIN=$BIN.previous
        run cp -p "$BIN" "$PREVIOUS_BIN"
        # Not the original's (older releases ran it from here): its unit removes
        # /run/pulse-sensor-proxy on stop, and with it every running container's mount. It is
        # restarted under this proxy's unit instead (start_service), which keeps the directory.
        if service_active && ! is_original_unit "$UNIT_DIR/$SERVICE"; then run systemctl stop "$SERVICE"; fi
    fi
    run mv -f "$BIN.new" "$BIN"
}

# ---------------------------------------------------------------- 4a the original proxy
# A host the original proxy's installer set up is taken over before the service is touched:
# its self-heal and clean-up units stopped and disabled, then their unit files, its helpers,
# its binary and its installer copy moved (never deleted) into one backup directory, each under
# its own path, so that --uninstall --restore-original can put them back. The key and the
# state stay where they are: this proxy uses the same paths.

# ensure_original_backup: ORIGINAL_BACKUP, this run's backup directory, made on first use.
ensure_original_backup() {
    [ -z "$ORIGINAL_BACKUP" ] || return 0
    ORIGINAL_BACKUP=$BACKUP_DIR/original-$(date -u +%Y%m%dT%H%M%SZ)
    run install -d -m 0700 "$BACKUP_DIR" "$ORIGINAL_BACKUP"
}

original_backup_hint() {
    [ -n "$ORIGINAL_BACKUP" ] && [ "$DRY_RUN" -eq 0 ] || return 0
    printf "error: the original proxy's files are in %s; --uninstall --restore-original puts them back\n" \
        "$ORIGINAL_BACKUP" >&2
}

# retire_original_file PATH HOW: move (HOW=mv) or copy (HOW=cp, for a file this run replaces
# anyway) PATH, under ROOT, into the backup directory under its own path.
retire_original_file() {
    local path=$1 how=$2 dest
    ensure_original_backup
    dest=$ORIGINAL_BACKUP/${path#"$ROOT"/}
    if [ "$how" = mv ]; then report_changed "original proxy: $path moved to $dest"
    else report_changed "original proxy: $path copied to $dest"; fi
    run install -d -m 0700 "${dest%/*}"
    if [ "$how" = mv ]; then run mv "$path" "$dest"; else run cp -p "$path" "$dest"; fi
    ORIGINAL_MOVED+=("${path#"$ROOT"}")
}

is_original_unit() { [ -f "$1" ] && grep -q "$ORIGINAL_UNIT_MARK" "$1"; }

# The original's binary in our binary's place (older releases): a Go program, ours a zipapp.
is_original_binary() {
    local magic
    [ -f "$BIN" ] || return 1
    magic=$(head -c 4 "$BIN" | od -An -tx1 | tr -d ' \n')
    [ "$magic" = 7f454c46 ]
}

original_units_present() {
    local unit
    for unit in "${ORIGINAL_UNITS[@]}"; do [ -f "$UNIT_DIR/$unit" ] && return 0; done
    return 1
}

stop_original_units() {
    local unit
    for unit in "${ORIGINAL_UNITS[@]}"; do
        [ -f "$UNIT_DIR/$unit" ] || continue
        report_changed "original proxy: $unit stopped and disabled"
        run systemctl disable --now --quiet "$unit" \
            || err "could not stop the original proxy's $unit; nothing of it was moved"
    done
}

take_over_original() {
    local unit path found=0
    if original_units_present; then
        found=1
        stop_original_units
        for unit in "${ORIGINAL_UNITS[@]}"; do
            [ -f "$UNIT_DIR/$unit" ] && retire_original_file "$UNIT_DIR/$unit" mv
        done
        run systemctl daemon-reload
        # A self-heal run stopped halfway counts as failed; it would stay listed until this.
        run systemctl reset-failed "${ORIGINAL_UNITS[@]}" 2>/dev/null || true
    fi
    for path in "${ORIGINAL_FILES[@]}"; do
        [ -f "$ROOT$path" ] || continue
        found=1
        retire_original_file "$ROOT$path" mv
    done
    # Both replaced by this run's own (install_units, install_binary).
    if is_original_unit "$UNIT_DIR/$SERVICE"; then found=1; retire_original_file "$UNIT_DIR/$SERVICE" cp; fi
    if is_original_binary; then found=1; retire_original_file "$BIN" cp; fi
    if [ "$found" -eq 0 ] && [ -z "$(original_wrappers)" ]; then report_ok "original proxy: nothing of it left"; fi
}

original_wrappers() {
    local path
    for path in "${ORIGINAL_WRAPPERS[@]}"; do [ ! -f "$ROOT$path" ] || printf '%s\n' "$ROOT$path"; done
}

# After keys push upgraded every node's line, nothing runs the original's forced commands.
retire_original_wrappers() {
    local path
    [ -n "$(original_wrappers)" ] || return 0
    if [ "$KEYS_PUSHED" -eq 0 ]; then
        note "the original proxy's forced commands ($(original_wrappers | tr '\n' ' ')) were kept: some nodes may still run them; run this again once every node has the new key line"
        return 0
    fi
    while read -r path; do retire_original_file "$path" mv; done < <(original_wrappers)
    # Left empty by the moves (rmdir leaves a directory that still holds something).
    run rmdir --ignore-fail-on-non-empty "$ROOT$ORIGINAL_HOME/bin" "$ROOT$ORIGINAL_HOME" \
        "$ROOT/usr/local/libexec/pulse-sensor-proxy" 2>/dev/null || true
}

# ---------------------------------------------------------------- 5 config

# choose_source_subnets CURRENT: into WORK/subnets (one a line) the subnets the config gets:
# --allowed-subnets, else none when the rendered config CURRENT lists some, else this host's
# addresses. keys push writes the list into from="..." on every node and the daemon reports the
# same list, so the config must always name it.
choose_source_subnets() {
    local detected subnets
    : >"$WORK/subnets"
    if [ "${#SUBNETS[@]}" -gt 0 ]; then printf '%s\n' "${SUBNETS[@]}" >"$WORK/subnets"; return 0; fi
    [ -z "$(proxy config get allowed_source_subnets --config "$1")" ] || return 0
    detected=$(proxy host-addresses) || err "could not read this host's addresses"
    if [ -z "$detected" ]; then
        [ "$IS_PVE" -eq 1 ] || return 0
        err "found no address of this host for the nodes' from=\"...\" restriction; give --allowed-subnets CIDR,..."
    fi
    mapfile -t subnets <<<"$detected"
    printf '%s\n' "${subnets[@]}" >"$WORK/subnets"
    say "allowed_source_subnets: this host's addresses ${subnets[*]} (--allowed-subnets sets others)"
}

# A host the original proxy's installer set up has a config in that proxy's vocabulary, which
# `config merge` refuses: `config migrate --write` rewrites it in ours first (keeping
# CONFIG.bak). Under --dry-run the rewritten text goes to a copy in WORK, which the merges then
# read (config_source).
ensure_config_vocabulary() {
    [ -f "$CONFIG" ] || return 0
    proxy config migrate --config "$CONFIG" >"$WORK/config.translated" 2>"$WORK/config.notes" \
        || err "$CONFIG is not valid, left as it is: $(cat "$WORK/config.notes")"
    [ -s "$WORK/config.notes" ] || return 0
    report_changed "config $CONFIG rewritten from the original proxy's vocabulary (the original kept as $CONFIG.bak)"
    [ "$QUIET" -eq 1 ] || sed "s|^$CONFIG: |         |" "$WORK/config.notes"
    note "$CONFIG was in the original proxy's vocabulary: rewritten in this one's, the original kept as $CONFIG.bak"
    if [ "$DRY_RUN" -eq 1 ]; then
        cp "$WORK/config.translated" "$WORK/config.yaml"
        return 0
    fi
    proxy config migrate --config "$CONFIG" --write >"$WORK/config.migrate" 2>&1 \
        || err "could not rewrite $CONFIG: $(cat "$WORK/config.migrate")"
    CHANGED+=(config-migrated)
}

# config_source: the config the merges read: CONFIG, or under --dry-run its rewritten copy.
config_source() {
    if [ -f "$WORK/config.yaml" ]; then printf '%s\n' "$WORK/config.yaml"; else printf '%s\n' "$CONFIG"; fi
}

ensure_config() {
    local args=() cidr id range result src
    ensure_config_vocabulary
    src=$(config_source)
    # Both sides rendered by the same merge, so only a change of content counts (not comments).
    proxy config merge --config "$src" >"$WORK/config.current" || err "could not read $CONFIG"
    choose_source_subnets "$WORK/config.current"
    while read -r cidr; do args+=(--add-subnet "$cidr"); done <"$WORK/subnets"
    for id in "${CTIDS[@]}"; do
        while read -r range; do
            args+=(--add-peer-uids "$range")
            [ "$ALLOW_CLEANUP" -eq 0 ] || args+=(--allow-cleanup-uids "$range")
        done <<<"${CT_UID_RANGES[$id]}"
    done
    proxy config merge --config "$src" "${args[@]}" >"$WORK/config.merged" \
        || err "could not merge $CONFIG"
    proxy config validate --config "$WORK/config.merged" >"$WORK/config.check" 2>&1 \
        || err "the merged config is not valid, $CONFIG left as it is: $(cat "$WORK/config.check")"
    if [ -f "$CONFIG" ] && cmp -s "$WORK/config.current" "$WORK/config.merged"; then
        report_ok "config $CONFIG"
    else
        CHANGED+=(config)
        report_changed "config $CONFIG"
        if [ "$DRY_RUN" -eq 1 ]; then
            diff -u "$WORK/config.current" "$WORK/config.merged" | tail -n +3 || true
        else
            result=$(proxy config merge --config "$CONFIG" "${args[@]}" --write) || err "$result"
        fi
    fi
    [ "$DRY_RUN" -eq 1 ] && [ ! -f "$CONFIG" ] && return 0
    ensure_file_mode "$CONFIG" 640 root "$ACCOUNT"
}

# ---------------------------------------------------------------- 6 units

# The unit files come from the binary being installed (units/ of its build), every one of them.
install_units() {
    local unit changes_before=$CHANGES
    mkdir "$WORK/units"
    proxy units --write "$WORK/units" >/dev/null || err "the new binary gave no unit files"
    for unit in "$WORK"/units/*; do
        write_file "$UNIT_DIR/${unit##*/}" 644 root root "unit $UNIT_DIR/${unit##*/}" <"$unit"
    done
    if [ "$CHANGES" -gt "$changes_before" ]; then
        CHANGED+=(units)
        run systemctl daemon-reload
    fi
}

wait_for_socket() {
    local deadline=$((SECONDS + SOCKET_WAIT_SECONDS))
    until [ -S "$SOCKET" ]; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}

# After a failed step, put back the binary this run replaced (and the config it read, when this
# run rewrote it from the original proxy's vocabulary) and start it again.
roll_back_binary() {
    [ -n "$PREVIOUS_BIN" ] && [ -f "$PREVIOUS_BIN" ] || return 0
    mv -f "$PREVIOUS_BIN" "$BIN"
    PREVIOUS_BIN=
    if changed_this_run config-migrated; then cp -p "$CONFIG.bak" "$CONFIG"; fi
    printf 'error: the new version was rolled back; the previous binary is running again\n' >&2
    if systemctl is-enabled --quiet "$SERVICE" 2>/dev/null; then
        systemctl restart "$SERVICE" && wait_for_socket \
            || printf 'error: the previous binary did not start either; see: journalctl -u %s -n 50\n' "$SERVICE" >&2
    fi
}

# ensure_enabled UNIT [--now]: UNIT enabled (with --now also started), reported either way.
ensure_enabled() {
    local unit=$1
    shift
    if systemctl is-enabled --quiet "$unit" 2>/dev/null; then
        report_ok "$unit enabled"
    else
        report_changed "$unit enabled"
        run systemctl enable "$@" --quiet "$unit"
    fi
}

start_service() {
    ensure_enabled "$SERVICE"
    if ! service_active; then
        report_changed "$SERVICE started"
        run systemctl start "$SERVICE" || err "$SERVICE did not start; see: journalctl -u $SERVICE -n 50"
    elif changed_this_run binary units https; then
        report_changed "$SERVICE restarted"
        run systemctl restart "$SERVICE" || err "$SERVICE did not start; see: journalctl -u $SERVICE -n 50"
    elif changed_this_run config; then
        report_changed "$SERVICE reloaded its config"
        run systemctl reload "$SERVICE"
    else
        report_ok "$SERVICE running"
    fi
    [ "$DRY_RUN" -eq 1 ] && return 0
    wait_for_socket || err "$SERVICE started but its socket $SOCKET did not appear; see: journalctl -u $SERVICE -n 50"
    if [ -n "$PREVIOUS_BIN" ]; then rm -f "$PREVIOUS_BIN"; PREVIOUS_BIN=; fi
    report_ok "socket $SOCKET"
}

ensure_rotation_timer() {
    if [ "$ROTATION" -eq 0 ]; then
        systemctl is-enabled --quiet "$ROTATION_TIMER" 2>/dev/null \
            || note "key rotation is off; turn it on with: systemctl enable --now $ROTATION_TIMER"
        return 0
    fi
    ensure_enabled "$ROTATION_TIMER" --now
}

# Pulse's request_cleanup (root and admin peers; the daemon only writes the request) is acted
# on by a root oneshot that this path unit starts.
ensure_cleanup_path() {
    ensure_enabled "$CLEANUP_PATH" --now
}

# This host's disks are read as root by SMART_SERVICE (the daemon's sandbox opens none); its
# timer keeps them fresh, and a first read before the daemon starts puts them in its first answer.
ensure_smart_timer() {
    ensure_enabled "$SMART_TIMER"
    run systemctl start "$SMART_SERVICE" "$SMART_TIMER" \
        || note "$SMART_SERVICE failed, so this host's disks are left out; see: journalctl -u $SMART_SERVICE -n 20"
}

# ---------------------------------------------------------------- 7 nodes

# cluster_nodes: one node name a line, as the daemon finds them (config, .members, pvecm).
cluster_nodes() { proxy nodes --config "$CONFIG"; }

push_keys() {
    local dry=()
    if [ "$IS_PVE" -eq 0 ]; then
        report_ok "node keys: standalone, this host's sensors are read locally"
        return 0
    fi
    [ "$DRY_RUN" -eq 1 ] && dry=(--dry-run)
    if proxy keys push --config "$CONFIG" "${dry[@]}" >"$WORK/push.out" 2>&1; then
        [ "$QUIET" -eq 1 ] || sed 's/^/         /' "$WORK/push.out"
        report_ok "node keys pushed to: $(cluster_nodes | tr '\n' ' ')"
        KEYS_PUSHED=1
    else
        warn "pushing the proxy's key to the nodes failed: $(tail -n 3 "$WORK/push.out")"
        note "some nodes lack the proxy's key; fix their SSH access and run: pulse-sensor-proxy keys push"
    fi
}

# ---------------------------------------------------------------- 8 containers

ct_running() { pct status "$1" 2>/dev/null | grep -q 'status: running'; }

# with_ct_lock ID COMMAND...: run COMMAND holding the lock pct holds while it edits the
# container's config (pve-container's config_file_lock, taken by PVE::AbstractConfig's
# lock_config as an exclusive flock, waiting up to 10 s), so no pct set lands in between.
with_ct_lock() {
    local id=$1 fd status=0
    shift
    if [ "$DRY_RUN" -eq 1 ]; then "$@"; return; fi
    mkdir -p "$PVE_LOCK_DIR"
    exec {fd}>"$PVE_LOCK_DIR/pve-config-$id.lock"
    if ! flock -w 10 "$fd"; then
        exec {fd}>&-
        err "container $id: its config is locked by another Proxmox task; run this again when it ends"
    fi
    "$@" || status=$?
    exec {fd}>&-
    return "$status"
}

# ct_rewrite_conf ID: put our mount entry into the container's config (its new text also in
# WORK/ID.conf, for connect_container to see whether what the container mounts changed).
ct_rewrite_conf() {
    local id=$1 conf=$PVE_DIR/lxc/$1.conf legacy mounted
    conf_with_mount "$conf" >"$WORK/$id.conf"
    if cmp -s "$WORK/$id.conf" "$conf"; then
        report_ok "container $id: mount entry in $conf"
        return 0
    fi
    mounted=$(ct_socket_paths "$conf")
    if [ -n "$mounted" ] && [ "$mounted" = "$(ct_socket_paths "$WORK/$id.conf")" ]; then
        report_changed "container $id: mount entry in $conf gains \`optional\` (the mount is unchanged: no restart)"
        run cp "$WORK/$id.conf" "$conf.tmp"
        run mv -f "$conf.tmp" "$conf"
        return 0
    fi
    legacy=$(conf_legacy_lines "$conf")
    if [ -n "$legacy" ]; then
        say "container $id: replacing what an older installer wrote (an mpN: line blocks snapshots and migration; a socket-level mount breaks when the socket is recreated):"
        say "$legacy" | sed 's/^/         /'
    fi
    report_changed "container $id: mount entry in $conf"
    run cp "$WORK/$id.conf" "$conf.tmp"
    run mv -f "$conf.tmp" "$conf"
}

# ct_mount_changed MOUNTED NEW_CONF: whether NEW_CONF mounts the socket elsewhere than MOUNTED
# (ct_socket_paths of the config before). A running container keeps the mount it started with:
# only a change of what it mounts needs a restart, not of the options (the original's line
# gaining `optional`).
ct_mount_changed() { [ -z "$1" ] || [ "$1" != "$(ct_socket_paths "$2")" ]; }

# ct_socket_paths CONF: the socket's path inside the container, for every mount entry of ours.
ct_socket_paths() {
    conf_main_section "$1" | awk -v RUN_DIR="$RUN_DIR" -v S="$SOCKET_NAME" \
        '$1 == "lxc.mount.entry:" && $2 == RUN_DIR { print "/" $3 "/" S }'
}

# The container is not trusted here either: its sh and cat answer (under pct exec), so what
# they print is bounded in size, count and time, public keys are derived on the host from the
# private keys copied out (never the container's .pub), and the proxy's own keys and root's
# identities are never revoked, whatever the container claims to hold.
readonly LEGACY_KEY_MAX_BYTES=65536 LEGACY_KEY_MAX_FILES=16

# legacy_key_path PATH: true for a private key name the migration looks for, and nothing else.
legacy_key_path() {
    local dir
    for dir in $LEGACY_KEY_DIRS; do
        [[ "$1" =~ ^"$dir"/id_[A-Za-z0-9_.-]+$ && "$1" != *.pub ]] && return 0
    done
    return 1
}

# ct_copy_out ID PATH DEST: the container's file into DEST, within 30 s; false (and DEST
# removed) when it is larger than LEGACY_KEY_MAX_BYTES.
ct_copy_out() {
    (timeout 30 pct exec "$1" -- cat -- "$2" 2>/dev/null || true) | head -c $((LEGACY_KEY_MAX_BYTES + 1)) >"$3"
    if [ "$(stat -c %s -- "$3")" -gt "$LEGACY_KEY_MAX_BYTES" ]; then rm -f -- "$3"; return 1; fi
}

# protected_fingerprints: the proxy's keys (every slot) and root's SSH identities, one a line.
protected_fingerprints() {
    local key
    for key in "$STATE_DIR"/ssh/id_ed25519 "$STATE_DIR"/ssh.d/*/id_ed25519 "$ROOT"/root/.ssh/id_*; do
        case "$key" in *.pub) continue ;; esac
        if [ ! -f "$key" ] || [ -L "$key" ]; then continue; fi
        ssh-keygen -y -f "$key" 2>/dev/null | ssh-keygen -l -f - 2>/dev/null | cut -d' ' -f2 || true
    done
}

# legacy_key_paths ID: the private key files in the container's legacy key dirs, one a line,
# only names legacy_key_path accepts, at most LEGACY_KEY_MAX_FILES.
legacy_key_paths() {
    local path count=0
    # shellcheck disable=SC2016 # expanded inside the container
    timeout 30 pct exec "$1" -- sh -c 'for d in '"$LEGACY_KEY_DIRS"'; do for f in "$d"/id_*; do
              case "$f" in *.pub) ;; *) [ -f "$f" ] && printf "%s\n" "$f" ;; esac; done; done' 2>/dev/null \
        | head -c 65536 | while IFS= read -r path; do
            legacy_key_path "$path" || continue
            count=$((count + 1))
            [ "$count" -le "$LEGACY_KEY_MAX_FILES" ] || break
            printf '%s\n' "$path"
        done || true
}

migrate_legacy_keys() {
    local id=$1 found path safe backup fingerprint protected
    if ! ct_running "$id"; then
        note "container $id is stopped: legacy SSH keys inside it were not checked; run this again once it runs"
        return 0
    fi
    found=$(legacy_key_paths "$id")
    if [ -z "$found" ]; then
        report_ok "container $id: no SSH keys inside"
        return 0
    fi
    backup=$BACKUP_DIR/ct$id
    protected=$(protected_fingerprints)
    while read -r path; do
        safe=${path#/}; safe=${safe//\//_}
        if [ "$DRY_RUN" -eq 1 ]; then
            report_changed "container $id: key $path to be moved to $backup/$safe and revoked on every node"
            continue
        fi
        install -d -m 0700 "$BACKUP_DIR" "$backup"
        if ! (umask 077; ct_copy_out "$id" "$path" "$backup/$safe"); then
            warn "container $id: $path is larger than $LEGACY_KEY_MAX_BYTES bytes: not a key; skipped, left in the container"
            note "container $id: $path skipped (larger than $LEGACY_KEY_MAX_BYTES bytes); look at it, remove it by hand"
            continue
        fi
        pct exec "$id" -- rm -f -- "$path" "$path.pub" 2>/dev/null \
            || warn "container $id: could not remove $path from the container (its copy is in $backup/$safe)"
        if ! ssh-keygen -y -f "$backup/$safe" >"$backup/$safe.pub" 2>/dev/null; then
            rm -f -- "$backup/$safe.pub"
            report_changed "container $id: $path moved to $backup/$safe (not a private key this host can read: nothing revoked)"
            note "container $id: $path is backed up in $backup/$safe but was not revoked anywhere: it is no key ssh-keygen can read"
            continue
        fi
        fingerprint=$(ssh-keygen -l -f "$backup/$safe.pub" | cut -d' ' -f2)
        if grep -qxF -- "$fingerprint" <<<"$protected"; then
            report_changed "container $id: $path moved to $backup/$safe (it is the proxy's or root's own key $fingerprint: not revoked)"
            note "container $id held a private key of this host ($fingerprint): consider it leaked and rotate it"
            continue
        fi
        report_changed "container $id: key $path moved to $backup/$safe and revoked on every node"
        if ! proxy keys revoke --config "$CONFIG" --public-key "$backup/$safe.pub" >"$WORK/revoke.out" 2>&1; then
            warn "could not revoke $path's public key on every node: $(tail -n 2 "$WORK/revoke.out" 2>/dev/null)"
            note "revoke the old key of container $id by hand: pulse-sensor-proxy keys revoke --public-key $backup/$safe.pub"
        fi
    done <<<"$found"
}

# ---------------------------------------------------------------- 8 files inside containers
# Pulse's client takes $PULSE_SENSOR_PROXY_SOCKET, else /run/pulse-sensor-proxy/..., else (from
# v4.26) /mnt/pulse-proxy/... (internal/tempproxy/client.go NewClient). The mount is outside
# /run, so a tmpfiles.d entry links /run/pulse-sensor-proxy to it at every boot for the
# releases that look only there, and Pulse's service gets the variable in a drop-in.
#
# The container is not trusted. Files go in with pct push, which creates them inside the
# container's namespaces with its root's rights, so no link in there can lead outside it; and
# only where nothing but a regular file of ours is in the way.

# ct_dir ID: the proxy's directory inside the container, from our mount entry.
ct_dir() { local sock; sock=$(ct_socket_paths "$PVE_DIR/lxc/$1.conf" | head -n 1); printf '%s\n' "${sock%/*}"; }

ct_tmpfiles_text() {
    printf '%s\n' "$CT_FILE_MARK" \
        "# The proxy's socket is mounted at $1, outside the tmpfs the container's systemd puts" \
        "# on /run; Pulse releases that look for it only under /run find it through this link." \
        "L $RUN_DIR - - - - $1"
}

ct_dropin_text() { printf '%s\n' "$CT_FILE_MARK" "[Service]" "Environment=PULSE_SENSOR_PROXY_SOCKET=$1"; }

# Run in the container as sh -c PROBE sh PATH MARK: prints "absent", "foreign" (a link, or
# something other than a regular file starting with MARK), or "ours" and then the file.
# shellcheck disable=SC2016 # expanded inside the container
readonly CT_FILE_PROBE='f=$1
if [ -L "${f%/*}" ] || [ -L "$f" ]; then echo foreign
elif [ ! -e "$f" ]; then echo absent
elif [ -f "$f" ] && [ "$(head -n 1 "$f")" = "$2" ]; then echo ours; cat "$f"
else echo foreign; fi'

ct_file_probe() {
    pct exec "$1" -- sh -c "$CT_FILE_PROBE" sh "$2" "$CT_FILE_MARK" 2>/dev/null | head -c 65536 || true
}

ct_has_systemd() { pct exec "$1" -- test -d /run/systemd/system 2>/dev/null; }

# ct_pulse_units ID: Pulse's service units installed in the container, one a line.
ct_pulse_units() { ct_pulse_socket_env "$1" | cut -d' ' -f1; }

# ct_put_file ID PATH WHAT < CONTENT: PATH in the container holds CONTENT, written now (a change
# in CHANGES) or already; fails, with a warning, when something is in the way or pct fails.
ct_put_file() {
    local id=$1 path=$2 what="container $1: $3 $2" new probe
    new=$(mktemp "$WORK/ct.XXXXXX")
    cat >"$new"
    probe=$(mktemp "$WORK/probe.XXXXXX")
    ct_file_probe "$id" "$path" >"$probe"
    case "$(head -n 1 "$probe")" in
        ours)
            if tail -n +2 "$probe" | cmp -s - "$new"; then
                CT_FILES+=("$id:$path")
                report_ok "$what"
                return 0
            fi ;;
        absent) ;;
        "")
            warn "container $id: could not look at $path inside it (pct exec failed); left as it is"
            return 1 ;;
        *)
            warn "container $id: $path is in the way (a link, or not a file this script wrote); left as it is"
            note "container $id: move $path out of the way inside it, then run this again"
            return 1 ;;
    esac
    if ! run pct exec "$id" -- mkdir -p "${path%/*}" \
            || ! run pct push "$id" "$new" "$path" --perms 0644 --user 0 --group 0; then
        warn "container $id: could not write $path inside it"
        return 1
    fi
    CT_FILES+=("$id:$path")
    report_changed "$what"
}

# ensure_ct_files ID: the link from /run and Pulse's drop-ins, in a running container.
ensure_ct_files() {
    local id=$1 dir unit before restart=()
    if ! ct_running "$id"; then
        note "container $id is stopped: $CT_TMPFILES and Pulse's drop-in go into it at the next run of this script once it runs"
        return 0
    fi
    dir=$(ct_dir "$id")
    before=$CHANGES
    if ct_put_file "$id" "$CT_TMPFILES" "link $RUN_DIR -> $dir at boot:" < <(ct_tmpfiles_text "$dir") \
            && [ "$CHANGES" -gt "$before" ] && ct_has_systemd "$id"; then
        run pct exec "$id" -- systemd-tmpfiles --create "$CT_TMPFILES" \
            || warn "container $id: systemd-tmpfiles did not make the link $RUN_DIR now; it is made at the next boot"
    fi
    for unit in $(ct_pulse_units "$id"); do
        before=$CHANGES
        if ct_put_file "$id" "/etc/systemd/system/$unit.d/$CT_DROPIN" "PULSE_SENSOR_PROXY_SOCKET for $unit:" \
                < <(ct_dropin_text "$dir/$SOCKET_NAME") && [ "$CHANGES" -gt "$before" ]; then
            restart+=("$unit")
        fi
    done
    if [ "${#restart[@]}" -eq 0 ] || ! ct_has_systemd "$id"; then return 0; fi
    run pct exec "$id" -- systemctl daemon-reload || warn "container $id: systemctl daemon-reload failed"
    for unit in "${restart[@]}"; do
        pct exec "$id" -- systemctl is-active --quiet "$unit" 2>/dev/null || continue
        if [ "$NO_RESTART" -eq 1 ]; then
            note "container $id: restart Pulse to take the socket's path: pct exec $id -- systemctl restart $unit"
        else
            report_changed "container $id: $unit restarted to take PULSE_SENSOR_PROXY_SOCKET"
            run pct exec "$id" -- systemctl restart "$unit" || warn "container $id: $unit did not restart"
        fi
    done
}

# remove_ct_files ID DIR: take this script's files (as it wrote them) out of the container.
remove_ct_files() {
    local id=$1 dir=$2 unit path reload=0 paths=("$CT_TMPFILES")
    for unit in $PULSE_UNITS; do paths+=("/etc/systemd/system/$unit.d/$CT_DROPIN"); done
    if ! ct_running "$id"; then
        warn "container $id is stopped: once it runs, remove what this script wrote into it: pct exec $id -- rm -f ${paths[*]}"
        return 0
    fi
    for path in "${paths[@]}"; do
        [ "$(ct_file_probe "$id" "$path" | head -n 1)" = ours ] || continue
        report_changed "container $id: $path removed"
        run pct exec "$id" -- rm -f "$path"
        if [[ $path == *.service.d/* ]]; then
            reload=1
            run pct exec "$id" -- rmdir "${path%/*}" 2>/dev/null || true
        fi
    done
    # shellcheck disable=SC2016 # expanded inside the container
    if pct exec "$id" -- sh -c '[ -L "$1" ] && [ "$(readlink "$1")" = "$2" ]' sh "$RUN_DIR" "$dir" 2>/dev/null; then
        report_changed "container $id: link $RUN_DIR removed"
        run pct exec "$id" -- rm -f "$RUN_DIR"
    fi
    if [ "$reload" -eq 1 ] && ct_has_systemd "$id"; then
        run pct exec "$id" -- systemctl daemon-reload || warn "container $id: systemctl daemon-reload failed"
    fi
    return 0
}

# ---------------------------------------------------------------- 8 what Pulse sees inside

readonly GET_STATUS_REQUEST='{"correlation_id": "installer", "method": "get_status", "params": {}}'
readonly RPC_CHECK='import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode() + b"\n")
data = b""
while not data.endswith(b"\n"):
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
sys.exit(0 if json.loads(data).get("success") is True else 1)'

# Run in the container as sh -c PROBE sh AWK UNIT...: "UNIT VALUE" for each of Pulse's units it
# has, VALUE the PULSE_SENSOR_PROXY_SOCKET systemd starts it with (empty when none).
# shellcheck disable=SC2016 # expanded inside the container
readonly CT_PULSE_ENV_PROBE='prog=$1; shift
for u; do
    unit=
    for d in /etc/systemd/system /usr/lib/systemd/system /lib/systemd/system; do
        if [ -f "$d/$u" ]; then unit=$d/$u; break; fi
    done
    [ -n "$unit" ] || continue
    value=$({ echo "$unit"
              for f in /etc/systemd/system/"$u".d/*.conf /usr/lib/systemd/system/"$u".d/*.conf; do
                  [ -f "$f" ] && echo "${f##*/} $f"
              done | sort -s -k1,1 | awk "!seen[\$1]++ { print \$2 }"; } | awk "$prog")
    echo "$u $value"
done'
# Reads the unit's file names on stdin, the unit first, then its drop-ins in systemd's order (by
# name; /etc hiding /usr/lib): Environment= lines, the later winning, an empty one clearing;
# then the EnvironmentFile= files, whose variables override Environment= (systemd.exec(5)).
# shellcheck disable=SC2016 # awk program
readonly PULSE_ENV_AWK='
function take(s,   n, w, i) {
    gsub(/"/, "", s)
    if (s ~ /^[ \t]*$/) { v = ""; return }
    n = split(s, w, /[ \t]+/)
    for (i = 1; i <= n; i++) if (w[i] ~ /^PULSE_SENSOR_PROXY_SOCKET=/) v = substr(w[i], 27)
}
{
    file = $0
    while ((getline line < file) > 0) {
        if (line ~ /^[ \t]*Environment[ \t]*=/) { sub(/^[^=]*=[ \t]*/, "", line); take(line) }
        else if (line ~ /^[ \t]*EnvironmentFile[ \t]*=/) {
            sub(/^[^=]*=[ \t]*-?/, "", line)
            if (line == "") files = 0; else env_file[++files] = line
        }
    }
    close(file)
}
END {
    for (i = 1; i <= files; i++) {
        while ((getline line < env_file[i]) > 0)
            if (line ~ /^[ \t]*PULSE_SENSOR_PROXY_SOCKET[ \t]*=/) {
                sub(/^[^=]*=[ \t]*/, "", line); gsub(/^["\047]|["\047][ \t]*$/, "", line); v = line
            }
        close(env_file[i])
    }
    print v
}'

# ct_pulse_socket_env ID: "UNIT PATH" for each of Pulse's units in the container, PATH the
# socket its service is told to use ("-" when none, "?" when not a plain absolute path).
ct_pulse_socket_env() {
    local unit value
    # shellcheck disable=SC2086 # the list of names
    while read -r unit value; do
        grep -qxF "$unit" < <(tr ' ' '\n' <<<"$PULSE_UNITS") || continue
        if [ -z "$value" ]; then value=-
        elif ! [[ $value =~ ^/[A-Za-z0-9._/+-]{1,200}$ ]]; then value='?'; fi
        printf '%s %s\n' "$unit" "$value"
    done < <(pct exec "$1" -- sh -c "$CT_PULSE_ENV_PROBE" sh "$PULSE_ENV_AWK" $PULSE_UNITS 2>/dev/null | head -c 4096 || true)
}

# ct_ask_socket ID PATH: how the socket at PATH answers inside the container, in words; fails
# when there is none or it does not answer. Asked with what the container has.
ct_ask_socket() {
    local id=$1 sock=$2 answer
    pct exec "$id" -- test -S "$sock" 2>/dev/null || { echo "no socket"; return 1; }
    if pct exec "$id" -- sh -c 'command -v python3' >/dev/null 2>&1; then
        if pct exec "$id" -- python3 -c "$RPC_CHECK" "$sock" "$GET_STATUS_REQUEST" >/dev/null 2>&1; then
            echo "answers get_status (asked with python3)"; return 0
        fi
        echo "does not answer get_status (asked with python3)"; return 1
    fi
    if pct exec "$id" -- sh -c 'command -v socat' >/dev/null 2>&1; then
        answer=$(printf '%s\n' "$GET_STATUS_REQUEST" \
                     | pct exec "$id" -- socat -t 10 - "UNIX-CONNECT:$sock" 2>/dev/null | head -c 65536 || true)
        if grep -q '"success": *true' <<<"$answer"; then echo "answers get_status (asked with socat)"; return 0; fi
        echo "does not answer get_status (asked with socat)"; return 1
    fi
    echo "is a socket (not asked: the container has neither python3 nor socat)"
}

# check_container ID: at each path Pulse's client tries, in its order (NewClient: the variable
# if set, else the first of /run/... and /mnt/... that exists, else /run/...), whether the
# socket answers from inside; and which one Pulse will use.
check_container() {
    local id=$1 unit value path answer chosen='' why='' run_path=$RUN_DIR/$SOCKET_NAME
    local mnt_path=/$DEFAULT_CONTAINER_DIR/$SOCKET_NAME
    if ! ct_running "$id"; then
        note "container $id is stopped: what Pulse will see inside it is checked at its next run; start it and run this again"
        return 0
    fi
    while read -r unit value; do
        case "$value" in
            -) say "         container $id: PULSE_SENSOR_PROXY_SOCKET not set for $unit" ;;
            '?') warn "container $id: PULSE_SENSOR_PROXY_SOCKET of $unit is not a plain absolute path; Pulse will not reach the proxy through it"
                 [ -n "$chosen" ] || { chosen='?'; why="$unit's PULSE_SENSOR_PROXY_SOCKET"; } ;;
            *) if answer=$(ct_ask_socket "$id" "$value"); then
                   report_ok "container $id: \$PULSE_SENSOR_PROXY_SOCKET of $unit, $value: $answer"
               else
                   warn "container $id: \$PULSE_SENSOR_PROXY_SOCKET of $unit, $value: $answer"
               fi
               [ -n "$chosen" ] || { chosen=$value; why="$unit's PULSE_SENSOR_PROXY_SOCKET"; } ;;
        esac
    done < <(ct_pulse_socket_env "$id")
    for path in "$run_path" "$mnt_path"; do
        if answer=$(ct_ask_socket "$id" "$path"); then
            report_ok "container $id: $path: $answer"
        else
            say "         container $id: $path: $answer"
        fi
        if [ -z "$chosen" ] && pct exec "$id" -- test -e "$path" 2>/dev/null; then
            chosen=$path; why="the first of Pulse's paths there"
        fi
    done
    if [ -z "$chosen" ]; then chosen=$run_path; why="its default; none of its paths is there"; fi
    if [ "$chosen" = '?' ]; then
        answer="not a path"
    elif answer=$(ct_ask_socket "$id" "$chosen"); then
        report_ok "container $id: Pulse will use $chosen ($why)"
        return 0
    fi
    warn "container $id: Pulse will use $chosen ($why): $answer"
    note "container $id: Pulse does not reach the proxy; restart the container (pct reboot $id) and run this again"
}

connect_container() {
    local id=$1 changed=0 may="may read temperatures" mounted
    mounted=$(ct_socket_paths "$PVE_DIR/lxc/$id.conf")
    with_ct_lock "$id" ct_rewrite_conf "$id"
    if ct_mount_changed "$mounted" "$WORK/$id.conf"; then changed=1; fi
    if [ "$ALLOW_CLEANUP" -eq 1 ]; then
        may+=" and request clean-ups"
        note "container $id may call request_cleanup (--allow-cleanup): it can have the proxy's key removed from any node, switching that node's temperatures off"
    fi
    report_ok "container $id: uids $(tr '\n' ' ' <<<"${CT_UID_RANGES[$id]}")$may"
    migrate_legacy_keys "$id"
    if [ "$changed" -eq 1 ] && ct_running "$id"; then
        if [ "$NO_RESTART" -eq 1 ]; then
            note "container $id: restart it to mount the socket: pct reboot $id"
        else
            report_changed "container $id restarted to mount the socket"
            run pct reboot "$id"
        fi
    fi
    ensure_ct_files "$id"
    [ "$DRY_RUN" -eq 1 ] || check_container "$id"
}

# ---------------------------------------------------------------- 9 summary

metrics_url() {
    local address
    address=$(proxy config get metrics_address --config "$CONFIG") || address=127.0.0.1:9127
    [ "$address" = disabled ] && { echo "(metrics disabled in $CONFIG)"; return 0; }
    echo "http://$address/metrics"
}

node_reachability() {
    local node reachable=() failing=()
    while read -r node; do
        if proxy call get_temperature --node "$node" >/dev/null 2>&1; then
            reachable+=("$node")
        else
            failing+=("$node")
        fi
    done < <(cluster_nodes)
    say "nodes this proxy reads: ${reachable[*]:-none}"
    if [ "${#failing[@]}" -gt 0 ]; then
        say "nodes it cannot read yet: ${failing[*]} (check: pulse-sensor-proxy call get_temperature --node NAME; fix root SSH to them, then: pulse-sensor-proxy keys push)"
    fi
    if [ ! -f "$PVE_DIR/.members" ] || [ "$(cluster_nodes | wc -l)" -le 1 ]; then
        say "this host is not in a cluster: the proxy reads this host only. Every other Proxmox host needs its own proxy (run this script there) and its own Pulse connection to it."
    fi
}

# What a take-over of the original proxy did, and how to go back.
original_summary() {
    local pub=$STATE_DIR/ssh/id_ed25519.pub fingerprint
    [ -n "$ORIGINAL_BACKUP" ] || return 0
    fingerprint=$(ssh-keygen -lf "$pub" 2>/dev/null | cut -d' ' -f2) || fingerprint=
    say "original proxy taken over: its key kept (${fingerprint:-$pub}), as its lines on the nodes were upgraded to this proxy's"
    if changed_this_run config-migrated; then
        say "  config translated, the original's kept as $CONFIG.bak; allowed_nodes.yaml and the rest of $CONF_DIR kept"
    fi
    say "  moved to $ORIGINAL_BACKUP: ${ORIGINAL_MOVED[*]}"
    say "  to go back: install-sensor-proxy.sh --uninstall --restore-original"
}

summary() {
    local item
    say ""
    if [ "$CHANGES" -eq 0 ]; then
        say "Nothing to change: everything was already in place."
    elif [ "$DRY_RUN" -eq 1 ]; then
        say "Dry run: $CHANGES change(s) would be made; nothing was changed."
    else
        say "Done: $CHANGES change(s)."
    fi
    if [ "${#CT_FILES[@]}" -gt 0 ]; then
        say "files inside containers (--uninstall removes them): ${CT_FILES[*]}"
    fi
    [ "$DRY_RUN" -eq 1 ] && return 0
    [ "$ACTION" = install ] || return 0
    node_reachability
    for item in "${NOTES[@]}"; do say "note: $item"; done
    original_summary
    say "check:  pulse-sensor-proxy call get_status"
    say "        journalctl -u ${SERVICE%.service}"
    say "        curl -s $(metrics_url)"
    https_summary
}

# ---------------------------------------------------------------- HTTPS mode (--http-mode)

# A Pulse on another machine reads temperatures over HTTPS (its client since v4.31). These
# steps create the certificate and the token, write the http_* keys and, with --pulse-server,
# register the proxy with Pulse, which answers the token it will send.

parse_http_arg() {
    case "$1" in
        --http-mode) HTTP_MODE=1 ;;
        --http-addr) HTTP_ADDR=$2 ;;
        --pulse-server) PULSE_SERVER=${2%/} ;;
        --proxy-url) PROXY_URL=${2%/} ;;
        --http-allowed-clients) add_http_clients "$2" ;;
    esac
}

add_http_clients() {
    local list=$1 cidr
    IFS=, read -r -a cidrs <<<"$list"
    for cidr in "${cidrs[@]}"; do
        [[ $cidr =~ ^[0-9A-Fa-f.:]+(/[0-9]{1,3})?$ ]] || usage_err "--http-allowed-clients needs CIDRs, got '$cidr'"
        HTTP_CLIENTS+=("$cidr")
    done
}

check_http_args() {
    if [ "$HTTP_MODE" -eq 0 ]; then
        [ -z "$HTTP_ADDR$PULSE_SERVER$PROXY_URL${HTTP_CLIENTS[*]}" ] \
            || usage_err "--http-addr, --pulse-server, --proxy-url and --http-allowed-clients go with --http-mode"
        return 0
    fi
    [ "$ACTION" = uninstall ] && usage_err "--uninstall takes no --http-mode (it removes the HTTPS mode's files anyway)"
    [ "${#CTIDS[@]}" -gt 0 ] || STANDALONE=1
    ACTION=install
    [[ ${HTTP_ADDR:-$HTTP_DEFAULT_ADDR} =~ ^(\[[0-9A-Fa-f:.]+\]|[0-9.]+):[0-9]{1,5}$ ]] \
        || usage_err "--http-addr needs IP:PORT or [IPv6]:PORT, got '$HTTP_ADDR'"
    [ -z "$PULSE_SERVER" ] || [[ $PULSE_SERVER =~ ^https?://[^/[:space:]]+$ ]] \
        || usage_err "--pulse-server needs http(s)://HOST[:PORT], got '$PULSE_SERVER'"
    [ -z "$PROXY_URL" ] || [[ $PROXY_URL =~ ^https://[^/[:space:]]+$ ]] \
        || usage_err "--proxy-url needs https://HOST[:PORT], got '$PROXY_URL'"
    return 0
}

# The URL Pulse is told to use: --proxy-url, else this host's first address and the port.
advertised_url() {
    local addr=${HTTP_ADDR:-$HTTP_DEFAULT_ADDR} host port first
    [ -z "$PROXY_URL" ] || { printf '%s\n' "$PROXY_URL"; return 0; }
    port=${addr##*:}
    host=${addr%:*}
    if [ "$host" = 0.0.0.0 ] || [ "$host" = "[::]" ]; then
        first=$(proxy host-addresses | head -n 1)
        [ -n "$first" ] || err "found no address of this host to advertise; give --proxy-url https://HOST:$port"
        host=${first%/*}
        [[ $host == *:* ]] && host="[$host]"
    fi
    printf 'https://%s:%s\n' "$host" "$port"
}

ensure_tls_material() {
    local cert=$TLS_DIR/server.crt key=$TLS_DIR/server.key
    ensure_dir "$TLS_DIR" 750 root "$ACCOUNT"
    if [ -f "$cert" ] && [ -f "$key" ]; then
        report_ok "TLS certificate $cert"
    else
        report_changed "TLS certificate $cert and key $key (self-signed, ECDSA P-256)"
        printf '{"http_tls_cert": "%s", "http_tls_key": "%s"}\n' "$cert" "$key" >"$WORK/tls.yaml"
        run proxy tls init --config "$WORK/tls.yaml" --group "$ACCOUNT" >"$WORK/tls.out" \
            || err "could not create the TLS certificate: $(cat "$WORK/tls.out")"
    fi
    ensure_file_mode "$key" 640 root "$ACCOUNT"
}

new_token() { python3 -c 'import base64, os; print(base64.urlsafe_b64encode(os.urandom(32)).decode())'; }

readonly REGISTER_CLIENT='import json, sys, urllib.error, urllib.request
url, hostname, proxy_url = sys.argv[1:4]
body = json.dumps({"hostname": hostname, "proxy_url": proxy_url, "mode": "http"}).encode()
request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(request, timeout=20) as response:
        status, text = response.status, response.read(65536)
except urllib.error.HTTPError as exc:
    status, text = exc.code, exc.read(65536)
except (OSError, ValueError) as exc:
    reason = getattr(exc, "reason", exc)
    print(f"cannot reach {url}: {reason}")
    sys.exit(3)
if status == 200:
    try:
        answer = json.loads(text)
        token = answer["token"] if answer.get("success") is True else ""
    except (ValueError, KeyError, TypeError, AttributeError):
        token = ""
    if isinstance(token, str) and len(token) >= 32 and token.isprintable() and " " not in token:
        print(token)
        print(answer.get("pve_instance", ""))
        sys.exit(0)
    print("Pulse answered 200 without a usable token: " + text[:200].decode("utf-8", "replace"))
    sys.exit(4)
print(f"{status} " + text[:200].decode("utf-8", "replace").strip())
sys.exit(5)'

# register_with_pulse: POST the registration; prints the token Pulse answered.
register_with_pulse() {
    local url=$PULSE_SERVER/api/temperature-proxy/register node answer code=0
    node=$(uname -n); node=${node%%.*}
    answer=$(python3 -c "$REGISTER_CLIENT" "$url" "$node" "$(advertised_url)") || code=$?
    case "$code" in
        0) printf '%s\n' "$answer" ;;
        5) case "$answer" in
               404*) err "Pulse at $PULSE_SERVER has no PVE instance for node '$node' (pve_instance_not_found): add this host in Pulse first, then run this again" ;;
               410*) err "Pulse at $PULSE_SERVER has its temperature proxy endpoints switched off (410): run with --http-mode but without --pulse-server, and paste the token it prints into Pulse" ;;
               *) err "registering with $url failed: HTTP $answer" ;;
           esac ;;
        *) err "registering with $url failed: $answer" ;;
    esac
}

ensure_http_token() {
    local token
    if [ -s "$TOKEN_FILE" ]; then
        report_ok "token $TOKEN_FILE (remove it to register or make a new one)"
        ensure_file_mode "$TOKEN_FILE" 640 root "$ACCOUNT"
        return 0
    fi
    if [ -n "$PULSE_SERVER" ]; then
        if [ "$DRY_RUN" -eq 1 ]; then
            report_changed "registered with $PULSE_SERVER as $(advertised_url); token $TOKEN_FILE"
            return 0
        fi
        token=$(register_with_pulse) || exit 1
        say "registered with $PULSE_SERVER as PVE instance '$(sed -n 2p <<<"$token")'"
        token=$(head -n 1 <<<"$token")
    else
        token=$(new_token)
        CHANGED+=(new-token)
    fi
    printf '%s\n' "$token" | write_file "$TOKEN_FILE" 640 root "$ACCOUNT" "token $TOKEN_FILE"
    CHANGED+=(https)
}

ensure_https_config() {
    local args=(--set http_enabled=true --set "http_auth_token_file=$TOKEN_FILE"
                --set "http_tls_cert=$TLS_DIR/server.crt" --set "http_tls_key=$TLS_DIR/server.key")
    local clients src
    if [ -n "$HTTP_ADDR" ]; then args+=(--set "http_listen_addr=$HTTP_ADDR")
    else args+=(--set-default "http_listen_addr=$HTTP_DEFAULT_ADDR"); fi
    if [ "${#HTTP_CLIENTS[@]}" -gt 0 ]; then
        clients=$(printf '%s,' "${HTTP_CLIENTS[@]}")
        args+=(--set "http_allowed_clients=[${clients%,}]")
    fi
    src=$(config_source)
    proxy config merge --config "$src" >"$WORK/https.current" || err "could not read $CONFIG"
    proxy config merge --config "$src" "${args[@]}" >"$WORK/https.merged" \
        || err "could not merge the http_* keys into $CONFIG"
    if cmp -s "$WORK/https.current" "$WORK/https.merged"; then
        report_ok "config $CONFIG http_* keys"
        return 0
    fi
    report_changed "config $CONFIG http_* keys"
    CHANGED+=(https)
    if [ "$DRY_RUN" -eq 1 ]; then
        diff -u "$WORK/https.current" "$WORK/https.merged" | tail -n +3 || true
    else
        proxy config merge --config "$CONFIG" "${args[@]}" --write >/dev/null || err "could not write $CONFIG"
    fi
}

ensure_https_mode() {
    [ "$HTTP_MODE" -eq 1 ] || return 0
    # The token first: a refused registration then leaves nothing of the mode behind, and a
    # failure after it keeps the answered token, so the next run does not register again.
    ensure_http_token
    ensure_tls_material
    ensure_https_config
}

https_summary() {
    local fingerprint
    [ "$HTTP_MODE" -eq 1 ] && [ "$DRY_RUN" -eq 0 ] || return 0
    fingerprint=$(proxy tls init --config "$CONFIG" 2>/dev/null | sed -n 's/^fingerprint: //p')
    say "HTTPS mode: $(advertised_url)   certificate $fingerprint"
    if changed_this_run new-token; then
        say "token (paste it into Pulse with the proxy URL, in the PVE instance's temperature proxy settings): $(cat "$TOKEN_FILE")"
    fi
    if [ "${#HTTP_CLIENTS[@]}" -eq 0 ] && ! grep -q '^http_allowed_clients:' "$CONFIG"; then
        say "note: HTTPS clients are limited to allowed_source_subnets; Pulse's address needs --http-allowed-clients CIDR if it is not among them"
    fi
    say "check:  pulse-sensor-proxy call get_temperature --node $(uname -n | cut -d. -f1) --url $(advertised_url) --token-file $TOKEN_FILE --fingerprint $fingerprint"
}

remove_https_material() {
    local path
    for path in "$TOKEN_FILE" "$TLS_DIR"; do
        if [ -e "$path" ]; then
            report_changed "$path removed"
            run rm -rf "$path"
        fi
    done
}

# ---------------------------------------------------------------- install / uninstall

do_install() {
    preflight
    ensure_account
    ensure_cluster_group
    ensure_directories
    select_binary
    take_over_original
    install_binary
    ensure_config
    ensure_https_mode
    install_units
    ensure_smart_timer
    start_service
    ensure_rotation_timer
    ensure_cleanup_path
    push_keys
    retire_original_wrappers
    local id
    for id in "${CTIDS[@]}"; do connect_container "$id"; done
}

revoke_proxy_keys() {
    local pub dry=()
    [ "$IS_PVE" -eq 1 ] && [ -x "$BIN" ] || return 0
    [ "$DRY_RUN" -eq 1 ] && dry=(--dry-run)
    # next/ holds a key only when a rotation stopped halfway, possibly already on some nodes.
    for pub in "$STATE_DIR/ssh/id_ed25519.pub" "$STATE_DIR/ssh.d/next/id_ed25519.pub" \
               "$STATE_DIR/ssh.d/prev/id_ed25519.pub"; do
        [ -f "$pub" ] || continue
        if "$BIN" keys revoke --config "$CONFIG" --public-key "$pub" "${dry[@]}" >"$WORK/revoke.out" 2>&1; then
            report_changed "key $pub revoked on every node"
        else
            warn "could not revoke $pub on every node: $(tail -n 2 "$WORK/revoke.out")"
        fi
    done
}

# ct_unmount_conf CONF: take every line mounting the proxy's directory out of one config.
ct_unmount_conf() {
    local conf=$1
    conf_without_mount "$conf" >"$WORK/conf"
    cmp -s "$WORK/conf" "$conf" && return 0
    report_changed "mount entry removed from $conf (the container keeps the socket until it restarts)"
    run cp "$WORK/conf" "$conf.tmp"
    run mv -f "$conf.tmp" "$conf"
}

unmount_from_containers() {
    local conf id dir
    for conf in "$PVE_DIR"/lxc/*.conf; do
        [ -f "$conf" ] || continue
        id=${conf##*/}; id=${id%.conf}
        dir=$(ct_dir "$id")
        [ "$dir" = "" ] || remove_ct_files "$id" "$dir"
        with_ct_lock "$id" ct_unmount_conf "$conf"
    done
}

# ---------------------------------------------------------------- --restore-original

# newest_original_backup: the newest original-<time> directory the take-over made.
newest_original_backup() {
    local dir newest=
    for dir in "$BACKUP_DIR"/original-*/; do
        [ -d "$dir" ] && newest=${dir%/}
    done
    [ -n "$newest" ] && printf '%s\n' "$newest"
}

# restore_original DIR: every file of DIR back at its own path, the config in the original's
# vocabulary back from config.yaml.bak (ours kept as config.yaml.replacement), and the
# original's units started again. Runs after our units and binary are gone.
restore_original() {
    local dir=$1 file path unit
    while IFS= read -r -d '' file; do
        path=$ROOT/${file#"$dir"/}
        report_changed "original proxy: ${path} put back from $dir"
        run install -d "${path%/*}"
        run mv -f "$file" "$path"
    done < <(find "$dir" -type f -print0 | sort -z)
    if [ -f "$CONFIG.bak" ]; then
        report_changed "config $CONFIG: the original's put back from $CONFIG.bak (this proxy's kept as $CONFIG.replacement)"
        run cp -p "$CONFIG" "$CONFIG.replacement"
        run cp -p "$CONFIG.bak" "$CONFIG"
    fi
    run systemctl daemon-reload
    for unit in "$SERVICE" pulse-sensor-proxy-selfheal.timer pulse-sensor-cleanup.path; do
        [ -f "$UNIT_DIR/$unit" ] || continue
        report_changed "original proxy: $unit enabled and started"
        run systemctl enable --now --quiet "$unit" || warn "the original proxy's $unit did not start; see: journalctl -u $unit -n 50"
    done
    run find "$dir" -depth -type d -empty -delete
}

# installed_units: this proxy's unit files in UNIT_DIR, one name a line, whichever version
# wrote them (so a broken or missing binary does not stop the removal); not the original's.
installed_units() {
    local path name
    for path in "$UNIT_DIR"/pulse-sensor-proxy.service "$UNIT_DIR"/pulse-sensor-proxy-*.{service,timer,path}; do
        [ -f "$path" ] || continue
        name=${path##*/}
        printf '%s\n' "${ORIGINAL_UNITS[@]}" | grep -qxF "$name" || printf '%s\n' "$name"
    done
}

do_uninstall() {
    local unit units original=
    [ "$(id -u)" -eq 0 ] || err "run as root"
    if [ "$RESTORE_ORIGINAL" -eq 1 ]; then
        original=$(newest_original_backup) \
            || err "no backup of the original proxy in $BACKUP_DIR/original-*: nothing was taken over on this host"
        say "restoring the original proxy from $original"
    fi
    if command -v pvecm >/dev/null || [ -d "$PVE_DIR" ]; then IS_PVE=1; fi
    mapfile -t units < <(installed_units)
    for unit in "${units[@]}"; do
        if [ -f "$UNIT_DIR/$unit" ]; then
            report_changed "$unit stopped and disabled"
            run systemctl disable --now --quiet "$unit"
        fi
    done
    # Kept across stops (RuntimeDirectoryPreserve=yes, for the containers' bind mounts): gone
    # only with the service, or kept for the original's, which serves the same directory.
    if [ -d "$ROOT$RUN_DIR" ] && [ -z "$original" ]; then
        report_changed "$RUN_DIR removed"
        run rm -rf "$ROOT$RUN_DIR"
    fi
    if [ -z "$original" ]; then
        revoke_proxy_keys
        [ "$IS_PVE" -eq 1 ] && unmount_from_containers
    fi
    for unit in "${units[@]}"; do
        if [ -f "$UNIT_DIR/$unit" ]; then
            report_changed "unit $UNIT_DIR/$unit removed"
            run rm -f "$UNIT_DIR/$unit"
        fi
    done
    run systemctl daemon-reload
    # A unit that failed once (a rotation with a node down) stays listed until this.
    [ "${#units[@]}" -eq 0 ] || run systemctl reset-failed "${units[@]}" 2>/dev/null || true
    if [ -e "$BIN" ]; then
        report_changed "binary $BIN removed"
        run rm -f "$BIN" "$BIN.previous"
    fi
    if [ -n "$original" ]; then
        restore_original "$original"
        say "kept for the original proxy: its key in $STATE_DIR/ssh and its lines on the nodes, the containers' mount lines and the files this script wrote into them, $RUN_DIR, $TLS_DIR"
        return 0
    fi
    remove_https_material
    if [ "$PURGE" -eq 0 ]; then
        say "kept: $STATE_DIR and $CONF_DIR (remove them and the account with --uninstall --purge)"
        return 0
    fi
    local path
    for path in "$STATE_DIR" "$CONF_DIR" "$ROOT/var/cache/pulse-sensor-proxy" "$ROOT/var/cache/pulse-sensor-proxy-rotation" \
                "$ROOT/var/lib/pulse-sensor-proxy-smart" "$ROOT/var/cache/pulse-sensor-proxy-smart"; do
        if [ -e "$path" ]; then
            report_changed "$path removed"
            run rm -rf "$path"
        fi
    done
    if getent passwd "$ACCOUNT" >/dev/null; then
        report_changed "service account $ACCOUNT removed"
        run userdel "$ACCOUNT"
    fi
    [ -d "$BACKUP_DIR" ] && say "kept: $BACKUP_DIR (SSH keys moved out of containers)"
    return 0
}

cleanup() { [ -z "$WORK" ] || rm -rf "$WORK"; }
# The work directory goes on any exit; an err from a subshell (its USR1) stops the script.
set_traps() { trap cleanup EXIT; trap stop_failed USR1; }

main() {
    parse_args "$@"
    freeze_options
    WORK=$(mktemp -d)
    set_traps
    [ "$DRY_RUN" -eq 1 ] && say "Dry run: printing what would be done; nothing is changed."
    "do_$ACTION"
    summary
}

# Sourced with PULSE_INSTALLER_LIB=1 (by the tests), the script only defines its functions.
if [ "${PULSE_INSTALLER_LIB:-}" != 1 ]; then main "$@"; fi
