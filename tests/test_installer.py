"""install-sensor-proxy.sh: its pure text functions (the script sourced with PULSE_INSTALLER_LIB=1),
its command line, and a --dry-run that must leave a whole host tree untouched.

The real install, under a booted systemd, is tests/system/test_install_systemd.py.
"""
import fcntl
import os
import pty
import re
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pct_container import make_container

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "install-sensor-proxy.sh"
UNITS = REPO / "units"
PVE_FIXTURES = REPO / "tests/fixtures/pve"
PVE_BIN = PVE_FIXTURES / "bin"
ENTRY = "lxc.mount.entry: /run/pulse-sensor-proxy {} none bind,create=dir,optional 0 0"
DEFAULT_ENTRY = ENTRY.format("mnt/pulse-proxy")
OLD_ENTRY = ENTRY.format("run/pulse-sensor-proxy")  # hidden by the container's own /run tmpfs
PENDING_FIXTURE = REPO / "tests/fixtures/pve/lxc/105-pending-snapshot.conf"


def stand_in_pyz(dest):
    """This checkout's module at DEST, with units/ beside it as in a checkout (a pyz carries
    them inside): what the installer installs and asks in place of a built pyz."""
    shutil.copy(REPO / "pulse_sensor_proxy.py", dest)
    shutil.copytree(UNITS, Path(dest).parent / "units", dirs_exist_ok=True)


def without_traceback(result):
    """An installer run's result, after checking no Python traceback reached its output."""
    output = result.stdout + result.stderr
    assert (b"Traceback" if isinstance(output, bytes) else "Traceback") not in output, output
    return result


def lib(function, *args, stdin=None, env=None):
    """Call one function of the installer (sourced, main not run); returns the CompletedProcess."""
    return without_traceback(subprocess.run(
        ["bash", "-c", f'. "{SCRIPT}"; "$@"', "lib", function, *map(str, args)],
        env={**os.environ, "PULSE_INSTALLER_LIB": "1", **(env or {})}, input=stdin,
        capture_output=True))


def sourced(script, *args, env=None):
    """Run SCRIPT (bash) with the installer's functions defined and a WORK dir, as its steps
    run; returns the CompletedProcess (text)."""
    return without_traceback(subprocess.run(
        ["bash", "-c", f'. "{SCRIPT}"; WORK=$(mktemp -d); trap cleanup EXIT; {script}', "lib", *args],
        env={**os.environ, "PULSE_INSTALLER_LIB": "1", **(env or {})}, capture_output=True, text=True))


def edit(tmp_path, mode, text):
    conf = tmp_path / "105.conf"
    conf.write_bytes(text.encode() if isinstance(text, str) else text)
    result = lib({"add": "conf_with_mount", "remove": "conf_without_mount"}[mode], conf)
    assert result.returncode == 0, result.stderr
    return result.stdout.decode()


def installer(*args, env=None, **kwargs):
    return without_traceback(subprocess.run(["bash", str(SCRIPT), *args], capture_output=True,
                                            text=True, env={**os.environ, **(env or {})}, **kwargs))


def proxy_stub(directory, addresses=None):
    """A PROXY for the sourced installer: this checkout's module, with `host-addresses`
    answering ADDRESSES (lines) when given; returns its path."""
    path = directory / "proxy"
    directory.mkdir(exist_ok=True)
    fixed = ("" if addresses is None else
             f'[ "$1" = host-addresses ] && {{ printf "%s" "{addresses}"; exit 0; }}\n')
    path.write_text(f'#!/bin/sh\n{fixed}exec "{sys.executable}" "{REPO / "pulse_sensor_proxy.py"}" "$@"\n')
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("members, expected", [
    ("cluster.json", "pve1\npve2\npve3\n"), ("standalone.json", "pve\n"),
    (None, f"{socket.gethostname()}\n"),
])
def test_cluster_nodes_are_what_the_binary_reads(tmp_path, members, expected):
    """The installer asks the binary (`nodes`) instead of reading .members itself."""
    pve = tmp_path / "etc/pve"
    pve.mkdir(parents=True)
    if members:
        shutil.copy(PVE_FIXTURES / "members" / members, pve / ".members")
    config = tmp_path / "etc/pulse-sensor-proxy/config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(f"pve_dir: {pve}\n")
    empty = stub(tmp_path / "bin", "pvecm", "exit 1")
    result = sourced(f'PROXY="{proxy_stub(tmp_path)}"; cluster_nodes',
                     env={"PULSE_INSTALL_ROOT": str(tmp_path), "PATH": f"{empty}:{os.environ['PATH']}"})
    assert (result.returncode, result.stdout, result.stderr) == (0, expected, "")


def test_host_addresses_from_ip_in_link_order(tmp_path):
    """`host-addresses` keeps `ip`'s order (the first is what HTTPS mode advertises)."""
    bins = stub(tmp_path / "bin", "ip", f'cat "{IP_ADDR_PVE}"')
    result = subprocess.run([sys.executable, str(REPO / "pulse_sensor_proxy.py"), "host-addresses"],
                            capture_output=True, text=True,
                            env={**os.environ, "PATH": f"{bins}:{os.environ['PATH']}"})
    assert (result.returncode, result.stdout) == (0, "192.168.1.10/32\n2001:db8:1::10/128\n10.10.10.1/32\n")


