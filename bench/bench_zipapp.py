#!/usr/bin/env python3
"""Measure the pyz: size per architecture, first run (unpack), warm `version`, warm socket-ready.

    .venv/bin/python bench/bench_zipapp.py [--runs N] [--pyz-dir DIR]

Builds both architectures with build_zipapp.sh (unless --pyz-dir names a directory holding
them), then times this machine's pyz as root with a fresh SHIV_ROOT. Each figure is printed with
the command it timed and the target it is held to; wall times are the median of --runs runs.
"""
import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"size": 10 * 1024 * 1024, "first": 2.0, "version": 0.100, "ready": 1.0}


def build(out):
    subprocess.run([str(ROOT / "build_zipapp.sh"), "--python", sys.executable, "--out", str(out)],
                   check=True, stdout=subprocess.DEVNULL)


def timed(command, env):
    start = time.perf_counter()
    subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def socket_ready(command, env, sock_path, deadline=30.0):
    """Seconds from starting COMMAND until SOCK_PATH accepts a connection; then stop it."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                with socket.socket(socket.AF_UNIX) as probe:
                    probe.connect(str(sock_path))
                return time.perf_counter() - start
            except OSError:
                if process.poll() is not None or time.perf_counter() - start > deadline:
                    raise RuntimeError(f"{' '.join(command)} never served {sock_path}")
                time.sleep(0.002)
    finally:
        process.terminate()
        process.wait(timeout=30)


def report(label, value, target, unit, command):
    shown = f"{value / 1024 / 1024:.1f} MiB" if unit == "bytes" else f"{value * 1000:.0f} ms"
    goal = f"{target / 1024 / 1024:.0f} MiB" if unit == "bytes" else f"{target * 1000:.0f} ms"
    verdict = "ok" if value <= target else "OVER"
    print(f"{label:<34} {shown:>10}   target <= {goal:<7} {verdict:<4}  $ {command}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--pyz-dir", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="psp-bench-"))
    try:
        pyz_dir = args.pyz_dir or work / "dist"
        if not args.pyz_dir:
            build(pyz_dir)
        for pyz in sorted(pyz_dir.glob("pulse-sensor-proxy-*.pyz")):
            report(f"size {pyz.name}", pyz.stat().st_size, TARGETS["size"], "bytes",
                   f"stat -c %s {pyz.name}")
        pyz = str(pyz_dir / f"pulse-sensor-proxy-{os.uname().machine}.pyz")
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(work),
               "SHIV_ROOT": str(work / "shiv")}
        print(f"python3: {subprocess.check_output(['python3', '-V'], env=env, text=True).strip()}"
              f", runs: {args.runs}")

        config = work / "config.yaml"
        sock = work / "run" / "pulse-sensor-proxy.sock"
        config.write_text(f"socket_path: {sock}\nssh_dir: {work / 'ssh'}\n"
                          "metrics_address: disabled\n")
        validate = [pyz, "config", "validate", "--config", str(config)]
        firsts = []
        for _ in range(args.runs):
            shutil.rmtree(work / "shiv", ignore_errors=True)
            firsts.append(timed(validate, env))
        report("first run (unpack + compile)", statistics.median(firsts), TARGETS["first"],
               "s", f"SHIV_ROOT=<empty> {' '.join(validate[1:])}")

        timed([pyz, "version"], env)
        report("warm version", statistics.median(timed([pyz, "version"], env)
                                                 for _ in range(args.runs)),
               TARGETS["version"], "s", "pulse-sensor-proxy version")

        serve = [pyz, "serve", "--config", str(config)]
        socket_ready(serve, env, sock)
        report("warm serve -> socket accepts", statistics.median(
            socket_ready(serve, env, sock) for _ in range(args.runs)),
            TARGETS["ready"], "s", " ".join(["pulse-sensor-proxy", *serve[1:]]))
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
