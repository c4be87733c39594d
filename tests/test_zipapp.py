"""The pyz that build_zipapp.sh makes: what it contains, how it unpacks, who may run it.

Every test runs the real build output as a real process (as other uids through setpriv, with
read-only HOMEs through a private mount namespace), never an imitation of it.
"""
import datetime
import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ARCHES, BUILD, ROOT, build_pyz

OTHER_UID = 4242
BASE_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
PYTHONS = ("3.11", "3.12", "3.13")
ELF_MACHINE = {"x86_64": 62, "aarch64": 183}
# Makes the launcher unpack (it is not version/--help) and then fails in argument parsing.
UNPACKING_ARGS = ("--no-such-option",)


def run_pyz(pyz, *args, env=None, uid=None, readonly=None):
    """Run PYZ with ARGS in a clean environment, as UID, with directory READONLY mounted ro."""
    command = [str(pyz), *args]
    if uid is not None:
        command = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *command]
    if readonly is not None:
        command = ["unshare", "--mount", "--propagation", "private", "sh", "-ec",
                   'mount --bind "$0" "$0"; mount -o remount,bind,ro "$0"; exec "$@"',
                   str(readonly), *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env={**BASE_ENV, **(env or {})})


def shared_dir(parent, name, mode):
    path = parent / name
    path.mkdir()
    path.chmod(mode)
    return path


def unpacked_site_packages(root):
    found = sorted(Path(root).glob("pulse-sensor-proxy_*/site-packages"))
    assert len(found) == 1, f"expected one unpacked build under {root}, found {found}"
    return found[0]


def git(*args):
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- what the build writes --------------------------------------------------------------------


def test_build_writes_one_executable_pyz_per_arch_and_checkable_sums(pyz_dir):
    listed = [line.split()[1] for line in (pyz_dir / "SHA256SUMS").read_text().splitlines()]
    assert listed == [f"pulse-sensor-proxy-{arch}.pyz" for arch in ARCHES]
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=pyz_dir, capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    for name in listed:
        path = pyz_dir / name
        with open(path, "rb") as f:
            assert f.readline() == b"#!/usr/bin/env python3\n"
        assert os.access(path, os.X_OK)
        assert zipfile.is_zipfile(path)
        assert path.stat().st_size <= 10 * 1024 * 1024, f"{name} is over 10 MiB"


@pytest.mark.parametrize("arch", ARCHES)
def test_native_code_matches_the_architecture_and_every_python(pyz_dir, arch):
    triplet = f"{arch}-linux-gnu"
    with zipfile.ZipFile(pyz_dir / f"pulse-sensor-proxy-{arch}.pyz") as archive:
        names = archive.namelist()
        elves = {}
        for name in names:
            head = archive.open(name).read(20)
            if head[:4] == b"\x7fELF":
                elves[name] = (head[4], int.from_bytes(head[18:20], "little"))
    assert len(elves) >= 7, elves
    wrong = {name: info for name, info in elves.items() if info != (2, ELF_MACHINE[arch])}
    assert not wrong, f"not 64-bit {arch} ELF: {wrong}"
    for version in PYTHONS:
        tag = "cpython-" + version.replace(".", "")
        assert f"site-packages/_cffi_backend.{tag}-{triplet}.so" in names
        assert f"site-packages/yaml/_yaml.{tag}-{triplet}.so" in names
    assert "site-packages/cryptography/hazmat/bindings/_rust.abi3.so" in names


