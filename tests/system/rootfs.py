"""Cached Debian root filesystems: Debian 12 with systemd, for booting under systemd-nspawn,
and plain minbase trees of other releases and architectures, for running commands under chroot.

debootstrap takes about a minute, so the result is kept outside the repository and reused:
each boot gets a fresh copy of the systemd tree; the minbase trees are used in place.
"""
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

CACHE = Path(os.environ.get("PULSE_TEST_ROOTFS_CACHE", "/var/cache/pulse-sensor-proxy-tests"))
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "openssh-server", "python3")


def debootstrapped(name, suite, packages, arch="amd64", prepare=None):
    """A minbase SUITE tree for ARCH with PACKAGES, kept as CACHE/NAME and built only once.

    PREPARE(path), if given, adjusts a fresh tree before it is cached. A foreign ARCH needs
    qemu-user-static with binfmt_misc; its first build takes a few minutes.
    """
    target = CACHE / name
    if (target / "etc/os-release").exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    building = target.with_name(target.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    subprocess.run(
        ["debootstrap", f"--arch={arch}", "--variant=minbase", "--include=" + ",".join(packages),
         suite, str(building)],
        check=True, stdout=subprocess.DEVNULL)
    if prepare is not None:
        prepare(building)
    building.rename(target)
    return target


def _host_identity(root):
    # Nothing from the build host should decide the booted system's identity.
    (root / "etc/machine-id").write_text("")
    (root / "etc/hostname").write_text("pve1\n")


def cached_rootfs(extra_packages=()):
    """Return the cached rootfs directory for BASE_PACKAGES + extra_packages, building it once."""
    packages = sorted(set(BASE_PACKAGES) | set(extra_packages))
    tag = hashlib.sha256(",".join(packages).encode()).hexdigest()[:12]
    return debootstrapped(f"bookworm-systemd-{tag}", "bookworm", packages, prepare=_host_identity)


def fresh_copy(source, dest):
    """Copy the cached rootfs (owners, modes, links kept) into dest for one boot."""
    subprocess.run(["cp", "-a", "--reflink=auto", f"{source}/.", str(dest)], check=True)
