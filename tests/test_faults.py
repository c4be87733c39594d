"""Node faults and keys under fault (items 4 and 7 of the campaign in docs-reliability.md).

Node faults, against real sshd: every scenario runs in its own network namespace (a black hole
is an iptables rule there, never on the host) with a daemon, the faulty node n1 and a healthy
node n2, both connected before the fault. n1's requests must fail with the fault's own error
while n2 answers; three failures open n1's breaker and the metrics show it; once the fault is
gone n1 recovers without restarting the daemon, and the daemon's fds are back to where they
were. Each fault goes through that cycle once, ten times with `--long` (or PSP_LONG=1). How
fast each fault fails and n2's latency meanwhile are measured by bench/bench_faults.py, not
asserted here.

Keys under fault: the state directory on a small full tmpfs or a read-only bind mount, when
`serve` generates the key, when rotate-keys starts, while rotate-keys is verifying the new key
on the nodes, and when the daemon pins a new node's host key. Each must fail with an error
naming the path and the reason, keep the current key byte for byte, keep the nodes working,
and succeed once the fault is gone.
"""
import concurrent.futures
import os
import subprocess
from dataclasses import dataclass
from typing import Callable

import pytest

import pulse_sensor_proxy as psp
from conftest import SERVICE_UID, fd_count, metric_samples, on_node, temperature, wait_for
from sshnodes import DEFAULT_FIXTURE

TIMEOUTS = {"connect_timeout": 2, "command_timeout": 2}
TIMED_OUT = f"sensors -j timed out after {TIMEOUTS['command_timeout']} s"


def no_answer(node):
    return f"ssh: cannot connect to {node.host}:{node.port}: no SSH answer within {TIMEOUTS['connect_timeout']} s"


def node_metrics(daemon, name):
    samples = metric_samples(daemon)
    label = (("node", name),)
    found = {"up": samples.get(("pulse_proxy_node_up", label)),
             "breaker_open": samples.get(("pulse_proxy_node_breaker_open", label))}
    for result in ("success", "error", "breaker_open"):
        key = ("pulse_proxy_ssh_requests_total", (("node", name), ("result", result)))
        found[f"requests_{result}"] = samples.get(key, 0)
    return found


def grown(before, after):
    return {name: after[name] - before[name] for name in after if name.startswith("requests_")}


def forget_host_key(daemon, node):
    """What the HOST KEY CHANGED alarm tells the admin to do once the new key is verified."""
    known_hosts = daemon.base / "state" / "known_hosts"
    subprocess.run(["ssh-keygen", "-R", f"[{node.host}]:{node.port}", "-f", str(known_hosts)],
                   check=True, capture_output=True)


@dataclass(frozen=True)
class Fault:
    inject: Callable
    clear: Callable
    errors: Callable        # node -> the errors of the first BREAKER_THRESHOLD requests
    pending: bool           # a request waits for a timeout (rather than failing at once)


def repeat(error):
    return lambda node: [error(node) if callable(error) else error] * psp.BREAKER_THRESHOLD


def silent(node):
    """The open connection stalls (command timeout); new ones get no SSH answer."""
    return [TIMED_OUT] + [no_answer(node)] * (psp.BREAKER_THRESHOLD - 1)


FAULTS = {
    "node down": Fault(lambda node, ns: node.stop(), lambda node, ns, daemon: node.start(),
                       repeat(lambda n: f"ssh: cannot connect to {n.host}:{n.port}: Connection refused"),
                       pending=False),
    "TCP black hole": Fault(lambda node, ns: ns.black_hole(node.port),
                            lambda node, ns, daemon: ns.lift_black_hole(node.port), silent, pending=True),
    "sshd accepts then stalls": Fault(lambda node, ns: node.freeze(),
                                      lambda node, ns, daemon: node.thaw(), silent, pending=True),
    "sensors sleeps past the timeout": Fault(lambda node, ns: node.set_mode("sleep", 60),
                                             lambda node, ns, daemon: node.set_mode("fixture", DEFAULT_FIXTURE),
                                             repeat(TIMED_OUT), pending=True),
    "100 MB of output": Fault(lambda node, ns: node.set_mode("huge", 100_000_000),
                              lambda node, ns, daemon: node.set_mode("fixture", DEFAULT_FIXTURE),
                              repeat(psp.output_too_large(1024 * 1024)), pending=False),
    "non-JSON output": Fault(lambda node, ns: node.set_mode("garbage"),
                             lambda node, ns, daemon: node.set_mode("fixture", DEFAULT_FIXTURE),
                             repeat("invalid sensors output"), pending=False),
    "host key changed": Fault(lambda node, ns: node.rotate_host_key(),
                              lambda node, ns, daemon: forget_host_key(daemon, node),
                              repeat("ssh: host key changed for n1"), pending=False),
}


