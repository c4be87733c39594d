"""A container for the pct stand-in (tests/fixtures/pve/bin/pct): its config, and a skeleton
rootfs owned by the container's root, into which `pct exec` binds the host's /usr."""
import os
import re
from pathlib import Path


def container_root_uid(conf_text):
    """The host uid the container's root maps to: its lxc.idmap, else Proxmox's 100000."""
    found = re.search(r"^lxc\.idmap: u 0 (\d+) ", conf_text.split("\n[", 1)[0], re.M)
    return int(found.group(1)) if found else 100000


def make_container(conf_path, ct_dir, conf_text, running=True):
    """Write CONF_TEXT to CONF_PATH and a skeleton rootfs to CT_DIR/rootfs whose files belong to
    the container's root; returns the rootfs."""
    conf_path = Path(conf_path)
    conf_path.parent.mkdir(parents=True, exist_ok=True)
    conf_path.write_text(conf_text)
    rootfs = Path(ct_dir) / "rootfs"
    for directory in ("usr", "dev", "proc", "root", "run", "tmp", "etc"):
        (rootfs / directory).mkdir(parents=True, exist_ok=True)
    for link in ("bin", "lib", "lib64", "sbin"):
        os.symlink(f"usr/{link}", rootfs / link)
    # The host's /usr comes with links through /etc/alternatives (awk among them), as a Debian
    # container has them.
    (rootfs / "etc/alternatives").mkdir()
    for link in Path("/etc/alternatives").iterdir():
        if link.is_symlink():
            os.symlink(os.readlink(link), rootfs / "etc/alternatives" / link.name)
    (rootfs / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (rootfs / "etc/group").write_text("root:x:0:\n")
    (rootfs / "tmp").chmod(0o1777)
    uid = container_root_uid(conf_text)
    # /tmp stays the host root's: inside a real container its owner is the container's root,
    # whom a process there sees as uid 0, so the sticky /tmp counts as root's (the pyz unpacks
    # below it); without a user namespace that is only true of a root-owned one.
    for path in [rootfs, *rootfs.rglob("*")]:
        if path != rootfs / "tmp":
            os.lchown(path, uid, uid)
    if running:
        (Path(ct_dir) / "running").touch()
    return rootfs