def test_host_addresses_keep_only_what_other_hosts_can_see(tmp_path):
    """`host-addresses` in a network namespace with real addresses on a real link."""
    script = ("ip link set lo up; ip link add v0 type veth peer name v1; "
              "ip addr add 192.168.1.10/24 dev v0; ip -6 addr add 2001:db8:1::10/64 dev v0 nodad; "
              "ip -6 addr add fe80::10/64 dev v0 nodad; ip addr add 10.10.10.1/24 dev v0; "
              'ip link set v0 up; exec "$0" "$1" host-addresses')
    result = subprocess.run(["unshare", "-n", "sh", "-ec", script, sys.executable,
                             str(REPO / "pulse_sensor_proxy.py")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split()) == ["10.10.10.1/32", "192.168.1.10/32", "2001:db8:1::10/128"]


@pytest.mark.parametrize("where", ["echo x | { err stop; }", 'x=$(err stop)', "err stop | cat"])
def test_err_in_a_subshell_stops_the_script(where):
    result = sourced(f'set -euo pipefail; set_traps; roll_back_binary() {{ echo rolled back; }}; '
                     f'{where} || true; echo went on')
    assert result.returncode == 1
    assert result.stderr.count("error: stop\n") == 1
    assert "went on" not in result.stdout and "rolled back" in result.stdout


def test_install_units_writes_every_file_the_binary_ships(tmp_path):
    """No second copy in the script: install_units writes what `units --write` gives, every file
    of units/, and a second run changes nothing."""
    units = tmp_path / "etc/systemd/system"
    units.mkdir(parents=True)
    script = (f'PROXY="{proxy_stub(tmp_path)}"; write_file() {{ '
              f'cat >"$1"; report_changed "$5"; }}; systemctl() {{ echo "systemctl $*"; }}; '
              'install_units; echo "CHANGED=${CHANGED[*]}"')
    result = sourced(script, env={"PULSE_INSTALL_ROOT": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert {p.name: p.read_bytes() for p in units.iterdir()} == \
        {p.name: p.read_bytes() for p in UNITS.iterdir()}
    assert "systemctl daemon-reload\nCHANGED=units\n" in result.stdout


PLAIN = """arch: amd64
cores: 2
hostname: pulse
rootfs: local-lvm:vm-105-disk-0,size=8G
unprivileged: 1
"""

WITH_SNAPSHOT = """arch: amd64
hostname: pulse
mp0: /run/pulse-sensor-proxy,mp=/mnt/pulse-proxy
parent: before-upgrade
unprivileged: 1

[before-upgrade]
arch: amd64
hostname: pulse
mp0: /run/pulse-sensor-proxy,mp=/mnt/pulse-proxy
lxc.mount.entry: /run/pulse-sensor-proxy run/pulse-sensor-proxy none bind,create=dir 0 0
snaptime: 1700000000
unprivileged: 1
"""


class TestMountEntry:
    def test_added_once_at_the_end_of_the_main_section(self, tmp_path):
        assert edit(tmp_path, "add", PLAIN) == PLAIN + DEFAULT_ENTRY + "\n"

    def test_second_edit_changes_nothing(self, tmp_path):
        once = edit(tmp_path, "add", PLAIN)
        assert edit(tmp_path, "add", once) == once

    def test_duplicates_collapse_to_one(self, tmp_path):
        text = PLAIN + DEFAULT_ENTRY + "\n" + "swap: 512\n" + DEFAULT_ENTRY + "\n"
        assert edit(tmp_path, "add", text) == PLAIN + DEFAULT_ENTRY + "\nswap: 512\n"

    def test_socket_level_and_non_optional_entries_are_replaced_in_place(self, tmp_path):
        old = ("lxc.mount.entry: /run/pulse-sensor-proxy/pulse-sensor-proxy.sock "
               "run/pulse-sensor-proxy/pulse-sensor-proxy.sock none bind,create=file 0 0\n")
        assert edit(tmp_path, "add", "arch: amd64\n" + old + "unprivileged: 1\n") == \
            "arch: amd64\n" + DEFAULT_ENTRY + "\nunprivileged: 1\n"
        old = "lxc.mount.entry: /run/pulse-sensor-proxy run/pulse-sensor-proxy none bind,create=dir 0 0\n"
        assert edit(tmp_path, "add", old + PLAIN) == DEFAULT_ENTRY + "\n" + PLAIN

    def test_container_paths_under_run_move_to_mnt(self, tmp_path):
        """systemd in the container mounts a tmpfs on /run after LXC's mounts: nothing there survives."""
        for target in ("run/pulse-sensor-proxy", "/run/pulse-sensor-proxy/", "var/run/pulse-sensor-proxy", "run"):
            old = OLD_ENTRY.replace("run/pulse-sensor-proxy none", f"{target} none")
            assert edit(tmp_path, "add", PLAIN + old + "\n") == PLAIN + DEFAULT_ENTRY + "\n", target
        text = PLAIN + "mp0: /run/pulse-sensor-proxy,mp=/run/pulse-sensor-proxy\n"
        assert edit(tmp_path, "add", text) == PLAIN + DEFAULT_ENTRY + "\n"

    def test_old_and_new_entry_collapse_to_the_new_one(self, tmp_path):
        text = PLAIN + OLD_ENTRY + "\n" + DEFAULT_ENTRY + "\n"
        assert edit(tmp_path, "add", text) == PLAIN + DEFAULT_ENTRY + "\n"

    def test_pending_section_loses_our_lines_and_keeps_the_rest(self, tmp_path):
        text = PENDING_FIXTURE.read_text()
        main, pending, snapshot = text.split("\n\n")
        result = edit(tmp_path, "add", text)
        assert result == "\n\n".join([
            main.replace(OLD_ENTRY, DEFAULT_ENTRY),
            "[pve:pending]\ndelete: swap\nmemory: 2048",
            snapshot])
        assert edit(tmp_path, "add", result) == result

    def test_uninstall_cleans_the_pending_section_too(self, tmp_path):
        text = PENDING_FIXTURE.read_text()
        main, _, snapshot = text.split("\n\n")
        assert edit(tmp_path, "remove", text) == "\n\n".join([
            main.replace(OLD_ENTRY + "\n", ""),
            "[pve:pending]\ndelete: swap\nmemory: 2048",
            snapshot])

    def test_report_names_pending_lines_it_drops(self, tmp_path):
        report = lib("conf_legacy_lines", PENDING_FIXTURE).stdout.decode()
        assert report == (OLD_ENTRY + " -> " + DEFAULT_ENTRY + "\n" +
                          "[pve:pending] mp1: /run/pulse-sensor-proxy/pulse-sensor-proxy.sock,"
                          "mp=/mnt/pulse-proxy/pulse-sensor-proxy.sock,ro=1 -> (removed)\n")

    def test_mount_point_becomes_mount_entry_keeping_its_container_path(self, tmp_path):
        text = PLAIN.replace("hostname: pulse\n", "hostname: pulse\nmp0: /run/pulse-sensor-proxy,mp=/mnt/pulse-proxy\n")
        result = edit(tmp_path, "add", text)
        assert result == PLAIN.replace("hostname: pulse\n", "hostname: pulse\n" + ENTRY.format("mnt/pulse-proxy") + "\n")
        assert "mp0:" not in result

    def test_socket_level_mount_point_keeps_its_directory(self, tmp_path):
        text = PLAIN + "mp1: /run/pulse-sensor-proxy/pulse-sensor-proxy.sock,mp=/mnt/pulse-proxy/pulse-sensor-proxy.sock,ro=1\n"
        assert edit(tmp_path, "add", text) == PLAIN + ENTRY.format("mnt/pulse-proxy") + "\n"

    def test_other_mount_points_and_entries_are_kept(self, tmp_path):
        text = PLAIN + "mp0: /srv/data,mp=/data\nlxc.mount.entry: /dev/dri dev/dri none bind,optional,create=dir 0 0\n"
        assert edit(tmp_path, "add", text) == text + DEFAULT_ENTRY + "\n"

    def test_snapshot_sections_are_untouched(self, tmp_path):
        result = edit(tmp_path, "add", WITH_SNAPSHOT)
        main, snapshot = result.split("\n[before-upgrade]\n")
        assert snapshot == WITH_SNAPSHOT.split("\n[before-upgrade]\n")[1]
        assert main == ("arch: amd64\nhostname: pulse\n" + ENTRY.format("mnt/pulse-proxy") +
                        "\nparent: before-upgrade\nunprivileged: 1\n")

    def test_entry_goes_before_the_blank_line_that_ends_the_main_section(self, tmp_path):
        text = WITH_SNAPSHOT.replace("mp0: /run/pulse-sensor-proxy,mp=/mnt/pulse-proxy\nparent", "parent", 1)
        result = edit(tmp_path, "add", text)
        assert "unprivileged: 1\n" + DEFAULT_ENTRY + "\n\n[before-upgrade]\n" in result

    def test_crlf_and_missing_final_newline_are_preserved(self, tmp_path):
        text = PLAIN.replace("\n", "\r\n").rstrip("\r\n")
        result = edit(tmp_path, "add", text)
        assert result == text + "\r\n" + DEFAULT_ENTRY
        assert edit(tmp_path, "add", result) == result

    def test_no_final_newline_with_snapshot(self, tmp_path):
        text = WITH_SNAPSHOT.rstrip("\n")
        assert edit(tmp_path, "add", text).endswith("unprivileged: 1")

    def test_uninstall_removes_only_our_lines(self, tmp_path):
        installed = edit(tmp_path, "add", WITH_SNAPSHOT)
        removed = edit(tmp_path, "remove", installed)
        assert removed == WITH_SNAPSHOT.replace("mp0: /run/pulse-sensor-proxy,mp=/mnt/pulse-proxy\n", "", 1)
        assert edit(tmp_path, "remove", PLAIN) == PLAIN

    def test_legacy_report_names_what_is_replaced(self, tmp_path):
        conf = tmp_path / "105.conf"
        conf.write_text(WITH_SNAPSHOT)
        report = lib("conf_legacy_lines", conf).stdout.decode()
        assert report == ("mp0: /run/pulse-sensor-proxy,mp=/mnt/pulse-proxy -> " +
                          ENTRY.format("mnt/pulse-proxy") + "\n")


class TestContainerChecks:
    def conf(self, tmp_path, text):
        conf = tmp_path / "105.conf"
        conf.write_text(text)
        return conf

    def test_unprivileged_is_recognised_in_the_main_section_only(self, tmp_path):
        assert lib("conf_is_unprivileged", self.conf(tmp_path, PLAIN)).returncode == 0
        privileged = "arch: amd64\n\n[snap]\nunprivileged: 1\n"
        assert lib("conf_is_unprivileged", self.conf(tmp_path, privileged)).returncode == 1
        assert lib("conf_is_unprivileged", self.conf(tmp_path, "unprivileged: 0\n")).returncode == 1

    def test_default_uid_range(self, tmp_path):
        assert lib("conf_uid_ranges", self.conf(tmp_path, PLAIN)).stdout == b"100000-165535\n"

    def test_single_idmap(self, tmp_path):
        text = PLAIN + "lxc.idmap: u 0 100000 65536\nlxc.idmap: g 0 100000 65536\n"
        assert lib("conf_uid_ranges", self.conf(tmp_path, text)).stdout == b"100000-165535\n"

    def test_custom_multi_line_idmap(self, tmp_path):
        text = PLAIN + ("lxc.idmap: u 0 200000 1000\nlxc.idmap: g 0 200000 1000\n"
                        "lxc.idmap: u 1000 1000 1\nlxc.idmap: g 1000 1000 1\n"
                        "lxc.idmap: u 1001 201001 64535\nlxc.idmap: g 1001 201001 64535\n")
        assert lib("conf_uid_ranges", self.conf(tmp_path, text)).stdout == \
            b"200000-200999\n1000-1000\n201001-265535\n"

    def test_mapping_to_host_root_is_refused(self, tmp_path):
        text = PLAIN + "lxc.idmap: u 0 0 1\nlxc.idmap: u 1 100001 65535\n"
        assert lib("conf_uid_ranges", self.conf(tmp_path, text)).returncode == 1


class TestCommandLine:
    @pytest.mark.parametrize("args, message", [
        (["--ctid", "abc"], "--ctid needs container IDs"),
        (["--ctid", "42"], "--ctid needs container IDs"),
        (["--ctid"], "--ctid needs a value"),
        (["--ctid", "105", "--standalone"], "exclude each other"),
        (["--purge"], "--purge goes with --uninstall"),
        (["--uninstall", "--ctid", "105"], "--uninstall takes no --ctid"),
        (["--standalone", "--version", "1.0"], "--version and --url go together"),
        (["--standalone", "--pyz", "x.pyz", "--url", "http://127.0.0.1/"], "exclude each other"),
        (["--standalone", "--allowed-subnets", "10.0.0.0/8,bad net"], "--allowed-subnets needs CIDRs"),
        (["--bogus"], "unknown argument '--bogus'"),
        (["--standalone", "--pulse-server", "http://pulse:7655"], "go with --http-mode"),
        (["--http-mode", "--http-addr", "pve1:8443"], "--http-addr needs IP:PORT"),
        (["--http-mode", "--proxy-url", "http://10.0.0.1:8443"], "--proxy-url needs https://"),
        (["--http-mode", "--pulse-server", "pulse:7655"], "--pulse-server needs http(s)://"),
        (["--http-mode", "--http-allowed-clients", "10.0.0.0/8,bad net"], "needs CIDRs"),
        (["--uninstall", "--http-mode"], "--uninstall takes no --http-mode"),
        (["--standalone", "--allow-cleanup"], "--allow-cleanup goes with --ctid"),
        (["--uninstall", "--allow-cleanup"], "--allow-cleanup goes with --ctid"),
        ([], "nothing to do"),
    ])
    def test_usage_errors_exit_2(self, args, message):
        result = installer(*args, stdin=subprocess.DEVNULL)
        assert result.returncode == 2
        assert message in result.stderr

    def test_help_is_the_manual(self):
        result = installer("--help")
        assert result.returncode == 0
        for flag in ("--ctid", "--standalone", "--pyz", "--version", "--url", "--allowed-subnets",
                     "--enable-rotation-timer", "--no-restart", "--uninstall", "--purge",
                     "--dry-run", "--quiet", "--help", "--http-mode", "--http-addr",
                     "--pulse-server", "--proxy-url", "--http-allowed-clients", "Firewall",
                     "--allow-cleanup"):
            assert flag in result.stdout
        assert "a container allowed this can switch any node's temperatures off" in \
            " ".join(result.stdout.split())
        assert DEFAULT_ENTRY in result.stdout

    def test_comma_and_repeated_ctids(self):
        result = subprocess.run(
            ["bash", "-c", f'. "{SCRIPT}"; parse_args --ctid 105,106 --ctid 107 --ctid 105; echo "${{CTIDS[*]}} $ACTION"'],
            env={**os.environ, "PULSE_INSTALLER_LIB": "1"}, capture_output=True, text=True)
        assert result.stdout == "105 106 107 install\n"

    def test_menu_on_a_terminal(self):
        pid, fd = pty.fork()
        if pid == 0:
            os.execvp("bash", ["bash", str(SCRIPT)])
        os.write(fd, b"3\n")
        output = b""
        while True:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
        _, status = os.waitpid(pid, 0)
        assert b"[1] Install or update  [2] Remove  [3] Cancel" in output
        assert b"Cancelled: nothing changed." in output
        assert os.waitstatus_to_exitcode(status) == 0


def globals_of_block(heading):
    """The names the installer assigns at top level in the block under the comment HEADING."""
    block = SCRIPT.read_text().split(f"\n{heading}", 1)[1].split("\n\n", 1)[0]
    return [m.group(1) for m in re.finditer(r"^(?:readonly |declare -A )?([A-Z_]+)=", block, re.M)]


class TestGlobals:
    """State lives in few, named places: the paths and the options are readonly (the options
    once parse_args has set them), the rest is the run state block, each variable in it saying
    who sets it."""

    def test_paths_and_options_are_readonly_once_parsed(self):
        options, paths = globals_of_block("# Options:"), globals_of_block("# Every path on the host")
        assert "ACTION" in options and "HTTP_CLIENTS" in options and "CONFIG" in paths
        result = subprocess.run(
            ["bash", "-c", f'. "{SCRIPT}"; parse_args --standalone; freeze_options; '
                           f'declare -p {" ".join(options + paths)}; DRY_RUN=1; echo went on'],
            env={**os.environ, "PULSE_INSTALLER_LIB": "1"}, capture_output=True, text=True)
        for name in options + paths:
            assert re.search(rf"^declare -[aA]?r {name}=", result.stdout, re.M), name
        assert "went on" not in result.stdout and "DRY_RUN: readonly variable" in result.stderr

    def test_every_other_global_is_run_state_or_readonly(self):
        run_state = globals_of_block("# Run state:")
        assert len(run_state) <= 15, run_state
        top_level = re.findall(r"^(?:declare -A )?([A-Z_]+)=", SCRIPT.read_text(), re.M)
        assert sorted(top_level) == sorted(globals_of_block("# Options:") + run_state)
        block = SCRIPT.read_text().split("\n# Run state:", 1)[1].split("\n\n", 1)[0]
        for line in block.splitlines()[1:]:
            assert re.match(r"^(declare -A )?[A-Z_]+=\S*\s+# [a-z_]+", line), f"who sets it: {line}"

    def test_min_python_is_the_pyz_launchers_lowest(self):
        launcher = (REPO / "packaging/pyz_main.py").read_text()
        lowest = re.search(r"^PYTHONS = \(\((\d+), (\d+)\)", launcher, re.M).groups()
        assert re.search(r"^readonly MIN_PYTHON=(\S+)", SCRIPT.read_text(), re.M).group(1) == ".".join(lowest)


IP_ADDR_PVE = REPO / "tests/fixtures/net/ip-addr-pve.json"


def stub(directory, name, body):
    """An executable NAME in DIRECTORY that runs the shell BODY (put first on PATH)."""
    directory.mkdir(exist_ok=True)
    path = directory / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return directory


def choose_subnets(tmp_path, config_text, *, pve=1, given=(), addresses=""):
    """choose_source_subnets on a rendered config, the binary finding ADDRESSES; returns the
    CompletedProcess, whose stdout ends with the chosen subnets (WORK/subnets) after a "--" line."""
    config = tmp_path / "rendered.yaml"
    config.write_text(config_text)
    script = (f'PROXY="{proxy_stub(tmp_path / "bin", addresses)}"; IS_PVE={pve}; '
              f'SUBNETS=({" ".join(given)}); choose_source_subnets "{config}"; echo --; '
              'mapfile -t chosen <"$WORK/subnets"; printf "%s\\n" "${chosen[@]}"')
    return sourced(script)


class TestSourceSubnets:
    """The config always ends with explicit allowed_source_subnets: the daemon, sandboxed
    without /proc/net, cannot find this host's addresses, and keys push writes them into
    from="..." on every node. The binary (`host-addresses`, `config get`) answers both questions."""

    ADDRESSES = "192.168.1.10/32\n2001:db8:1::10/128\n10.10.10.1/32\n"

    def test_this_hosts_addresses_when_the_config_has_none(self, tmp_path):
        result = choose_subnets(tmp_path, "log_level: info\n", addresses=self.ADDRESSES)
        assert result.returncode == 0, result.stderr
        chosen = result.stdout.split("--\n")[1].split()
        assert chosen == ["192.168.1.10/32", "2001:db8:1::10/128", "10.10.10.1/32"]
        assert "this host's addresses 192.168.1.10/32 2001:db8:1::10/128 10.10.10.1/32" in result.stdout

    def test_subnets_in_the_config_are_kept_as_they_are(self, tmp_path):
        result = choose_subnets(tmp_path, "allowed_source_subnets:\n- 10.0.0.0/24\nlog_level: info\n",
                                addresses=self.ADDRESSES)
        assert result.stdout == "--\n\n"

    def test_allowed_subnets_flag_wins(self, tmp_path):
        result = choose_subnets(tmp_path, "log_level: info\n", given=("10.0.0.0/24",))
        assert result.stdout.split("--\n")[1].split() == ["10.0.0.0/24"]
        assert result.stderr == ""

    def test_no_address_found_on_proxmox_is_an_error(self, tmp_path):
        result = choose_subnets(tmp_path, "allowed_source_subnets: []\n")
        assert result.returncode == 1
        assert "give --allowed-subnets" in result.stderr

    def test_no_address_found_standalone_is_fine(self, tmp_path):
        result = choose_subnets(tmp_path, "log_level: info\n", pve=0)
        assert result.returncode == 0 and result.stdout == "--\n\n"


def test_shellcheck_clean():
    scripts = [SCRIPT, PVE_BIN / "pct", PVE_BIN / "pvecm", *sorted((REPO / "tests/fixtures/original/bin").glob("*.sh"))]
    result = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_service_unit_exposure_is_at_most_1_2():
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--threshold=12",
         str(UNITS / "pulse-sensor-proxy.service")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-600:]
    assert "Overall exposure level for pulse-sensor-proxy.service: 1.2" in result.stdout or \
        "Overall exposure level for pulse-sensor-proxy.service: 1.1" in result.stdout


def snapshot_tree(root):
    return {str(path.relative_to(root)): (path.read_bytes() if path.is_file() else None,
                                         path.lstat().st_mtime_ns, path.lstat().st_mode)
            for path in sorted(root.rglob("*"))}


def host_tree(tmp_path):
    """A host tree with Proxmox, container 105 (unprivileged, snapshot, legacy mp0), container 107
    (privileged) and an existing config; returns (root, env for the installer and the pct stand-in)."""
    root = tmp_path / "root"
    for directory in ("run/systemd/system", "etc/pve/lxc", "etc/pulse-sensor-proxy", "usr/local/bin"):
        (root / directory).mkdir(parents=True)
    (root / "etc/pve/lxc/105.conf").write_text(WITH_SNAPSHOT)
    (root / "etc/pve/lxc/107.conf").write_text(PLAIN.replace("unprivileged: 1\n", ""))
    (root / "etc/pulse-sensor-proxy/config.yaml").write_text("log_level: debug\n")
    (root / "etc/pve/.members").write_text(
        '{"nodename": "pve1", "version": 3, "nodelist": {"pve1": {"id": 1, "online": 1, "ip": "127.0.0.1"}}}')
    cts = tmp_path / "pct"
    (cts / "105").mkdir(parents=True)
    bins = stub(tmp_path / "bin", "ip", f'cat "{IP_ADDR_PVE}"')
    env = {"PULSE_INSTALL_ROOT": str(root), "PCT_SHIM_PVE_DIR": str(root / "etc/pve"),
           "PCT_SHIM_DIR": str(cts),
           "PATH": f"{bins}:{PVE_BIN}:{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return root, env


def test_privileged_container_is_refused_before_any_change(tmp_path):
    root, env = host_tree(tmp_path)
    before = snapshot_tree(root)
    result = installer("--ctid", "105,107", "--pyz", str(REPO / "pulse_sensor_proxy.py"), env=env)
    assert result.returncode == 1
    assert "container 107 is privileged" in result.stderr
    assert "unprivileged" in result.stderr
    assert snapshot_tree(root) == before


def test_dry_run_changes_nothing(tmp_path):
    """--dry-run reports the changes it would make and leaves every byte and mtime as it was."""
    root, env = host_tree(tmp_path)
    pyz = tmp_path / "pulse-sensor-proxy.pyz"
    stand_in_pyz(pyz)
    before = snapshot_tree(root)
    result = installer("--dry-run", "--ctid", "105", "--pyz", str(pyz), env=env)
    assert snapshot_tree(root) == before
    assert "would    binary" in result.stdout
    assert "would    container 105: mount entry" in result.stdout
    assert "mp0: /run/pulse-sensor-proxy,mp=/mnt/pulse-proxy -> " in result.stdout
    assert "would run: systemctl enable" in result.stdout
    assert "+allowed_source_subnets:\n+- 192.168.1.10/32\n+- 2001:db8:1::10/128\n+- 10.10.10.1/32\n" in result.stdout
    assert "nothing was changed" in result.stdout
    assert not (tmp_path / "pct/pct.log").exists()


def test_http_mode_dry_run_changes_nothing_and_registers_nowhere(tmp_path):
    root, env = host_tree(tmp_path)
    pyz = tmp_path / "pulse-sensor-proxy.pyz"
    stand_in_pyz(pyz)
    before = snapshot_tree(root)
    # a port nothing listens on: a registration attempt would fail the run
    result = installer("--dry-run", "--http-mode", "--pulse-server", "http://127.0.0.1:9",
                       "--pyz", str(pyz), env=env)
    assert result.returncode == 0, result.stderr
    assert snapshot_tree(root) == before
    conf = root / "etc/pulse-sensor-proxy"
    assert f"would    TLS certificate {conf}/tls/server.crt" in result.stdout
    assert "would    registered with http://127.0.0.1:9 as https://192.168.1.10:8443" in result.stdout
    assert "+http_enabled: true\n" in result.stdout
    assert f"+http_auth_token_file: {conf}/http-token\n" in result.stdout
    assert "+http_listen_addr: 0.0.0.0:8443\n" in result.stdout


class TestContainerConfigLock:
    """Config edits hold pct's own lock: /run/lock/lxc/pve-config-<CTID>.lock, an exclusive
    flock (pve-container src/PVE/LXC/Config.pm config_file_lock, PVE::AbstractConfig lock_config)."""

    def lock_path(self, root):
        return root / "run/lock/lxc/pve-config-105.lock"

    def call(self, root, *command):
        return sourced('with_ct_lock 105 "$@"', *command, env={"PULSE_INSTALL_ROOT": str(root)})

    def test_the_edit_runs_holding_the_lock(self, tmp_path):
        lock = self.lock_path(tmp_path)
        result = self.call(tmp_path, "flock", "--nonblock", "--conflict-exit-code", "7", str(lock), "true")
        assert result.returncode == 7, result.stderr

    def test_a_held_lock_stops_the_edit_with_a_clear_error(self, tmp_path):
        lock = self.lock_path(tmp_path)
        lock.parent.mkdir(parents=True)
        marker = tmp_path / "edited"
        with open(lock, "w") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            result = self.call(tmp_path, "touch", str(marker))
        assert result.returncode == 1
        assert "container 105: its config is locked by another Proxmox task" in result.stderr
        assert not marker.exists()


CT_TMPFILES = "/etc/tmpfiles.d/pulse-sensor-proxy.conf"
CT_DROPIN = "/etc/systemd/system/pulse.service.d/10-pulse-sensor-proxy.conf"
MARK = "# Written by install-sensor-proxy.sh (pulse-sensor-proxy); its --uninstall removes this file.\n"
TMPFILES_TEXT = (MARK + "# The proxy's socket is mounted at /mnt/pulse-proxy, outside the tmpfs the container's systemd puts\n"
                 "# on /run; Pulse releases that look for it only under /run find it through this link.\n"
                 "L /run/pulse-sensor-proxy - - - - /mnt/pulse-proxy\n")
DROPIN_TEXT = MARK + "[Service]\nEnvironment=PULSE_SENSOR_PROXY_SOCKET=/mnt/pulse-proxy/pulse-sensor-proxy.sock\n"
# The unit Pulse's install.sh writes (v5.0.17, create_systemd_service), shortened.
PULSE_UNIT = """[Unit]
Description=Pulse Monitoring Server
After=network.target

[Service]
Type=simple
User=pulse
ExecStart=/opt/pulse/bin/pulse
Environment="PULSE_DATA_DIR=/etc/pulse"
EnvironmentFile=-/etc/pulse/.env

[Install]
WantedBy=multi-user.target
"""


class TestFilesInsideTheContainer:
    """A running container (108, the pct stand-in's chroot as host uid 100000) gets the link from
    /run at boot and, where Pulse's service is installed, its socket path, through pct push."""

    @pytest.fixture
    def ct(self, tmp_path):
        root, env = host_tree(tmp_path)
        env["PCT_SHIM_LOCK_DIR"] = str(root / "run/lock/lxc")
        rootfs = make_container(root / "etc/pve/lxc/108.conf", tmp_path / "pct/108", PLAIN + DEFAULT_ENTRY + "\n")
        unit = rootfs / "etc/systemd/system/pulse.service"
        unit.parent.mkdir(parents=True)
        unit.write_text(PULSE_UNIT)
        for path in (unit.parent.parent, unit.parent, unit):
            os.lchown(path, 100000, 100000)
        return rootfs, env, tmp_path / "pct/pct.log"

    def ensure(self, env, dry_run=0):
        return sourced(f'DRY_RUN={dry_run}; ensure_ct_files 108; summary; printf "note: %s\\n" "${{NOTES[@]}}"',
                       env=env)

    def test_written_as_the_containers_root_and_listed(self, ct):
        rootfs, env, log = ct
        result = self.ensure(env)
        assert result.returncode == 0, result.stderr
        for path, text in ((CT_TMPFILES, TMPFILES_TEXT), (CT_DROPIN, DROPIN_TEXT)):
            file = rootfs / path.lstrip("/")
            assert file.read_text() == text
            assert (file.stat().st_uid, file.stat().st_mode & 0o7777) == (100000, 0o644)
            assert f"push 108 {path}" in log.read_text()
        assert (f"changed  container 108: link /run/pulse-sensor-proxy -> /mnt/pulse-proxy at boot: "
                f"{CT_TMPFILES}\n") in result.stdout
        assert f"changed  container 108: PULSE_SENSOR_PROXY_SOCKET for pulse.service: {CT_DROPIN}\n" in result.stdout
        assert (f"files inside containers (--uninstall removes them): 108:{CT_TMPFILES} 108:{CT_DROPIN}\n"
                in result.stdout)

    def test_second_run_changes_nothing(self, ct):
        rootfs, env, log = ct
        self.ensure(env)
        pushed = log.read_text()
        result = self.ensure(env)
        assert "changed" not in result.stdout
        assert f"ok       container 108: PULSE_SENSOR_PROXY_SOCKET for pulse.service: {CT_DROPIN}\n" in result.stdout
        assert f"files inside containers (--uninstall removes them): 108:{CT_TMPFILES} 108:{CT_DROPIN}\n" in result.stdout
        assert log.read_text() == pushed

    def test_an_edited_file_of_ours_is_put_back(self, ct):
        rootfs, env, log = ct
        self.ensure(env)
        (rootfs / CT_TMPFILES.lstrip("/")).write_text(MARK + "L /run/pulse-sensor-proxy - - - - /elsewhere\n")
        result = self.ensure(env)
        assert f"changed  container 108: link /run/pulse-sensor-proxy -> /mnt/pulse-proxy at boot:" in result.stdout
        assert (rootfs / CT_TMPFILES.lstrip("/")).read_text() == TMPFILES_TEXT

    def test_no_pulse_service_no_drop_in(self, ct):
        rootfs, env, _ = ct
        (rootfs / "etc/systemd/system/pulse.service").unlink()
        result = self.ensure(env)
        assert (rootfs / CT_TMPFILES.lstrip("/")).exists()
        assert not (rootfs / "etc/systemd/system/pulse.service.d").exists()
        assert "PULSE_SENSOR_PROXY_SOCKET" not in result.stdout

    def test_dry_run_prints_and_changes_nothing(self, ct):
        rootfs, env, log = ct
        before = snapshot_tree(rootfs)
        result = self.ensure(env, dry_run=1)
        assert result.returncode == 0, result.stderr
        assert snapshot_tree(rootfs) == before
        assert not log.exists()
        assert f"would    container 108: link /run/pulse-sensor-proxy -> /mnt/pulse-proxy at boot: {CT_TMPFILES}" in result.stdout
        assert "would run: pct push 108 " in result.stdout

    @pytest.mark.parametrize("hostile", ["link to the target", "link to its directory", "foreign file", "directory"])
    def test_what_is_in_the_way_is_left_alone(self, ct, hostile):
        """The container's root may plant anything: nothing of it is followed, replaced or removed."""
        rootfs, env, _ = ct
        target = rootfs / CT_DROPIN.lstrip("/")
        victim = rootfs / "etc/passwd"
        victim_text = victim.read_text()
        if hostile == "link to the target":
            target.parent.mkdir(parents=True)
            target.symlink_to("/etc/passwd")
        elif hostile == "link to its directory":
            target.parent.symlink_to("/etc")
            target = rootfs / "etc" / target.name
        elif hostile == "foreign file":
            target.parent.mkdir(parents=True)
            target.write_text("[Service]\nEnvironment=PULSE_SENSOR_PROXY_SOCKET=/run/x.sock\n")
        else:
            target.mkdir(parents=True)
        before = snapshot_tree(rootfs / "etc/systemd")
        result = self.ensure(env)
        assert result.returncode == 0, result.stderr
        assert f"warning: container 108: {CT_DROPIN} is in the way" in result.stderr
        assert snapshot_tree(rootfs / "etc/systemd") == before
        assert victim.read_text() == victim_text
        assert not (rootfs / "etc/10-pulse-sensor-proxy.conf").exists()
        assert f"108:{CT_DROPIN}" not in result.stdout
        assert (rootfs / CT_TMPFILES.lstrip("/")).read_text() == TMPFILES_TEXT

    def test_a_stopped_container_is_left_for_the_next_run(self, ct):
        rootfs, env, log = ct
        (rootfs.parent / "running").unlink()
        result = self.ensure(env)
        assert result.returncode == 0, result.stderr
        assert not (rootfs / "etc/tmpfiles.d").exists()
        assert f"note: container 108 is stopped: {CT_TMPFILES} and Pulse's drop-in go into it" in result.stdout
        # as pct itself answers (pve-container src/PVE/CLI/pct.pm: exec, push)
        source = rootfs.parent / "file"
        source.write_text("x")
        for command, message in ((["exec", "108", "--", "true"], "container '108' not running!"),
                                 (["push", "108", str(source), "/x"], "can only push files to a running CT")):
            refused = subprocess.run([str(PVE_BIN / "pct"), *command], env={**os.environ, **env},
                                     capture_output=True, text=True)
            assert (refused.returncode, refused.stderr) == (1, message + "\n")

    def test_uninstall_removes_only_ours(self, ct):
        rootfs, env, _ = ct
        self.ensure(env)
        other = rootfs / "etc/systemd/system/pulse.service.d/20-admin.conf"
        other.write_text("[Service]\nNice=5\n")
        link = rootfs / "run/pulse-sensor-proxy"
        link.symlink_to("/mnt/pulse-proxy")  # as systemd-tmpfiles makes it at boot
        result = sourced("remove_ct_files 108 /mnt/pulse-proxy", env=env)
        assert result.returncode == 0, result.stderr
        assert not (rootfs / CT_TMPFILES.lstrip("/")).exists()
        assert not (rootfs / CT_DROPIN.lstrip("/")).exists()
        assert not link.is_symlink()
        assert other.read_text() == "[Service]\nNice=5\n"
        assert f"changed  container 108: {CT_DROPIN} removed" in result.stdout
        assert "changed  container 108: link /run/pulse-sensor-proxy removed" in result.stdout
        again = sourced("remove_ct_files 108 /mnt/pulse-proxy", env=env)
        assert "changed" not in again.stdout

    def test_uninstall_keeps_what_is_not_ours(self, ct):
        rootfs, env, _ = ct
        foreign = rootfs / CT_TMPFILES.lstrip("/")
        foreign.parent.mkdir(parents=True)
        foreign.write_text("L /run/pulse-sensor-proxy - - - - /mnt/pulse-proxy\n")
        link = rootfs / "run/pulse-sensor-proxy"
        link.symlink_to("/srv/elsewhere")
        result = sourced("remove_ct_files 108 /mnt/pulse-proxy", env=env)
        assert result.returncode == 0 and "changed" not in result.stdout
        assert foreign.exists() and link.is_symlink()


class TestWhatPulseSeesInside:
    """After wiring, the installer asks the socket from inside the container (108, as its root)
    at each path Pulse's client tries, in its order, and says which one Pulse will use: the
    real daemon behind a bind mount at /mnt/pulse-proxy, as the container's mount entry makes it."""

    @pytest.fixture
    def ct(self, tmp_path, daemon_factory):
        daemon = daemon_factory({"allowed_peers": [{"uids": "100000-165535"}]})
        root, env = host_tree(tmp_path)
        entry = f"lxc.mount.entry: {daemon.socket.parent} mnt/pulse-proxy none bind,create=dir,optional 0 0\n"
        rootfs = make_container(root / "etc/pve/lxc/108.conf", tmp_path / "pct/108", PLAIN + entry)
        (rootfs / "mnt").mkdir()
        os.lchown(rootfs / "mnt", 100000, 100000)
        return rootfs, env, daemon

    def check(self, env):
        result = sourced('check_container 108; printf "note: %s\\n" "${NOTES[@]}"', env=env)
        assert result.returncode == 0, result.stderr
        return result

    def add_pulse_service(self, rootfs, env_file_line=None):
        for directory in ("etc/systemd", "etc/systemd/system", "etc/pulse"):
            (rootfs / directory).mkdir(exist_ok=True)
            os.lchown(rootfs / directory, 100000, 100000)
        (rootfs / "etc/systemd/system/pulse.service").write_text(PULSE_UNIT)
        (rootfs / "etc/systemd/system/pulse.service.d").mkdir()
        (rootfs / CT_DROPIN.lstrip("/")).write_text(DROPIN_TEXT)  # as TestFilesInsideTheContainer shows
        if env_file_line:
            (rootfs / "etc/pulse/.env").write_text(f"PULSE_DATA_DIR=/etc/pulse\n{env_file_line}\n")

    def test_the_mount_outside_run_is_what_pulse_finds(self, ct):
        rootfs, env, _ = ct
        result = self.check(env)
        assert "container 108: /run/pulse-sensor-proxy/pulse-sensor-proxy.sock: no socket\n" in result.stdout
        assert ("ok       container 108: /mnt/pulse-proxy/pulse-sensor-proxy.sock: answers get_status "
                "(asked with python3)\n") in result.stdout
        assert ("ok       container 108: Pulse will use /mnt/pulse-proxy/pulse-sensor-proxy.sock "
                "(the first of Pulse's paths there)\n") in result.stdout
        assert result.stderr == ""

    def test_the_link_from_run_comes_first(self, ct):
        rootfs, env, _ = ct
        (rootfs / "run/pulse-sensor-proxy").symlink_to("/mnt/pulse-proxy")  # what tmpfiles.d makes
        result = self.check(env)
        assert ("ok       container 108: /run/pulse-sensor-proxy/pulse-sensor-proxy.sock: answers get_status "
                "(asked with python3)\n") in result.stdout
        assert ("ok       container 108: Pulse will use /run/pulse-sensor-proxy/pulse-sensor-proxy.sock "
                "(the first of Pulse's paths there)\n") in result.stdout

    def test_the_variable_of_pulses_service_comes_before_both(self, ct):
        rootfs, env, _ = ct
        self.add_pulse_service(rootfs)
        result = self.check(env)
        assert ("ok       container 108: $PULSE_SENSOR_PROXY_SOCKET of pulse.service, "
                "/mnt/pulse-proxy/pulse-sensor-proxy.sock: answers get_status (asked with python3)\n") in result.stdout
        assert ("ok       container 108: Pulse will use /mnt/pulse-proxy/pulse-sensor-proxy.sock "
                "(pulse.service's PULSE_SENSOR_PROXY_SOCKET)\n") in result.stdout

    def test_pulses_env_file_overrides_the_drop_in(self, ct):
        """systemd.exec(5): variables read from EnvironmentFile= override Environment=."""
        rootfs, env, _ = ct
        self.add_pulse_service(rootfs, "PULSE_SENSOR_PROXY_SOCKET=/var/lib/old/proxy.sock")
        result = self.check(env)
        assert ("warning: container 108: Pulse will use /var/lib/old/proxy.sock "
                "(pulse.service's PULSE_SENSOR_PROXY_SOCKET): no socket\n") in result.stderr
        assert "note: container 108: Pulse does not reach the proxy" in result.stdout

    def test_a_value_that_is_not_a_plain_path_is_not_used(self, ct):
        rootfs, env, _ = ct
        self.add_pulse_service(rootfs, 'PULSE_SENSOR_PROXY_SOCKET="/mnt/$(reboot)"')
        result = self.check(env)
        assert "PULSE_SENSOR_PROXY_SOCKET of pulse.service is not a plain absolute path" in result.stderr
        assert "Pulse will use ? (pulse.service's PULSE_SENSOR_PROXY_SOCKET): not a path" in result.stderr

    def test_no_socket_anywhere_is_reported(self, ct):
        rootfs, env, daemon = ct
        daemon.stop()
        daemon.socket.unlink(missing_ok=True)
        result = self.check(env)
        assert ("warning: container 108: Pulse will use /run/pulse-sensor-proxy/pulse-sensor-proxy.sock "
                "(its default; none of its paths is there): no socket\n") in result.stderr

    def test_a_stopped_container_is_checked_at_its_next_run(self, ct):
        rootfs, env, _ = ct
        (rootfs.parent / "running").unlink()
        result = self.check(env)
        assert "note: container 108 is stopped: what Pulse will see inside it is checked at its next run" in result.stdout


ORIGINAL_EXAMPLE = REPO / "tests/fixtures/original/config.example.yaml"
CT_RANGE = "100000-165535"


def original_config(root, nodes_file_text="allowed_nodes:\n  - pve1\n  - pve2\n"):
    """The original proxy's example config as that proxy's installer leaves it on a host, its
    allowed_nodes_file inside ROOT; returns the config's path."""
    conf_dir = root / "etc/pulse-sensor-proxy"
    conf_dir.mkdir(parents=True, exist_ok=True)
    (conf_dir / "allowed_nodes.yaml").write_text(nodes_file_text)
    config = conf_dir / "config.yaml"
    config.write_text(ORIGINAL_EXAMPLE.read_text().replace(
        "/etc/pulse-sensor-proxy/allowed_nodes.yaml", str(conf_dir / "allowed_nodes.yaml")))
    return config


def config_step(root, *, allow_cleanup=False, dry_run=False):
    """Step 5 of the installer alone (ensure_config) for container 105 (uids 100000-165535),
    with the proxy under test; returns the CompletedProcess, whose stdout ends with the step's
    change count and its notes for the summary."""
    proxy = stub(root.parent / "bin", "proxy-under-test",
                 f'exec "{sys.executable}" "{REPO / "pulse_sensor_proxy.py"}" "$@"') / "proxy-under-test"
    script = (f'. "{SCRIPT}"; ensure_file_mode() {{ :; }}; WORK=$(mktemp -d); PROXY="{proxy}"; '
              f'CTIDS=(105); CT_UID_RANGES[105]={CT_RANGE}; SUBNETS=(10.99.0.1/32); '
              f'ALLOW_CLEANUP={int(allow_cleanup)}; DRY_RUN={int(dry_run)}; ensure_config; '
              'echo "changes: $CHANGES"; for n in "${NOTES[@]}"; do echo "note: $n"; done; '
              'rm -rf "$WORK"')
    return without_traceback(subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True,
        env={**os.environ, "PULSE_INSTALLER_LIB": "1", "PULSE_INSTALL_ROOT": str(root)}))


def peers_of(config):
    import yaml
    return yaml.safe_load(config.read_text())["allowed_peers"]


class TestAllowCleanup:
    """--allow-cleanup gives the container's uid range the cleanup capability (request_cleanup)
    and nothing else; without it the range may only read."""

    def config(self, tmp_path, text="log_level: debug\n"):
        root = tmp_path / "root"
        (root / "etc/pulse-sensor-proxy").mkdir(parents=True)
        config = root / "etc/pulse-sensor-proxy/config.yaml"
        config.write_text(text)
        return root, config

    def test_without_the_flag_the_range_only_reads(self, tmp_path):
        root, config = self.config(tmp_path)
        result = config_step(root)
        assert result.returncode == 0, result.stderr
        assert peers_of(config) == [{"uids": CT_RANGE, "capabilities": ["read"]}]

    def test_granted_once_and_a_second_run_changes_nothing(self, tmp_path):
        root, config = self.config(tmp_path)
        first = config_step(root, allow_cleanup=True)
        assert first.returncode == 0, first.stderr
        assert f"changed  config {config}" in first.stdout and "changes: 1" in first.stdout
        assert peers_of(config) == [{"uids": CT_RANGE, "capabilities": ["read", "cleanup"]}]
        text = config.read_text()
        again = config_step(root, allow_cleanup=True)
        assert f"ok       config {config}" in again.stdout and "changes: 0" in again.stdout
        assert config.read_text() == text

    def test_added_to_the_entry_an_earlier_install_wrote(self, tmp_path):
        root, config = self.config(tmp_path, f'allowed_peers:\n- uids: "{CT_RANGE}"\n  capabilities: [read]\n')
        assert config_step(root, allow_cleanup=True).returncode == 0
        assert peers_of(config) == [{"uids": CT_RANGE, "capabilities": ["read", "cleanup"]}]

    def test_dry_run_shows_the_grant_and_changes_nothing(self, tmp_path):
        root, config = self.config(tmp_path, f'allowed_peers:\n- uids: "{CT_RANGE}"\n  capabilities: [read]\n')
        before = snapshot_tree(root)
        result = config_step(root, allow_cleanup=True, dry_run=True)
        assert result.returncode == 0, result.stderr
        assert f"would    config {config}" in result.stdout
        assert "+  - cleanup\n" in result.stdout
        assert snapshot_tree(root) == before


class TestOriginalConfig:
    """A host the original proxy's installer set up: its config is rewritten in this proxy's
    vocabulary (config migrate --write, keeping .bak) before anything is merged into it."""

    def test_translated_then_merged_keeping_a_backup(self, tmp_path):
        root = tmp_path / "root"
        config = original_config(root)
        original = config.read_bytes()
        result = config_step(root, allow_cleanup=True)
        assert result.returncode == 0, result.stdout + result.stderr
        assert (f"changed  config {config} rewritten from the original proxy's vocabulary "
                f"(the original kept as {config}.bak)") in result.stdout
        assert "         pulse_control_plane: ignored" in result.stdout
        assert f"note: {config} was in the original proxy's vocabulary" in result.stdout
        assert Path(f"{config}.bak").read_bytes() == original
        check = subprocess.run([sys.executable, str(REPO / "pulse_sensor_proxy.py"), "config",
                                "validate", "--config", str(config)], capture_output=True, text=True)
        assert check.stdout == "OK\n", "translated: no note of the original's vocabulary is left"
        import yaml
        merged = yaml.safe_load(config.read_text())
        assert merged["allowed_peers"] == [
            {"uid": 0, "capabilities": ["read", "admin"]}, {"uid": 100999, "capabilities": ["read"]},
            {"uids": CT_RANGE, "capabilities": ["read", "cleanup"]}]
        assert list(merged["nodes"]) == ["pve1", "pve2"], "allowed_nodes_file read into nodes:"
        assert merged["allowed_source_subnets"] == ["127.0.0.1/32", "192.168.0.0/24", "10.99.0.1/32"], \
            "the original's kept, --allowed-subnets added"
        assert merged["rate_limit"] == {"per_minute": 60, "burst": 5}

    def test_second_run_finds_it_translated(self, tmp_path):
        root = tmp_path / "root"
        config = original_config(root)
        assert config_step(root).returncode == 0
        backup, text = Path(f"{config}.bak").read_bytes(), config.read_text()
        again = config_step(root)
        assert "rewritten" not in again.stdout and "changes: 0" in again.stdout, again.stdout
        assert config.read_text() == text and Path(f"{config}.bak").read_bytes() == backup

    def test_not_valid_in_either_vocabulary_stops_and_changes_nothing(self, tmp_path):
        root = tmp_path / "root"
        config = original_config(root)
        config.write_text(config.read_text() + "alowed_nodes: []\n")
        before = snapshot_tree(root)
        result = config_step(root)
        assert result.returncode == 1
        assert f"error: {config} is not valid, left as it is:" in result.stderr
        assert "unknown key 'alowed_nodes'" in result.stderr
        assert snapshot_tree(root) == before

    def test_whole_installer_dry_run_translates_in_memory_only(self, tmp_path):
        root, env = host_tree(tmp_path)
        config = original_config(root)
        pyz = tmp_path / "pulse-sensor-proxy.pyz"
        stand_in_pyz(pyz)
        before = snapshot_tree(root)
        result = installer("--dry-run", "--ctid", "105", "--allow-cleanup", "--pyz", str(pyz), env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert snapshot_tree(root) == before
        assert f"would    config {config} rewritten from the original proxy's vocabulary" in result.stdout
        assert f'+- uids: {CT_RANGE}\n+  capabilities:\n+  - read\n+  - cleanup\n' in result.stdout
        assert "would    config " + str(config) + "\n" in result.stdout


@pytest.mark.parametrize("plant", ["symlink", "hardlink", "fifo"])
def test_state_dir_entries_the_account_planted_are_refused_not_followed(tmp_path, plant):
    """The service account owns the state dir: a key file it replaced by a link to a file of
    root's, or by a FIFO, stops the installer with one line naming it; the target is unchanged."""
    target = tmp_path / "shadow"
    target.write_text("root:*:19000:0:99999:7:::\n")
    target.chmod(0o600)
    key = tmp_path / "state/ssh/id_ed25519"
    key.parent.mkdir(parents=True)
    {"symlink": lambda: key.symlink_to(target), "hardlink": lambda: os.link(target, key),
     "fifo": lambda: os.mkfifo(key)}[plant]()
    before = (target.stat().st_mode, target.stat().st_uid, target.read_bytes())
    result = sourced(f'DRY_RUN=0; CHANGES=0; ensure_file_mode "{key}" 600 nobody nogroup')
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: {key} "), result.stderr
    assert (target.stat().st_mode, target.stat().st_uid, target.read_bytes()) == before


def keygen(path, comment):
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True)
    return path.with_suffix(".pub").read_text()


def test_a_hostile_container_gets_no_key_revoked_and_fills_no_disk(tmp_path):
    """The container serves the proxy's and root's public keys as the .pub of junk "private
    keys", a 4 GiB file as a key, and names that are not key names. Only the one real legacy key
    is revoked (by the public key derived on the host); the copies are bounded; the summary
    says what was skipped."""
    root, env = host_tree(tmp_path)
    proxy_pub = keygen(root / "var/lib/pulse-sensor-proxy/ssh/id_ed25519", "pulse-sensor-proxy")
    admin_pub = keygen(root / "root/.ssh/id_ed25519", "root@pve1")
    rootfs = make_container(root / "etc/pve/lxc/106.conf", tmp_path / "pct/106", PLAIN)
    legacy_pub = keygen(rootfs / "etc/pulse/.ssh/id_ed25519", "root@pulse")
    planted = {"root/.ssh/id_ed25519": ("junk\n", proxy_pub), "home/pulse/.ssh/id_rsa": ("x", admin_pub),
               "opt/pulse/.ssh/id_$(touch pwned)": ("x", admin_pub)}
    for name, (private, public) in planted.items():
        (rootfs / name).parent.mkdir(parents=True, exist_ok=True)
        (rootfs / name).write_text(private)
        (rootfs / f"{name}.pub").write_text(public)
    with open(rootfs / "opt/pulse/.ssh/id_ecdsa", "wb") as endless:
        endless.truncate(4 << 30)       # sparse: reads as 4 GiB of zeros
    for top in ("etc/pulse", "root/.ssh", "home", "opt"):
        for path in [rootfs / top, *(rootfs / top).rglob("*")]:
            os.lchown(path, 100000, 100000)     # the container's root's, as make_container has it
    revokes = tmp_path / "revokes"
    result = sourced(f'DRY_RUN=0; CHANGES=0; NOTES=(); '
                     f'proxy() {{ cat "${{@: -1}}" >>"{revokes}"; }}; '
                     'migrate_legacy_keys 106; printf "%s\\n" "${NOTES[@]}"', env=env)
    assert result.returncode == 0, result.stderr
    assert revokes.read_text().split()[:2] == legacy_pub.split()[:2]
    assert revokes.read_text().count("\n") == 1, "only the derived public key of the real key"
    backups = root / "var/backups/pulse-sensor-proxy/ct106"
    assert sum(path.stat().st_size for path in backups.iterdir()) < 4 * 65536
    assert not (backups / "opt_pulse_.ssh_id_ecdsa").exists()
    assert (rootfs / "opt/pulse/.ssh/id_ecdsa").exists(), "a file not copied is not removed"
    assert not list(rootfs.rglob("pwned")) and (rootfs / "opt/pulse/.ssh/id_$(touch pwned)").exists()
    out = result.stdout + result.stderr
    assert "/opt/pulse/.ssh/id_ecdsa is larger than 65536 bytes" in out
    assert "/root/.ssh/id_ed25519 is backed up" in out and "not revoked anywhere" in out
    assert "container 106: /home/pulse/.ssh/id_rsa is backed up" in out
    assert "Traceback" not in out


def test_python_older_than_the_pyz_needs_stops_before_any_change(tmp_path):
    """Proxmox VE 7's Python 3.9 passed a 3.9 preflight, then the installed pyz failed."""
    root, env = host_tree(tmp_path)
    fake = stub(tmp_path / "py39", "python3",
                'case "$*" in *print*) echo 3.9 ;; *version_info*) exit 1 ;; *) exit 0 ;; esac')
    env["PATH"] = f"{fake}:{env['PATH']}"
    before = snapshot_tree(root)
    result = installer("--ctid", "105", "--pyz", str(REPO / "pulse_sensor_proxy.py"), env=env)
    assert result.returncode == 1
    assert result.stderr == "error: python3 >= 3.11 is required, found 3.9 (Proxmox VE 8 or later has it)\n"
    assert snapshot_tree(root) == before


ORIGINAL = REPO / "tests/fixtures/original"
ORIGINAL_UNITS = ("pulse-sensor-proxy-selfheal.timer", "pulse-sensor-proxy-selfheal.service",
                  "pulse-sensor-cleanup.path", "pulse-sensor-cleanup.service")
ORIGINAL_HOME = "opt/pulse/sensor-proxy"
# What the original's installer moves in place, relative to the root (fixtures/original/bin).
ORIGINAL_FILES = {f"{ORIGINAL_HOME}/bin/pulse-sensor-proxy": "pulse-sensor-proxy",
                  f"{ORIGINAL_HOME}/install-sensor-proxy.sh": "install-sensor-proxy.sh",
                  f"{ORIGINAL_HOME}/bin/pulse-sensor-proxy-selfheal.sh": "pulse-sensor-proxy-selfheal.sh",
                  f"{ORIGINAL_HOME}/bin/pulse-sensor-cleanup.sh": "pulse-sensor-cleanup.sh"}
ORIGINAL_WRAPPERS = {f"{ORIGINAL_HOME}/bin/pulse-sensor-wrapper.sh": "pulse-sensor-wrapper.sh",
                     "usr/local/libexec/pulse-sensor-proxy/temp-wrapper.sh": "pulse-sensor-wrapper.sh"}


def original_host(root):
    """ROOT as the original proxy's installer (Pulse v5.0.17) leaves a host: its units (the
    self-heal timer and the clean-up path enabled), helpers, binary, installer copy, key,
    config in its vocabulary and the rest of its state. Returns the key's bytes."""
    units = root / "etc/systemd/system"
    units.mkdir(parents=True, exist_ok=True)
    for unit in (*ORIGINAL_UNITS, "pulse-sensor-proxy.service"):
        shutil.copy(ORIGINAL / "units" / unit, units / unit)
    for wants, unit in (("timers.target.wants", "pulse-sensor-proxy-selfheal.timer"),
                        ("multi-user.target.wants", "pulse-sensor-cleanup.path"),
                        ("multi-user.target.wants", "pulse-sensor-proxy.service")):
        (units / wants).mkdir(exist_ok=True)
        (units / wants / unit).symlink_to(f"/etc/systemd/system/{unit}")
    for path, fixture in {**ORIGINAL_FILES, **ORIGINAL_WRAPPERS}.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ORIGINAL / "bin" / fixture, root / path)
    ssh = root / "var/lib/pulse-sensor-proxy/ssh"
    ssh.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "pulse-sensor-proxy",
                    "-f", str(ssh / "id_ed25519")], check=True)
    original_config(root)
    conf = root / "etc/pulse-sensor-proxy"
    (conf / "ctid").write_text("105\n")
    (conf / "pending-control-plane.env").write_text("PENDING_PULSE_SERVER=https://pulse.example:7655\n")
    (conf / ".pulse-control-token").write_text("control-token\n")
    (root / "var/log/pulse/sensor-proxy").mkdir(parents=True)
    (root / "var/log/pulse/sensor-proxy/audit.log").write_text('{"event": "connection_accepted"}\n')
    return (ssh / "id_ed25519").read_bytes()


