"""The same pyz on the Debian releases under Proxmox VE 7, 8 and 9, for real.

Each release is a `debootstrap --variant=minbase --include=python3` tree, cached between runs
by rootfs.debootstrapped (one directory per suite and architecture); the first run builds it
(about a minute; several under qemu for arm64). Commands run with chroot inside a private mount
namespace that has /proc and /dev mounted, so every mount disappears with the command, whatever
happens to the test.
"""
import json
import re
import shutil
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from conftest import ROOT, wait_for
from rootfs import debootstrapped

CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}
# Debian suite -> its python3: Proxmox VE 8 and VE 9.
SUPPORTED = {"bookworm": "3.11", "trixie": "3.13"}
VERSION = re.search(r'^__version__ = "(.+)"$', (ROOT / "pulse_sensor_proxy.py").read_text(),
                    re.M).group(1)


def ensure_chroot(suite, arch="amd64"):
    """The cached minbase tree of SUITE for ARCH, with python3."""
    for tool in ("debootstrap", "unshare", "chroot"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: ./dev.sh setup installs it")
    return debootstrapped(f"{suite}-{arch}-python3", suite, ("python3",), arch)


def chroot_command(root, *command, env=None):
    return ["unshare", "--mount", "--propagation", "private", "sh", "-ec",
            'mount -t proc proc "$0/proc"; mount --rbind /dev "$0/dev"; exec chroot "$0" "$@"',
            str(root), "/usr/bin/env", "-i",
            *(f"{key}={value}" for key, value in {**CHROOT_ENV, **(env or {})}.items()), *command]


def in_chroot(root, *command, env=None, timeout=300):
    return subprocess.run(chroot_command(root, *command, env=env), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def installed(request, pyz_dir):
    """(suite, chroot, work dir inside it, the pyz there for the chroot's architecture)."""
    suite, arch, machine = request.param
    root = ensure_chroot(suite, arch)
    inside = Path("/tmp") / f"psp-{uuid.uuid4().hex[:8]}"
    (root / inside.relative_to("/")).mkdir(mode=0o755)
    shutil.copy2(pyz_dir / f"pulse-sensor-proxy-{machine}.pyz", root / inside.relative_to("/"))
    yield suite, root, inside, inside / f"pulse-sensor-proxy-{machine}.pyz"
    shutil.rmtree(root / inside.relative_to("/"))


def amd64(*suites):
    return pytest.mark.parametrize("installed", [(s, "amd64", "x86_64") for s in suites],
                                   indirect=True, ids=list(suites))


@amd64(*SUPPORTED)
def test_supported_debian_runs_version_demo_and_call(installed):
    suite, root, inside, pyz = installed
    python = in_chroot(root, "python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])")
    assert python.stdout.strip() == SUPPORTED[suite], python.stderr
    env = {"SHIV_ROOT": str(inside / "shiv")}

    version = in_chroot(root, str(pyz), "version", env=env)
    assert version.returncode == 0, version.stderr
    assert re.fullmatch(rf"pulse-sensor-proxy {re.escape(VERSION)} \(commit [0-9a-f]{{7}}"
                        r"(-dirty)?, built \d{4}-\d\d-\d\d\)\n", version.stdout), version.stdout

    sock = inside / "demo" / "run" / "pulse-sensor-proxy.sock"
    demo = subprocess.Popen(chroot_command(root, str(pyz), "demo", "--dir", str(inside / "demo"),
                                           env=env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (root / sock.relative_to("/")).is_socket() or demo.poll() is not None,
                 timeout=120, what=f"the demo socket in {suite}")
        assert demo.poll() is None, demo.stdout.read()
        call = in_chroot(root, str(pyz), "call", "get_status", "--socket", str(sock), env=env)
        assert call.returncode == 0, call.stderr
        answer = json.loads(call.stdout)
        assert answer["success"] is True
        assert answer["data"]["version"] == VERSION
        assert answer["data"]["public_key"].startswith("ssh-ed25519 ")
    finally:
        demo.send_signal(signal.SIGTERM)
        output = demo.communicate(timeout=60)[0]
    assert demo.returncode == 0, output


@amd64(*SUPPORTED)
def test_supported_debian_loads_every_native_dependency(installed):
    _, root, inside, pyz = installed
    env = {"SHIV_ROOT": str(inside / "shiv")}
    unpack = in_chroot(root, str(pyz), "config", "validate", "--config", "/nonexistent.yaml",
                       env=env)
    assert "Traceback" not in unpack.stderr, unpack.stderr
    [site] = (root / inside.relative_to("/") / "shiv").glob("pulse-sensor-proxy_*/site-packages")
    probe = in_chroot(
        root, "python3", "-I", "-c",
        "import sys; sys.path.insert(0, sys.argv[1]); import _cffi_backend, asyncssh, yaml, "
        "cryptography; from cryptography.hazmat.bindings import _rust; "
        "from cryptography.hazmat.primitives.asymmetric import ed25519; "
        "ed25519.Ed25519PrivateKey.generate(); asyncssh.generate_private_key('ssh-ed25519'); "
        "print(asyncssh.__version__, cryptography.__version__, yaml.__with_libyaml__)",
        "/" + str(site.relative_to(root)))
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["2.24.1", "50.0.2", "True"]


@amd64("bullseye")
def test_debian_11_python_3_9_is_told_which_pythons_are_supported(installed):
    _, root, inside, pyz = installed
    result = in_chroot(root, str(pyz), "version", env={"SHIV_ROOT": str(inside / "shiv")})
    assert result.returncode == 1
    assert result.stdout == ""
    assert re.search(r"this build runs on CPython 3\.11, 3\.12, 3\.13; \S+ is Python 3\.9 ",
                     result.stderr), result.stderr
    assert not (root / inside.relative_to("/") / "shiv").exists()


def aarch64_binfmt():
    entry = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
    try:
        return entry.read_text().splitlines()[0] == "enabled"
    except OSError:
        return False


@pytest.mark.skipif(not aarch64_binfmt(),
                    reason="binfmt_misc has no enabled qemu-aarch64 entry (apt-get install "
                           "qemu-user-static binfmt-support)")
@pytest.mark.parametrize("installed", [("bookworm", "arm64", "aarch64")], indirect=True,
                         ids=["bookworm-arm64"])
def test_aarch64_pyz_runs_under_qemu(installed):
    _, root, inside, pyz = installed
    machine = in_chroot(root, "uname", "-m")
    assert machine.stdout.strip() == "aarch64"
    env = {"SHIV_ROOT": str(inside / "shiv")}
    version = in_chroot(root, str(pyz), "version", env=env)
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith(f"pulse-sensor-proxy {VERSION} (commit ")
    unpack = in_chroot(root, str(pyz), "config", "validate", "--config", "/nonexistent.yaml",
                       env=env, timeout=900)
    assert "Traceback" not in unpack.stderr, unpack.stderr
    [site] = (root / inside.relative_to("/") / "shiv").glob("pulse-sensor-proxy_*/site-packages")
    probe = in_chroot(root, "python3", "-I", "-c",
                      "import sys; sys.path.insert(0, sys.argv[1]); import _cffi_backend, yaml; "
                      "from cryptography.hazmat.bindings import _rust; "
                      "print(yaml.__with_libyaml__)", "/" + str(site.relative_to(root)),
                      timeout=600)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "True"
