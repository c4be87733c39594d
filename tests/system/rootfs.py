"""A cached Debian 12 root filesystem with systemd, for booting under systemd-nspawn.

debootstrap takes about a minute, so the result is kept outside the repository and reused:
each test run copies it into a fresh directory and boots the copy.
"""
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

CACHE = Path(os.environ.get("PULSE_TEST_ROOTFS_CACHE", "/var/cache/pulse-sensor-proxy-tests"))
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "openssh-server", "python3")


def cached_rootfs(extra_packages=()):
    """Return the cached rootfs directory for BASE_PACKAGES + extra_packages, building it once."""
    packages = sorted(set(BASE_PACKAGES) | set(extra_packages))
    tag = hashlib.sha256(",".join(packages).encode()).hexdigest()[:12]
    target = CACHE / f"bookworm-systemd-{tag}"
    if (target / "etc/os-release").exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    building = target.with_name(target.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    subprocess.run(
        ["debootstrap", "--variant=minbase", "--include=" + ",".join(packages),
         "bookworm", str(building)],
        check=True, stdout=subprocess.DEVNULL)
    # Nothing from the build host should decide the booted system's identity.
    (building / "etc/machine-id").write_text("")
    (building / "etc/hostname").write_text("pve1\n")
    building.rename(target)
    return target


def fresh_copy(source, dest):
    """Copy the cached rootfs (owners, modes, links kept) into dest for one boot."""
    subprocess.run(["cp", "-a", "--reflink=auto", f"{source}/.", str(dest)], check=True)