@pytest.mark.parametrize("name", FAULTS)
def test_node_fault_fails_alone_shows_and_recovers(name, cluster, netns, scale):
    netns.run(node_fault_scenario, FAULTS[name], scale(1, 10), cluster, netns)


def node_fault_scenario(fault, cycles, cluster, netns):
    daemon, (faulty, healthy) = cluster(2, ssh=TIMEOUTS, breaker_cooldown_seconds=1)
    assert temperature(daemon, "n1")["success"] and temperature(daemon, "n2")["success"]
    fds = fd_count(daemon.proc.pid)
    for _ in range(cycles):
        fault_cycle(fault, daemon, faulty, netns)
        wait_for(lambda: fd_count(daemon.proc.pid) <= fds, what="the daemon's fds back to the baseline")


def fault_cycle(fault, daemon, faulty, netns):
    """Inject, fail alone, open the breaker, clear, recover."""
    before = node_metrics(daemon, "n1")
    fault.inject(faulty, netns)
    expected = fault.errors(faulty)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(temperature, daemon, "n1")
        if fault.pending:
            wait_for(lambda: metric_samples(daemon)[("pulse_proxy_queue_depth", ())] == 1,
                     what="n1's request in flight")
        assert temperature(daemon, "n2")["success"], "the healthy node answers meanwhile"
        if fault.pending:
            assert not first.done(), "n1's request was still waiting when n2 answered"
        errors = [first.result(timeout=60)["error"]]
    errors += [temperature(daemon, "n1")["error"] for _ in range(psp.BREAKER_THRESHOLD - 1)]
    assert errors == [on_node("n1", error) for error in expected]
    assert temperature(daemon, "n1")["error"] == on_node(
        "n1", f"unavailable (breaker open after {psp.BREAKER_THRESHOLD} failures in a row): {expected[-1]}")
    failing = node_metrics(daemon, "n1")
    assert (failing["up"], failing["breaker_open"]) == (0, 1)
    assert grown(before, failing) == {"requests_success": 0, "requests_error": psp.BREAKER_THRESHOLD,
                                      "requests_breaker_open": 1}
    assert temperature(daemon, "n2")["success"]
    assert node_metrics(daemon, "n2")["up"] == 1 and node_metrics(daemon, "n2")["breaker_open"] == 0

    fault.clear(faulty, netns, daemon)
    wait_for(lambda: temperature(daemon, "n1")["success"], what="n1 to recover on its own")
    recovered = node_metrics(daemon, "n1")
    assert (recovered["up"], recovered["breaker_open"]) == (1, 0)
    assert grown(before, recovered)["requests_success"] == 1
    assert daemon.proc.poll() is None, "recovered without restarting the daemon"


def test_big_output_is_cut_off_on_the_node_too(cluster):
    """100 MB from sensors: the session is aborted at the cap, nothing keeps streaming."""
    daemon, (node,) = cluster(1, ssh=TIMEOUTS)
    node.set_mode("huge", 100_000_000)
    assert temperature(daemon, "n1")["error"].startswith(on_node("n1", "sensors -j output too large"))
    wait_for(lambda: not node.session_pids(), what="the node's session to end")


