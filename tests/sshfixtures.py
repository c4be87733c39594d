"""pytest fixtures for real OpenSSH test nodes (see sshnodes.py).

Register from tests/conftest.py with `pytest_plugins = ["sshfixtures"]`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from sshnodes import Keypair, NetNamespace, NodeSet, SshLab, SshNode, Tarpit, make_keypair

OPENSSH_BANNER = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n"


@pytest.fixture(scope="session")
def ssh_lab() -> SshLab:
    """Base dir, sensors stand-in and account pool (shared by the whole run)."""
    return SshLab()


@pytest.fixture
def ssh_node(ssh_lab: SshLab) -> Iterator[SshNode]:
    """One running node; stopped and its account released afterwards."""
    with SshNode(ssh_lab) as node:
        yield node


@pytest.fixture
def ssh_nodes(ssh_lab: SshLab) -> Iterator[Callable[..., list[SshNode]]]:
    """Factory: `ssh_nodes(3)` (or `ssh_nodes(3, ipv6=True)`) starts that many nodes in parallel."""
    sets: list[NodeSet] = []

    def start(count: int, ipv6: bool = False) -> list[SshNode]:
        node_set = NodeSet(ssh_lab, count, ipv6)
        sets.append(node_set)
        return node_set.start()

    yield start
    for node_set in reversed(sets):
        node_set.close()


@pytest.fixture
def client_key(tmp_path_factory: pytest.TempPathFactory) -> Keypair:
    """A fresh ed25519 client keypair (comment pulse-sensor-proxy)."""
    return make_keypair(tmp_path_factory.mktemp("client-key"))


@pytest.fixture
def tarpit() -> Iterator[Tarpit]:
    """Accepts TCP connections and never sends a byte."""
    with Tarpit() as pit:
        yield pit


@pytest.fixture
def stalling_sshd() -> Iterator[Tarpit]:
    """Sends a valid OpenSSH banner, then stalls before key exchange."""
    with Tarpit(banner=OPENSSH_BANNER) as pit:
        yield pit


@pytest.fixture
def netns() -> Iterator[NetNamespace]:
    """A private network namespace: run a test body in it with `netns.run(fn)`."""
    with NetNamespace() as namespace:
        yield namespace
