#!/usr/bin/env python3
"""pulse-sensor-proxy: host-side bridge that reads `sensors -j` from Proxmox nodes for Pulse.

(The manual lands with the core daemon.)
"""
import argparse
import sys

__version__ = "0.1.0"
# build_zipapp.sh rewrites these two lines in the copy it packages.
BUILD_COMMIT = "source"
BUILD_DATE = ""


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