def test_sshd_restarted_during_a_request(cluster):
    daemon, (node, healthy) = cluster(2, ssh=TIMEOUTS)
    assert temperature(daemon, "n1")["success"]
    node.set_mode("sleep", 60)
    runs = node.exec_count()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(temperature, daemon, "n1")
        wait_for(lambda: node.exec_count() > runs, what="sensors -j running on n1")
        assert temperature(daemon, "n2")["success"], "the healthy node answers meanwhile"
        node.restart()
        assert pending.result(timeout=60)["error"] == on_node("n1", "ssh: session to n1 failed: Connection lost")
    state = node_metrics(daemon, "n1")
    assert (state["up"], state["breaker_open"], state["requests_error"]) == (0, 0, 1)
    node.set_mode("fixture", DEFAULT_FIXTURE)
    assert temperature(daemon, "n1")["success"], "the next request reconnects"
    assert node.accepted_publickey_count() == 2
    assert node_metrics(daemon, "n1")["up"] == 1


# -- keys under fault ------------------------------------------------------------------------------

NO_SPACE, READ_ONLY = os.strerror(28), os.strerror(30)


class StateDisk:
    """Puts a state directory on a small tmpfs or a read-only bind mount; unmounts at the end."""

    def __init__(self):
        self.mounts = []

    def mount(self, *args):
        subprocess.run(["mount", *args], check=True, capture_output=True)

    def small_tmpfs(self, path, size="64k"):
        """Move what `path` holds onto a new tmpfs of `size` mounted there (same owner, mode)."""
        info = path.stat()
        before = path.with_name(path.name + ".before")
        path.rename(before)
        path.mkdir()
        self.mount("-t", "tmpfs", "-o", f"size={size},mode={info.st_mode & 0o7777:o},"
                   f"uid={info.st_uid},gid={info.st_gid}", "tmpfs", str(path))
        self.mounts.append(path)
        subprocess.run(["cp", "-a", f"{before}/.", str(path)], check=True)
        subprocess.run(["rm", "-rf", str(before)], check=True)

    @staticmethod
    def fill(path):
        """Write to path/filler until the file system is full."""
        fd = os.open(path / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while True:
                os.write(fd, bytes(4096))
        except OSError as exc:
            assert exc.errno == 28, exc
        finally:
            os.close(fd)

    def bind(self, path):
        self.mount("--bind", str(path), str(path))
        self.mounts.append(path)

    def read_only(self, path, flag=True):
        self.mount("-o", f"remount,bind,{'ro' if flag else 'rw'}", str(path))

    def close(self):
        for path in reversed(self.mounts):
            subprocess.run(["umount", str(path)], check=True)


@pytest.fixture
def state_disk():
    disk = StateDisk()
    yield disk
    disk.close()


def break_state_dir(disk, state, how):
    """Make a state dir already on `disk` full or read-only."""
    if how == "full":
        disk.fill(state)
    else:
        disk.read_only(state)


def mend_state_dir(disk, state, how):
    if how == "full":
        (state / "filler").unlink()
    else:
        disk.read_only(state, False)


def prepare_state_dir(disk, state, how):
    if how == "full":
        disk.small_tmpfs(state)
    else:
        disk.bind(state)


def key_bytes(ssh_dir):
    return {name: (ssh_dir / name).read_bytes() for name in ("id_ed25519", "id_ed25519.pub")}


def files_under(path):
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)


def assert_clear_error(text, path, reason):
    assert f"{reason}: '{path}'" in text, text
    assert "Traceback" not in text, text


@pytest.mark.parametrize("how", ["full", "read-only"])
def test_serve_cannot_create_the_key(daemon_factory, state_disk, how):
    daemon = daemon_factory(uid=SERVICE_UID, start=False)
    state = daemon.base / "state"
    state.mkdir()
    os.chown(state, SERVICE_UID, SERVICE_UID)
    prepare_state_dir(state_disk, state, how)
    break_state_dir(state_disk, state, how)
    daemon.start(wait=False)
    assert daemon.proc.wait(timeout=60) == 1
    if how == "full":
        assert_clear_error(daemon.log_text(), daemon.ssh_dir / "id_ed25519", NO_SPACE)
        assert files_under(state) == ["filler"], "no partial key file"
    else:
        assert_clear_error(daemon.log_text(), daemon.ssh_dir, READ_ONLY)
        assert files_under(state) == []
    mend_state_dir(state_disk, state, how)
    daemon.start()
    assert daemon.rpc("get_status")["success"]
    assert (daemon.ssh_dir / "id_ed25519").exists()


