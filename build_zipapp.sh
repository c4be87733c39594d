#!/usr/bin/env bash
# build_zipapp.sh: build pulse-sensor-proxy as one executable .pyz per CPU architecture.
#
# Usage: ./build_zipapp.sh [--arch ARCH]... [--wheelhouse DIR] [--out DIR] [--python PY]
#        ./build_zipapp.sh --download-wheelhouse DIR [--arch ARCH]...
#
# Writes OUT/pulse-sensor-proxy-ARCH.pyz for each ARCH (default: x86_64 and aarch64) and
# OUT/SHA256SUMS (OUT defaults to ./dist). Each pyz runs on CPython 3.11, 3.12 and 3.13
# (Proxmox VE 8 and 9) with glibc 2.28 or newer: it carries each version's native extensions
# side by side (their file names carry the ABI tag) and manylinux_2_28/2_17 wheels only.
# Any machine can build any architecture: wheels are chosen with pip's --platform and
# --only-binary=:all:, never compiled.
#
# Options:
#   --arch ARCH                 x86_64 or aarch64; repeat for several (default: both)
#   --wheelhouse DIR            build offline from the wheels in DIR (no network needed)
#   --download-wheelhouse DIR   fill DIR with every wheel the build needs, then stop
#   --out DIR                   where the pyz files and SHA256SUMS go (default: ./dist)
#   --python PY                 the Python that runs pip and shiv (default: ./.venv/bin/python
#                               if present, else python3); ./dev.sh setup installs shiv there
#   -h, --help                  show this manual
#
# Every wheel is checked against the sha256 hashes in requirements.txt (--require-hashes).
# The build is byte-reproducible: SOURCE_DATE_EPOCH (when unset, the commit's time) fixes
# every timestamp, and the commit and its date are written into the packaged copy of
# pulse_sensor_proxy.py, so `pulse-sensor-proxy version` names them. Verify a download with
# `sha256sum -c SHA256SUMS` in OUT.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PROG=pulse-sensor-proxy
MODULE=pulse_sensor_proxy.py
LAUNCHER=$ROOT/packaging/pyz_main.py
REQUIREMENTS=$ROOT/requirements.txt
SUPPORTED_ARCHES=(x86_64 aarch64)
# Only wheels that run on glibc 2.28 (never cryptography's manylinux_2_34, which needs 2.34);
# pip takes the earlier tag when a project publishes several.
PLATFORM_TAGS=(manylinux_2_28 manylinux_2_17 manylinux2014)
SHEBANG="/usr/bin/env python3"

ARCHES=()
WHEELHOUSE=""
DOWNLOAD_TO=""
OUT=$ROOT/dist
PY=""
WORK=""

say() { printf 'build_zipapp.sh: %s\n' "$*" >&2; }
err() { say "error: $*"; exit 1; }

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

cleanup() { [ -z "$WORK" ] || rm -rf "$WORK"; }

parse_args() {
    while [ $# -gt 0 ]; do
        case "$1" in
            --arch) [ $# -ge 2 ] || err "--arch needs a value"; ARCHES+=("$2"); shift 2 ;;
            --wheelhouse) [ $# -ge 2 ] || err "--wheelhouse needs a directory"; WHEELHOUSE=$2; shift 2 ;;
            --download-wheelhouse) [ $# -ge 2 ] || err "--download-wheelhouse needs a directory"
                                   DOWNLOAD_TO=$2; shift 2 ;;
            --out) [ $# -ge 2 ] || err "--out needs a directory"; OUT=$2; shift 2 ;;
            --python) [ $# -ge 2 ] || err "--python needs a path"; PY=$2; shift 2 ;;
            -h|--help) usage; exit 0 ;;
            *) err "unknown argument '$1' (try --help)" ;;
        esac
    done
    [ "${#ARCHES[@]}" -gt 0 ] || ARCHES=("${SUPPORTED_ARCHES[@]}")
    [ -z "$WHEELHOUSE" ] || [ -z "$DOWNLOAD_TO" ] || err "--wheelhouse and --download-wheelhouse exclude each other"
    [ -z "$WHEELHOUSE" ] || [ -d "$WHEELHOUSE" ] || err "wheelhouse '$WHEELHOUSE' is not a directory"
    local arch
    for arch in "${ARCHES[@]}"; do check_arch "$arch"; done
}

check_arch() {
    case "$1" in
        x86_64|aarch64) ;;
        armv7l) err "armv7l is not built: cffi 2.1.1 and PyYAML 6.0.4 publish no armv7l wheels (only cryptography does), and the pyz compiles nothing (see README.md, Packaging)" ;;
        *) err "unknown architecture '$1' (supported: ${SUPPORTED_ARCHES[*]})" ;;
    esac
}