def test_offline_build_from_a_wheelhouse_is_byte_identical(pyz_dir, tmp_path):
    wheelhouse = tmp_path / "wheels"
    fill = build_pyz(tmp_path / "unused", "--arch", "x86_64", "--download-wheelhouse", str(wheelhouse))
    assert fill.returncode == 0, fill.stderr
    offline = subprocess.run(
        ["unshare", "--net", str(BUILD), "--python", sys.executable,
         "--arch", "x86_64", "--wheelhouse", str(wheelhouse), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600)
    assert offline.returncode == 0, offline.stderr
    assert sha256(tmp_path / "out" / "pulse-sensor-proxy-x86_64.pyz") == sha256(
        pyz_dir / "pulse-sensor-proxy-x86_64.pyz")


def test_build_without_network_or_wheelhouse_says_how_to_build_offline(tmp_path):
    result = subprocess.run(
        ["unshare", "--net", str(BUILD), "--python", sys.executable, "--arch", "x86_64",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PIP_NO_CACHE_DIR": "1"})
    assert result.returncode == 1
    assert "no network?" in result.stderr
    assert "--wheelhouse DIR" in result.stderr
    assert not (tmp_path / "pulse-sensor-proxy-x86_64.pyz").exists()


def test_build_help_is_the_manual_and_bad_input_is_named():
    manual = subprocess.run([str(BUILD), "--help"], capture_output=True, text=True)
    assert manual.returncode == 0
    for option in ("--arch", "--wheelhouse", "--download-wheelhouse", "--out", "--python"):
        assert option in manual.stdout
    armv7l = subprocess.run([str(BUILD), "--arch", "armv7l"], capture_output=True, text=True)
    assert armv7l.returncode == 1
    assert "cffi 2.1.1 and PyYAML 6.0.4 publish no armv7l wheels" in armv7l.stderr
    no_python = subprocess.run([str(BUILD), "--python", "/nonexistent/python3"],
                               capture_output=True, text=True)
    assert no_python.returncode == 1
    assert "'/nonexistent/python3' is not a working Python" in no_python.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_build_script_is_shellcheck_clean():
    result = subprocess.run(["shellcheck", str(BUILD)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


# --- version and --help: no unpacking, any user, any HOME ---------------------------------------


def test_version_names_the_commit_and_date_and_unpacks_nothing(pyz, tmp_path):
    root = tmp_path / "cache"
    result = run_pyz(pyz, "version", env={"SHIV_ROOT": str(root)})
    assert result.returncode == 0, result.stderr
    version = re.search(r'^__version__ = "(.+)"$', (ROOT / "pulse_sensor_proxy.py").read_text(),
                        re.M).group(1)
    built = datetime.datetime.fromtimestamp(int(git("log", "-1", "--format=%ct")),
                                            datetime.timezone.utc).strftime("%Y-%m-%d")
    assert re.fullmatch(
        rf"pulse-sensor-proxy {re.escape(version)} \(commit {git('rev-parse', '--short=7', 'HEAD')}"
        rf"(-dirty)?, built {built}\)\n", result.stdout), result.stdout
    assert not root.exists()


def test_version_runs_the_shipped_bytecode_without_compiling(pyz):
    with zipfile.ZipFile(pyz) as archive:
        bytecode = archive.read("site-packages/pulse_sensor_proxy.pyc")
    assert int.from_bytes(bytecode[4:8], "little") == 1, "an unchecked hash-based pyc"
    probe = ("import sys; sys.path.insert(0, sys.argv[1] + '/site-packages'); "
             "import pulse_sensor_proxy as m; print(m.__file__)")
    result = subprocess.run(["/usr/bin/python3", "-I", "-c", probe, str(pyz)], capture_output=True,
                            text=True, timeout=60)
    assert result.stdout.strip().endswith(".pyz/site-packages/pulse_sensor_proxy.pyc"), result


@pytest.mark.parametrize("uid", [None, OTHER_UID], ids=["root", "other-uid"])
@pytest.mark.parametrize("home", ["unset", "read-only", "missing"])
@pytest.mark.parametrize("args", [("version",), ("--help",)], ids=["version", "help"])
def test_version_and_help_work_for_any_user_with_any_home(pyz, base_dir, uid, home, args):
    tmpdir = shared_dir(base_dir, "tmp", 0o1777)
    env = {"TMPDIR": str(tmpdir)}
    readonly = None
    if home == "read-only":
        readonly = shared_dir(base_dir, "home", 0o755)
        env["HOME"] = str(readonly)
    elif home == "missing":
        env["HOME"] = str(base_dir / "no-such-home")
    result = run_pyz(pyz, *args, env=env, uid=uid, readonly=readonly)
    assert result.returncode == 0, result.stderr
    if args == ("version",):
        assert result.stdout.startswith("pulse-sensor-proxy ")
    else:
        assert result.stdout.startswith("usage: pulse-sensor-proxy")
    assert list(tmpdir.iterdir()) == []
    if readonly is not None:
        assert list(readonly.iterdir()) == []


# --- unpacking: where, how private, what it yields ----------------------------------------------


def test_unpacks_privately_with_bytecode_and_the_native_deps_import(pyz, tmp_path):
    root = tmp_path / "cache"
    result = run_pyz(pyz, *UNPACKING_ARGS, env={"SHIV_ROOT": str(root)})
    assert result.returncode == 2 and "usage:" in result.stderr, result.stderr
    site = unpacked_site_packages(root)
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert mode & 0o022 == 0, f"{path} is group/other writable ({mode:o})"
        if path.is_dir():
            assert mode & 0o077 == 0, f"{path} is reachable by others ({mode:o})"
    assert list((site / "asyncssh" / "__pycache__").glob("connection.cpython-3*.pyc"))
    probe = subprocess.run(
        ["/usr/bin/python3", "-I", "-c",
         "import sys; sys.path.insert(0, sys.argv[1]); import _cffi_backend, asyncssh, yaml, "
         "cryptography; from cryptography.hazmat.bindings import _rust; "
         "from yaml import CSafeLoader; print(asyncssh.__version__, cryptography.__version__, "
         "yaml.__with_libyaml__)", str(site)],
        capture_output=True, text=True, env=BASE_ENV)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["2.24.1", "50.0.2", "True"]


def test_runs_when_started_by_a_relative_path(pyz, tmp_path):
    root = tmp_path / "cache"
    result = subprocess.run([f"./{pyz.name}", *UNPACKING_ARGS], cwd=pyz.parent, capture_output=True,
                            text=True, env={**BASE_ENV, "SHIV_ROOT": str(root)})
    assert result.returncode == 2 and "usage:" in result.stderr, result.stderr
    unpacked_site_packages(root)


def test_second_run_reuses_the_unpacked_build(pyz, tmp_path):
    root = tmp_path / "cache"
    run_pyz(pyz, *UNPACKING_ARGS, env={"SHIV_ROOT": str(root)})
    site = unpacked_site_packages(root)
    marker = site / "asyncssh" / "__init__.py"
    before = marker.stat().st_mtime_ns
    again = run_pyz(pyz, *UNPACKING_ARGS, env={"SHIV_ROOT": str(root)})
    assert again.returncode == 2, again.stderr
    assert unpacked_site_packages(root) == site
    assert marker.stat().st_mtime_ns == before


def test_other_user_with_read_only_home_unpacks_into_a_private_temp_dir(pyz, base_dir):
    tmpdir = shared_dir(base_dir, "tmp", 0o1777)
    home = shared_dir(base_dir, "home", 0o755)
    result = run_pyz(pyz, *UNPACKING_ARGS, uid=OTHER_UID, readonly=home,
                     env={"HOME": str(home), "TMPDIR": str(tmpdir)})
    assert result.returncode == 2 and "usage:" in result.stderr, result.stderr
    private = tmpdir / f"pulse-sensor-proxy-{OTHER_UID}"
    info = private.stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (OTHER_UID, 0o700)
    unpacked_site_packages(private)
    assert list(home.iterdir()) == []


def test_a_planted_private_temp_dir_is_refused(pyz, base_dir):
    tmpdir = shared_dir(base_dir, "tmp", 0o1777)
    planted = tmpdir / f"pulse-sensor-proxy-{OTHER_UID}"
    planted.mkdir(mode=0o700)
    os.chown(planted, OTHER_UID + 1, OTHER_UID + 1)
    result = run_pyz(pyz, *UNPACKING_ARGS, uid=OTHER_UID, env={"TMPDIR": str(tmpdir)})
    assert result.returncode == 1
    assert f"{planted} belongs to uid {OTHER_UID + 1}" in result.stderr
    assert list(planted.iterdir()) == []


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777, 0o757])
def test_refuses_an_unpack_dir_that_others_can_write(pyz, tmp_path, mode):
    root = tmp_path / "shared"
    root.mkdir()
    root.chmod(mode)
    result = run_pyz(pyz, *UNPACKING_ARGS, env={"SHIV_ROOT": str(root)})
    assert result.returncode == 1
    assert f"refusing to unpack into {root}: {root} is writable by group or others" in result.stderr
    assert "SHIV_ROOT" in result.stderr
    assert list(root.iterdir()) == []
    assert run_pyz(pyz, "version", env={"SHIV_ROOT": str(root)}).returncode == 0


def test_refuses_an_unpack_dir_under_a_parent_others_can_write(pyz, tmp_path):
    parent = tmp_path / "open"
    parent.mkdir()
    parent.chmod(0o777)
    root = parent / "cache"
    root.mkdir(mode=0o700)
    result = run_pyz(pyz, *UNPACKING_ARGS, env={"SHIV_ROOT": str(root)})
    assert result.returncode == 1
    assert f"{parent} is writable by group or others (mode 0777)" in result.stderr
    assert list(root.iterdir()) == []


def test_refuses_an_unpack_dir_another_user_owns_even_through_a_symlink(pyz, tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, OTHER_UID, OTHER_UID)
    link = tmp_path / "link"
    link.symlink_to(theirs)
    result = run_pyz(pyz, *UNPACKING_ARGS, env={"SHIV_ROOT": str(link)})
    assert result.returncode == 1
    assert f"refusing to unpack into {theirs}: {theirs} belongs to uid {OTHER_UID}" in result.stderr
    assert list(theirs.iterdir()) == []


def test_accepts_a_private_dir_under_a_root_owned_sticky_parent(pyz, tmp_path):
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    root = sticky / "mine"
    result = run_pyz(pyz, *UNPACKING_ARGS, env={"SHIV_ROOT": str(root)})
    assert result.returncode == 2 and "usage:" in result.stderr, result.stderr
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    unpacked_site_packages(root)


def test_units_written_from_the_pyz_are_every_file_of_units(pyz, tmp_path):
    """The installer takes its unit files from the binary: units/ is their one source."""
    out = tmp_path / "units"
    out.mkdir()
    result = run_pyz(pyz, "units", "--write", str(out), env={"SHIV_ROOT": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    shipped = sorted(p.name for p in (ROOT / "units").iterdir())
    assert result.stdout.split() == shipped
    assert {p.name: p.read_bytes() for p in out.iterdir()} == \
        {name: (ROOT / "units" / name).read_bytes() for name in shipped}
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in out.iterdir())