def takeover(root, script, systemctl="exit 0"):
    """SCRIPT run with the installer's functions, ROOT as the host and a systemctl stand-in
    (shell SYSTEMCTL after logging its arguments to ROOT/../systemctl.log)."""
    log = root.parent / "systemctl.log"
    bins = stub(root.parent / "bin", "systemctl", f'echo "$*" >>"{log}"\n{systemctl}')
    result = sourced(script, env={"PULSE_INSTALL_ROOT": str(root), "PATH": f"{bins}:{os.environ['PATH']}"})
    return result, (log.read_text().splitlines() if log.exists() else [])


class TestTakeOverTheOriginal:
    """The original's self-heal reinstalls it whenever pulse-sensor-proxy.service is missing or
    fails: its units stop first, then its files move (never deleted) into one backup."""

    def test_units_stopped_first_then_everything_moved_keeping_the_key(self, tmp_path):
        root = tmp_path / "root"
        key = original_host(root)
        before = {path: (root / path).read_bytes() for path in ORIGINAL_FILES}
        unit_texts = {unit: (root / "etc/systemd/system" / unit).read_bytes()
                      for unit in (*ORIGINAL_UNITS, "pulse-sensor-proxy.service")}
        result, calls = takeover(root, 'take_over_original; echo "backup=$ORIGINAL_BACKUP"; original_summary')
        assert result.returncode == 0, result.stderr
        assert calls == [f"disable --now --quiet {unit}" for unit in ORIGINAL_UNITS] + \
            ["daemon-reload", "reset-failed " + " ".join(ORIGINAL_UNITS)]
        backup = Path(result.stdout.split("backup=")[1].split("\n")[0])
        assert backup.parent == root / "var/backups/pulse-sensor-proxy"
        assert backup.name.startswith("original-") and stat.S_IMODE(backup.stat().st_mode) == 0o700
        for path, text in before.items():
            assert not (root / path).exists(), path
            assert (backup / path).read_bytes() == text, path
            assert (backup / path).stat().st_mode & 0o111, "moved with its mode"
        for unit, text in unit_texts.items():
            assert (backup / "etc/systemd/system" / unit).read_bytes() == text
        for unit in ORIGINAL_UNITS:
            assert not (root / "etc/systemd/system" / unit).exists()
        assert (root / "etc/systemd/system/pulse-sensor-proxy.service").exists(), \
            "copied: this run's own unit replaces it"
        for path in ORIGINAL_WRAPPERS:
            assert (root / path).exists(), "the nodes' forced commands stay until keys push"
        assert (root / "var/lib/pulse-sensor-proxy/ssh/id_ed25519").read_bytes() == key
        for unit in ORIGINAL_UNITS:
            assert f"changed  original proxy: {unit} stopped and disabled\n" in result.stdout
        fingerprint = subprocess.run(["ssh-keygen", "-lf", f"{root}/var/lib/pulse-sensor-proxy/ssh/id_ed25519.pub"],
                                     capture_output=True, text=True, check=True).stdout.split()[1]
        assert f"original proxy taken over: its key kept ({fingerprint})" in result.stdout
        moved = " ".join(f"/{path}" for path in (*(f"etc/systemd/system/{unit}" for unit in ORIGINAL_UNITS),
                                                 *ORIGINAL_FILES, "etc/systemd/system/pulse-sensor-proxy.service"))
        assert f"  moved to {backup}: {moved}\n" in result.stdout
        assert "  to go back: install-sensor-proxy.sh --uninstall --restore-original\n" in result.stdout

    def test_second_run_finds_nothing_left(self, tmp_path):
        root = tmp_path / "root"
        original_host(root)
        first, _ = takeover(root, 'take_over_original; '
                                  f'cp "{UNITS}/pulse-sensor-proxy.service" "$UNIT_DIR/$SERVICE"; '
                                  'KEYS_PUSHED=1; retire_original_wrappers')
        assert first.returncode == 0, first.stderr
        for path in ORIGINAL_WRAPPERS:
            assert not (root / path).exists()
        assert not (root / ORIGINAL_HOME).exists(), "its emptied directories go too"
        tree = snapshot_tree(root)
        again, calls = takeover(root, 'take_over_original; KEYS_PUSHED=1; retire_original_wrappers; '
                                      'echo "changes: $CHANGES"')
        assert "ok       original proxy: nothing of it left\n" in again.stdout
        assert "changes: 0" in again.stdout
        assert snapshot_tree(root) == tree
        assert len(calls) == 6, "the second run called systemctl not once"

    def test_wrappers_kept_while_a_node_may_still_run_them(self, tmp_path):
        root = tmp_path / "root"
        original_host(root)
        result, _ = takeover(root, 'take_over_original; KEYS_PUSHED=0; retire_original_wrappers; '
                                   'printf "note: %s\\n" "${NOTES[@]}"')
        assert result.returncode == 0, result.stderr
        for path in ORIGINAL_WRAPPERS:
            assert (root / path).read_bytes() == (ORIGINAL / "bin/pulse-sensor-wrapper.sh").read_bytes()
        assert "note: the original proxy's forced commands (" in result.stdout
        assert "run this again once every node has the new key line" in result.stdout

    def test_an_older_release_binary_in_our_place_is_backed_up(self, tmp_path):
        """Releases before /opt/pulse: the Go binary at /usr/local/bin/pulse-sensor-proxy."""
        root = tmp_path / "root"
        binary = root / "usr/local/bin/pulse-sensor-proxy"
        binary.parent.mkdir(parents=True)
        binary.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(64))
        result, calls = takeover(root, 'take_over_original; echo "backup=$ORIGINAL_BACKUP"')
        assert result.returncode == 0, result.stderr
        backup = Path(result.stdout.split("backup=")[1].strip())
        assert (backup / "usr/local/bin/pulse-sensor-proxy").read_bytes() == binary.read_bytes()
        assert calls == [], "no unit of the original: nothing to stop"

    def test_an_older_release_in_our_place_is_not_stopped_before_its_unit_is_replaced(self, tmp_path):
        """Its unit (scripts/pulse-sensor-proxy.service, v5.0.17) has no RuntimeDirectoryPreserve:
        a stop under it would remove /run/pulse-sensor-proxy and the containers' mounts with it."""
        root = tmp_path / "root"
        binary = root / "usr/local/bin/pulse-sensor-proxy"
        binary.parent.mkdir(parents=True)
        binary.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(64))
        (root / "etc/systemd/system").mkdir(parents=True)
        shutil.copy(ORIGINAL / "units/pulse-sensor-proxy.service", root / "etc/systemd/system")
        result, calls = takeover(root, f'CANDIDATE="{REPO / "pulse_sensor_proxy.py"}"; take_over_original; install_binary',
                                 systemctl='case "$1" in is-active) exit 0;; esac')
        assert result.returncode == 0, result.stderr
        assert binary.read_bytes() == (REPO / "pulse_sensor_proxy.py").read_bytes()
        assert "is-active --quiet pulse-sensor-proxy.service" in calls
        assert not [call for call in calls if call.startswith("stop")], calls

    def test_our_own_binary_and_unit_are_not_the_original(self, tmp_path):
        root = tmp_path / "root"
        (root / "usr/local/bin").mkdir(parents=True)
        stand_in_pyz(root / "usr/local/bin/pulse-sensor-proxy")
        (root / "etc/systemd/system").mkdir(parents=True)
        shutil.copy(UNITS / "pulse-sensor-proxy.service", root / "etc/systemd/system")
        tree = snapshot_tree(root)
        result, calls = takeover(root, "take_over_original")
        assert result.stdout == "ok       original proxy: nothing of it left\n"
        assert snapshot_tree(root) == tree and calls == []

    def test_a_unit_that_does_not_stop_moves_nothing(self, tmp_path):
        root = tmp_path / "root"
        original_host(root)
        tree = snapshot_tree(root)
        result, _ = takeover(root, "take_over_original",
                             systemctl='case "$*" in *selfheal.service*) echo "Failed to stop" >&2; exit 1;; esac')
        assert result.returncode == 1
        assert ("error: could not stop the original proxy's pulse-sensor-proxy-selfheal.service; "
                "nothing of it was moved") in result.stderr
        assert snapshot_tree(root) == tree

    def test_dry_run_prints_every_step_and_changes_nothing(self, tmp_path):
        root, env = host_tree(tmp_path)
        original_host(root)
        pyz = tmp_path / "pulse-sensor-proxy.pyz"
        stand_in_pyz(pyz)
        before = snapshot_tree(root)
        result = installer("--dry-run", "--ctid", "105", "--pyz", str(pyz), env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert snapshot_tree(root) == before
        backup = str(root / "var/backups/pulse-sensor-proxy/original-")
        for unit in ORIGINAL_UNITS:
            assert f"would    original proxy: {unit} stopped and disabled\n" in result.stdout
            assert f"would run: systemctl disable --now --quiet {unit}\n" in result.stdout
            assert f"would    original proxy: {root}/etc/systemd/system/{unit} moved to {backup}" in result.stdout
        for path in ORIGINAL_FILES:
            assert f"would    original proxy: {root}/{path} moved to {backup}" in result.stdout
        assert (f"would    original proxy: {root}/etc/systemd/system/pulse-sensor-proxy.service "
                f"copied to {backup}") in result.stdout
        config = root / "etc/pulse-sensor-proxy/config.yaml"
        assert f"would    config {config} rewritten from the original proxy's vocabulary" in result.stdout
        assert "nothing was changed" in result.stdout


class TestRestoreOriginal:
    """--uninstall --restore-original: this proxy removed, the original's files back from the
    newest backup, its config from config.yaml.bak, its units started again."""

    def taken_over(self, tmp_path):
        """ROOT after a take-over and this proxy's install: our units, binary and translated
        config in place. Returns (root, {path: bytes} of the original's files and config)."""
        root = tmp_path / "root"
        key = original_host(root)
        (root / "etc/pve/lxc").mkdir(parents=True)
        (root / "etc/pve/lxc/105.conf").write_text(PLAIN + DEFAULT_ENTRY + "\n")
        config = root / "etc/pulse-sensor-proxy/config.yaml"
        originals = {path: (root / path).read_bytes()
                     for path in (*ORIGINAL_FILES, *ORIGINAL_WRAPPERS, "etc/pulse-sensor-proxy/config.yaml",
                                  *(f"etc/systemd/system/{unit}" for unit in (*ORIGINAL_UNITS, "pulse-sensor-proxy.service")))}
        result, _ = takeover(root, 'take_over_original; KEYS_PUSHED=1; retire_original_wrappers; '
                                   'for u in "${UNITS[@]}"; do unit_text "$u" >"$UNIT_DIR/$u"; done')
        assert result.returncode == 0, result.stderr
        shutil.copy(config, f"{config}.bak")
        config.write_text("log_level: info\n")
        (root / "usr/local/bin").mkdir(parents=True)
        stand_in_pyz(root / "usr/local/bin/pulse-sensor-proxy")
        (root / "run/pulse-sensor-proxy").mkdir(parents=True)
        return root, originals, key

    def test_files_config_and_units_come_back(self, tmp_path):
        root, originals, key = self.taken_over(tmp_path)
        (tmp_path / "systemctl.log").unlink()
        result, calls = takeover(root, 'RESTORE_ORIGINAL=1; do_uninstall')
        assert result.returncode == 0, result.stdout + result.stderr
        for path, text in originals.items():
            assert (root / path).read_bytes() == text, path
        assert (root / "etc/pulse-sensor-proxy/config.yaml.replacement").read_text() == "log_level: info\n"
        assert (root / "var/lib/pulse-sensor-proxy/ssh/id_ed25519").read_bytes() == key
        assert not (root / "usr/local/bin/pulse-sensor-proxy").exists()
        for unit in ("pulse-sensor-proxy-key-rotation.timer", "pulse-sensor-proxy-cleanup.path"):
            assert not (root / "etc/systemd/system" / unit).exists()
        assert (root / "run/pulse-sensor-proxy").is_dir(), "the containers' mounts point at it"
        assert (root / "etc/pve/lxc/105.conf").read_text() == PLAIN + DEFAULT_ENTRY + "\n"
        assert calls[-3:] == [f"enable --now --quiet {unit}" for unit in
                              ("pulse-sensor-proxy.service", "pulse-sensor-proxy-selfheal.timer", "pulse-sensor-cleanup.path")]
        assert "daemon-reload" in calls[-4]
        assert not list((root / "var/backups/pulse-sensor-proxy").glob("original-*")), "emptied and removed"
        assert "revoked" not in result.stdout

    def test_without_a_backup_nothing_changes(self, tmp_path):
        root = tmp_path / "root"
        (root / "etc/systemd/system").mkdir(parents=True)
        shutil.copy(UNITS / "pulse-sensor-proxy.service", root / "etc/systemd/system")
        tree = snapshot_tree(root)
        result, calls = takeover(root, 'RESTORE_ORIGINAL=1; do_uninstall')
        assert result.returncode == 1
        assert "error: no backup of the original proxy in " in result.stderr
        assert "nothing was taken over on this host" in result.stderr
        assert snapshot_tree(root) == tree and calls == []

    def test_dry_run_changes_nothing(self, tmp_path):
        root, _, _ = self.taken_over(tmp_path)
        tree = snapshot_tree(root)
        result, _ = takeover(root, 'RESTORE_ORIGINAL=1; DRY_RUN=1; do_uninstall')
        assert result.returncode == 0, result.stderr
        assert "would    original proxy: " in result.stdout and " put back from " in result.stdout
        assert snapshot_tree(root) == tree

    @pytest.mark.parametrize("args, message", [
        (["--restore-original"], "--restore-original goes with --uninstall"),
        (["--uninstall", "--purge", "--restore-original"], "--restore-original and --purge exclude each other"),
    ])
    def test_usage(self, args, message):
        result = installer(*args)
        assert result.returncode == 2 and message in result.stderr


class TestOriginalMountLine:
    """The original's line (its installer, line 3200) gains `optional`; the mount is the same,
    so a running container is not restarted for it."""

    def rewrite(self, tmp_path, text):
        root = tmp_path / "root"
        (root / "etc/pve/lxc").mkdir(parents=True)
        conf = root / "etc/pve/lxc/105.conf"
        conf.write_text(text)
        result = sourced('mounted=$(ct_socket_paths "$PVE_DIR/lxc/105.conf"); ct_rewrite_conf 105; '
                         'if ct_mount_changed "$mounted" "$WORK/105.conf"; then echo restart; '
                         'else echo no-restart; fi', env={"PULSE_INSTALL_ROOT": str(root)})
        return result, conf.read_text()

    def test_only_optional_added_means_no_restart(self, tmp_path):
        original = "lxc.mount.entry: /run/pulse-sensor-proxy mnt/pulse-proxy none bind,create=dir 0 0\n"
        result, text = self.rewrite(tmp_path, PLAIN + original)
        assert text == PLAIN + DEFAULT_ENTRY + "\n"
        assert result.stdout.endswith("\nno-restart\n")
        assert "gains `optional` (the mount is unchanged: no restart)" in result.stdout

    def test_a_mount_point_line_still_restarts(self, tmp_path):
        result, text = self.rewrite(tmp_path, PLAIN + "mp0: /run/pulse-sensor-proxy,mp=/mnt/pulse-proxy\n")
        assert text == PLAIN + DEFAULT_ENTRY + "\n" and result.stdout.endswith("\nrestart\n")

    def test_a_path_under_run_still_restarts(self, tmp_path):
        result, text = self.rewrite(tmp_path, PLAIN + OLD_ENTRY.replace(",optional", "") + "\n")
        assert text == PLAIN + DEFAULT_ENTRY + "\n" and result.stdout.endswith("\nrestart\n")

    def test_in_place_already(self, tmp_path):
        result, _ = self.rewrite(tmp_path, PLAIN + DEFAULT_ENTRY + "\n")
        assert result.stdout.endswith("\nno-restart\n")