pick_python() {
    if [ -z "$PY" ]; then
        if [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python
        elif command -v python3 >/dev/null; then PY=$(command -v python3)
        else err "no python3 found: install python3 (apt-get install python3 python3-venv) or pass --python PY"
        fi
    fi
    "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 9))' 2>/dev/null \
        || err "'$PY' is not a working Python 3.9 or newer (pass --python PY)"
    "$PY" -m pip --version >/dev/null 2>&1 || err "'$PY' has no pip (apt-get install python3-pip, or ./dev.sh setup)"
}

require_shiv() {
    "$PY" -c 'import shiv' 2>/dev/null || err "'$PY' has no shiv: run ./dev.sh setup (or pip install shiv==1.0.8 into it, or pass --python PY)"
}

# The CPython versions the launcher accepts, e.g. "3.11 3.12 3.13": one list, kept in the launcher.
python_versions() {
    grep -m1 '^PYTHONS = ' "$LAUNCHER" | grep -o '([0-9]*, [0-9]*)' | tr -d '() ' | tr ',' '.'
}

# pip's target-selection options for one architecture and CPython version X.Y.
target_options() {
    local arch=$1 version=$2 tag
    local abi=cp${version/./}
    printf '%s\n' --only-binary=:all: --implementation cp --python-version "$version" \
        --abi "$abi" --abi abi3 --abi none
    for tag in "${PLATFORM_TAGS[@]}"; do printf '%s\n' --platform "${tag}_${arch}"; done
}

# Run pip quietly; on failure show its log and what to do about it.
run_pip() {
    local log=$1; shift
    local -a index=(--timeout 20 --retries 2)
    [ -z "$WHEELHOUSE" ] || index=(--no-index --find-links "$WHEELHOUSE")
    if ! "$PY" -m pip --disable-pip-version-check "$@" "${index[@]}" >"$log" 2>&1; then
        tail -n 15 "$log" >&2
        if [ -n "$WHEELHOUSE" ]; then
            err "pip failed with wheelhouse $WHEELHOUSE (above): is it complete? (fill it with --download-wheelhouse DIR)"
        elif grep -qiE 'connection|network|resolution|timed out|max retries|unreachable' "$log"; then
            err "pip could not reach the package index (no network?): build offline with --wheelhouse DIR, filled on a connected machine with --download-wheelhouse DIR"
        fi
        err "pip failed (above)"
    fi
}

download_wheelhouse() {
    local arch version opts
    mkdir -p "$DOWNLOAD_TO"
    for arch in "${ARCHES[@]}"; do
        for version in $(python_versions); do
            say "downloading wheels for $arch, CPython $version into $DOWNLOAD_TO"
            mapfile -t opts < <(target_options "$arch" "$version")
            run_pip "$WORK/pip.log" download --quiet --require-hashes --dest "$DOWNLOAD_TO" \
                "${opts[@]}" -r "$REQUIREMENTS"
        done
    done
    say "wheelhouse ready: $DOWNLOAD_TO ($(find "$DOWNLOAD_TO" -name '*.whl' | wc -l) wheels)"
}

install_for() {
    local arch=$1 version=$2 dest=$3 opts
    mapfile -t opts < <(target_options "$arch" "$version")
    run_pip "$WORK/pip.log" install --quiet --require-hashes --no-compile --no-warn-script-location \
        --target "$dest" "${opts[@]}" -r "$REQUIREMENTS"
}

# Fold the per-version native extensions of OTHER into BASE. Everything else must be identical,
# apart from the wheel metadata that names the tag (WHEEL) or lists the files (RECORD).
merge_extensions() {
    local base=$1 other=$2 so
    diff -r -q -x RECORD -x WHEEL -x '*.cpython-3*.so' "$base" "$other" >&2 \
        || err "the wheels for $(basename "$other") differ from $(basename "$base") in more than native extensions"
    while IFS= read -r -d '' so; do
        cp -p "$other/$so" "$base/$so"
    done < <(cd "$other" && find . -name '*.cpython-3*.so' -print0)
}

source_date_epoch() {
    if [ -n "${SOURCE_DATE_EPOCH:-}" ]; then echo "$SOURCE_DATE_EPOCH"
    elif git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then git -C "$ROOT" log -1 --format=%ct
    else err "not a git checkout: set SOURCE_DATE_EPOCH (seconds since 1970) for a reproducible build"
    fi
}

build_commit() {
    local commit
    commit=$(git -C "$ROOT" rev-parse --short=7 HEAD 2>/dev/null) || { echo unknown; return; }
    if [ -n "$(git -C "$ROOT" status --porcelain -- "$MODULE" packaging units requirements.txt build_zipapp.sh)" ]; then
        commit+="-dirty"
    fi
    echo "$commit"
}

# Copy the module into SITE with the build's commit and date on the two reserved lines.
stamp_module() {
    local site=$1 commit=$2 date=$3
    sed -e "s/^BUILD_COMMIT = \"source\"\$/BUILD_COMMIT = \"$commit\"/" \
        -e "s/^BUILD_DATE = \"\"\$/BUILD_DATE = \"$date\"/" "$ROOT/$MODULE" >"$site/$MODULE"
    if ! grep -q "^BUILD_COMMIT = \"$commit\"\$" "$site/$MODULE" || ! grep -q "^BUILD_DATE = \"$date\"\$" "$site/$MODULE"; then
        err "$MODULE lacks the lines BUILD_COMMIT = \"source\" and BUILD_DATE = \"\" that the build stamps"
    fi
}

# The launcher imports the module from the archive, where Python cannot cache bytecode: ship it
# compiled for the build's Python (the oldest supported one), so `version` need not compile the
# module on every run. Other versions ignore it (its magic number) and compile the .py.
compile_module() {
    local site=$1 pyc=$2
    "$PY" -c 'import py_compile, sys
py_compile.compile(sys.argv[1], cfile=sys.argv[2], dfile=sys.argv[3], doraise=True,
                   invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)' \
        "$site/$MODULE" "$pyc" "$MODULE"
}

# shiv's archive with its __main__.py replaced by the launcher and the module's bytecode added
# beside it (shiv leaves .pyc files out); other entries and all timestamps unchanged.
swap_launcher() {
    local src=$1 dest=$2 pyc=$3
    "$PY" - "$src" "$dest" "$LAUNCHER" "$pyc" "site-packages/$MODULE" <<'EOF'
import sys
import zipfile

src, dest, launcher, pyc, module = sys.argv[1:6]
with open(src, "rb") as f:
    shebang = f.readline()
with open(launcher, "rb") as f:
    main_py = f.read()
with open(pyc, "rb") as f:
    bytecode = f.read()
with zipfile.ZipFile(src) as zin, open(dest, "wb") as out:
    out.write(shebang)
    with zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, main_py if info.filename == "__main__.py" else zin.read(info))
            if info.filename == module:
                compiled = zipfile.ZipInfo(module[:-3] + ".pyc", info.date_time)
                compiled.compress_type, compiled.external_attr = info.compress_type, info.external_attr
                zout.writestr(compiled, bytecode)
EOF
    chmod 0755 "$dest"
}