def nodes_hold_only(lab, public):
    wanted = [lab.admin.public_line.split()[1], public.split()[1]]
    return all(sorted(lab.keys_on(node)) == sorted(wanted) for node in lab.nodes)


@pytest.mark.parametrize("how", ["full", "read-only"])
def test_rotation_cannot_generate_the_next_key(lab, state_disk, how):
    lab = lab(count=2)
    assert lab.all_temperatures_work()
    prepare_state_dir(state_disk, lab.state, how)
    before, public = key_bytes(lab.daemon.ssh_dir), lab.current_public()
    break_state_dir(state_disk, lab.state, how)
    out = lab.cli("rotate-keys")
    assert out.returncode == 1
    failed = (lab.state / "ssh.d" / "next" / "id_ed25519") if how == "full" else lab.state / "ssh.d"
    assert_clear_error(out.stderr + out.stdout, failed, NO_SPACE if how == "full" else READ_ONLY)
    assert "run `pulse-sensor-proxy rotate-keys` again" in out.stderr, out.stderr
    assert key_bytes(lab.daemon.ssh_dir) == before
    assert nodes_hold_only(lab, public), "no new key line reached the nodes"
    assert lab.all_temperatures_work()
    mend_state_dir(state_disk, lab.state, how)
    out = lab.cli("rotate-keys")
    assert out.returncode == 0, out.stdout + out.stderr
    assert lab.current_public() != public and nodes_hold_only(lab, lab.current_public())
    assert lab.all_temperatures_work()


@pytest.mark.parametrize("how", ["full", "read-only"])
def test_rotation_interrupted_by_the_state_dir(lab, state_disk, how):
    """The disk fills (or turns read-only) while the new key is being verified on n1."""
    lab = lab(count=2)
    held = lab.nodes[0]
    prepare_state_dir(state_disk, lab.state, how)
    before, public = key_bytes(lab.daemon.ssh_dir), lab.current_public()
    held.set_mode("hold")
    runs = held.exec_count()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        rotation = pool.submit(lab.cli, "rotate-keys")
        wait_for(lambda: held.exec_count() > runs, what="the new key being verified on n1")
        break_state_dir(state_disk, lab.state, how)
        held.set_mode("fixture", DEFAULT_FIXTURE)
        out = rotation.result(timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    failed = (lab.state / "ssh.d" / "rotation.json") if how == "full" else lab.state / "ssh.d"
    assert_clear_error(out.stderr + out.stdout, failed, NO_SPACE if how == "full" else READ_ONLY)
    assert "run `pulse-sensor-proxy rotate-keys` again" in out.stderr, out.stderr
    assert key_bytes(lab.daemon.ssh_dir) == before
    assert lab.all_temperatures_work()
    mend_state_dir(state_disk, lab.state, how)
    out = lab.cli("rotate-keys")
    assert out.returncode == 0 and "interrupted" in out.stdout, out.stdout + out.stderr
    assert lab.current_public() != public and nodes_hold_only(lab, lab.current_public())
    assert lab.all_temperatures_work()


@pytest.mark.parametrize("how", ["full", "read-only"])
def test_new_host_key_cannot_be_pinned(cluster, state_disk, how):
    """Trust on first use needs to write known_hosts; without it the node is not trusted."""
    daemon, (node,) = cluster(1)
    state = daemon.base / "state"
    prepare_state_dir(state_disk, state, how)
    break_state_dir(state_disk, state, how)
    reason = NO_SPACE if how == "full" else READ_ONLY
    assert temperature(daemon, "n1")["error"] == \
        on_node("n1", f"ssh: cannot pin the host key of n1 in {state / 'known_hosts'}: {reason}")
    assert node.exec_count() == 0
    mend_state_dir(state_disk, state, how)
    assert temperature(daemon, "n1")["success"]
    assert node.host_public_key in (state / "known_hosts").read_text()
    assert "Traceback" not in daemon.log_text()
