"""The cluster as Proxmox serves it to the daemon under its unit: pmxcfs' /etc/pve with
`.members` 0440 root:www-data, `priv/` 0700 root and each node's `nodes/<node>/ssh_known_hosts`,
read by the service account through its group www-data only (the installer adds it).

The booted-systemd install is tests/system/test_install_systemd.py.
"""
import json
import os

from conftest import FAST_LIMITS, SERVICE_UID, temperature, wait_for

PMXCFS_GID = 4333           # www-data's part: pmxcfs gives every file that group


def pmxcfs_write(path, text, mode):
    """A file as pmxcfs presents it: owner root, group www-data, replaced whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = path.with_name(path.name + ".new")
    fresh.write_text(text)
    os.chown(fresh, 0, PMXCFS_GID)
    fresh.chmod(mode)
    fresh.replace(path)


def members(local, nodes):
    """.members as status.c writes it; a standalone host has no nodelist."""
    if not nodes:
        return json.dumps({"nodename": local, "version": 0}, indent=0)
    return json.dumps({"nodename": local, "version": 5,
                       "cluster": {"name": "lab", "version": 2, "nodes": len(nodes), "quorate": 1},
                       "nodelist": {name: {"id": i, "online": 1, "ip": ip}
                                    for i, (name, ip) in enumerate(nodes.items(), 1)}}, indent=0)


def test_node_joining_is_served_with_the_clusters_host_key(daemon_factory, ssh_nodes, base_dir):
    (node,) = ssh_nodes(1)
    pve = base_dir / "pve"
    (pve / "priv").mkdir(parents=True)
    (pve / "priv").chmod(0o700)
    (pve / "priv" / "known_hosts").write_text("")     # root-only: the daemon never reads it
    pve.chmod(0o755)
    os.chown(pve, 0, PMXCFS_GID)
    pmxcfs_write(pve / ".members", members("pve1", {}), 0o440)
    daemon = daemon_factory({"pve_dir": str(pve), "host_key_policy": "strict",
                             "rate_limit": FAST_LIMITS,
                             "ssh": {"port": node.port, "user": node.user, "connect_timeout": 3}},
                            uid=SERVICE_UID, start=False)
    daemon.groups = (PMXCFS_GID,)
    daemon.start()
    node.authorize((daemon.ssh_dir / "id_ed25519.pub").read_text().strip())
    pid = daemon.proc.pid
    assert temperature(daemon, "n1")["error"] == 'node "n1" not in allowlist (known: pve1)'

    pmxcfs_write(pve / "nodes" / "n1" / "ssh_known_hosts", f"n1 {node.host_public_key}", 0o640)
    pmxcfs_write(pve / ".members", members("pve1", {"pve1": "192.0.2.11", "n1": node.host}), 0o440)
    reply = wait_for(lambda: temperature(daemon, "n1").get("success"), timeout=60,
                     what="the joined node to be served")
    assert reply and daemon.proc.pid == pid and daemon.proc.poll() is None, "no restart"
    answer = daemon.rpc("register_nodes")
    assert answer.get("success"), answer
    listed = answer["data"]["nodes"]
    assert [(n["name"], n["ssh_ready"]) for n in listed] == [("pve1", listed[0]["ssh_ready"]),
                                                           ("n1", True)]
    assert not (daemon.base / "state" / "known_hosts").exists(), "verified, not pinned"