build_arch() {
    local arch=$1 sde=$2 commit=$3 date=$4 version base=""
    local stage=$WORK/$arch
    for version in $(python_versions); do
        say "$arch: installing pinned wheels for CPython $version"
        install_for "$arch" "$version" "$stage/$version"
        if [ -z "$base" ]; then base=$stage/$version
        else merge_extensions "$base" "$stage/$version"
        fi
    done
    stamp_module "$base" "$commit" "$date"
    # The installer takes the unit files from the binary (`units --write`): units/ is their one source.
    cp -rp "$ROOT/units" "$base/pulse-sensor-proxy-units"
    say "$arch: packing with shiv"
    SOURCE_DATE_EPOCH=$sde "$PY" -m shiv --site-packages "$base" --reproducible --compile-pyc \
        --entry-point pulse_sensor_proxy:main --python "$SHEBANG" \
        --output-file "$stage/shiv.pyz" >"$WORK/shiv.log" 2>&1 \
        || { cat "$WORK/shiv.log" >&2; err "shiv failed for $arch"; }
    compile_module "$base" "$stage/module.pyc"
    swap_launcher "$stage/shiv.pyz" "$OUT/.$PROG-$arch.pyz.partial" "$stage/module.pyc"
    mv -f "$OUT/.$PROG-$arch.pyz.partial" "$OUT/$PROG-$arch.pyz"
    say "$arch: $OUT/$PROG-$arch.pyz ($(du -k "$OUT/$PROG-$arch.pyz" | cut -f1) KiB)"
}

write_sums() {
    local names=() arch
    for arch in "${ARCHES[@]}"; do names+=("$PROG-$arch.pyz"); done
    (cd "$OUT" && sha256sum -- "${names[@]}" >SHA256SUMS)
    say "$OUT/SHA256SUMS:"
    sed 's/^/    /' "$OUT/SHA256SUMS" >&2
}

main() {
    parse_args "$@"
    umask 022
    pick_python
    WORK=$(mktemp -d)
    trap cleanup EXIT
    if [ -n "$DOWNLOAD_TO" ]; then
        download_wheelhouse
        return
    fi
    require_shiv
    local sde commit date arch
    sde=$(source_date_epoch)
    commit=$(build_commit)
    date=$(date -u -d "@$sde" +%F)
    mkdir -p "$OUT"
    OUT=$(cd "$OUT" && pwd)
    say "building commit $commit ($date) for ${ARCHES[*]}, CPython $(python_versions | paste -sd' ')${WHEELHOUSE:+, from $WHEELHOUSE}"
    for arch in "${ARCHES[@]}"; do build_arch "$arch" "$sde" "$commit" "$date"; done
    write_sums
}

main "$@"
