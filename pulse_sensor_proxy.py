#!/usr/bin/env python3
"""pulse-sensor-proxy: host-side bridge that reads `sensors -j` from Proxmox nodes for Pulse.

(The manual lands with the core daemon.)
"""
import argparse
import os
import stat
import sys

__version__ = "0.1.0"
# build_zipapp.sh rewrites these two lines in the copy it packages.
BUILD_COMMIT = "source"
BUILD_DATE = ""


def unpack_dir_problem(path):
    """Why the pyz must not unpack into or import from directory PATH; None when it may.

    The pyz unpacks its dependencies (native code among them) under PATH and runs them as
    whoever started it, usually root, so anyone who could write there could inject code. PATH
    must be owned by the current user or root and writable by nobody else; each parent up to /
    must be owned by root or the current user and writable by nobody else, unless it is a
    root-owned sticky directory such as /tmp (others cannot rename or replace our entries).
    """
    real = os.path.realpath(path)
    uid = os.geteuid()
    current = real
    while True:
        try:
            info = os.lstat(current)
        except OSError as exc:
            return f"cannot inspect {current}: {exc.strerror}"
        mode = stat.S_IMODE(info.st_mode)
        shared_sticky = current != real and info.st_uid == 0 and mode & stat.S_ISVTX
        if not stat.S_ISDIR(info.st_mode):
            problem = "is not a directory"
        elif info.st_uid not in (0, uid):
            problem = f"belongs to uid {info.st_uid}"
        elif mode & 0o022 and not shared_sticky:
            problem = f"is writable by group or others (mode {mode:04o})"
        else:
            problem = None
        if problem:
            return (f"refusing to unpack into {real}: {current} {problem}, so another user could "
                    f"replace the code this program runs. Fix: make {current} owned by root or "
                    f"uid {uid} and not writable by group or others (chown, chmod go-w), or set "
                    f"SHIV_ROOT to a private directory (mkdir -m 0700 DIR)")
        if current == "/":
            return None
        current = os.path.dirname(current)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="pulse-sensor-proxy")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("version", help="print the version and exit")
    args = parser.parse_args(argv)
    if args.command == "version":
        print(f"pulse-sensor-proxy {__version__}")
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
