"""Start pulse-sensor-proxy from its pyz (build_zipapp.sh stores this file as __main__.py).

shiv packs the program and its dependencies under site-packages/ in the archive. Python loads
native code (cryptography, cffi, PyYAML's _yaml) only from real files, so they are unpacked once
per build into a cache directory and imported from there. This file replaces shiv's bootstrap:

* it refuses, naming the supported ones, a Python the pyz carries no native code for;
* `version` and `--help` run straight from the archive and unpack nothing, so they work for any
  user with any HOME (unset, read-only, missing);
* the cache directory is $SHIV_ROOT if set, else ~/.shiv if usable, else a private per-uid
  directory in the temp dir;
* the program itself is always imported from the archive, and its unpack_dir_problem() vets the
  cache directory before anything is unpacked there or imported from it;
* unpacking runs under umask 077 and byte-compiles, so warm starts read .pyc files;
* the unpacked directory joins sys.path without running .pth files.

It must parse on old Pythons so that they get the message instead of a SyntaxError.
"""
import os
import sys

PROG = "pulse-sensor-proxy"
# The CPython versions whose native extensions the pyz carries (build_zipapp.sh reads this line).
PYTHONS = ((3, 11), (3, 12), (3, 13))
NO_UNPACK = ("version", "-h", "--help")

ARCHIVE = os.path.dirname(os.path.abspath(__file__))


def fail(message):
    sys.stderr.write("%s: error: %s\n" % (PROG, message))
    sys.exit(1)


def check_python():
    here = sys.version_info[:2]
    if sys.implementation.name != "cpython" or here not in PYTHONS:
        fail("this build runs on CPython %s; %s is Python %d.%d (%s). Run it with a supported "
             "python3 (Proxmox VE 8 and 9 have one)"
             % (", ".join("%d.%d" % v for v in PYTHONS), sys.executable, here[0], here[1],
                sys.implementation.name))


def import_program():
    """The program module, from the archive itself, never from the cache directory."""
    inside = os.path.join(ARCHIVE, "site-packages")
    sys.path.insert(0, inside)
    try:
        import pulse_sensor_proxy
    finally:
        sys.path.remove(inside)
    return pulse_sensor_proxy


def private_temp_dir():
    import tempfile
    path = os.path.join(tempfile.gettempdir(), "%s-%d" % (PROG, os.geteuid()))
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    return path


def usable(path):
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def cache_root():
    explicit = os.environ.get("SHIV_ROOT")
    if explicit:
        root = os.path.abspath(explicit)
        os.makedirs(root, 0o700, exist_ok=True)
        return root
    home = os.path.expanduser("~")
    shiv = os.path.join(home, ".shiv")
    if usable(shiv) or (not os.path.exists(shiv) and usable(home)):
        os.makedirs(shiv, 0o700, exist_ok=True)
        return shiv
    return private_temp_dir()


def build_id():
    import json
    data = __loader__.get_data("environment.json")
    return json.loads(data.decode("utf-8"))["build_id"]


def unpack(root):
    """The unpacked site-packages of this build under ROOT, unpacked first if need be."""
    target = os.path.join(root, "%s_%s" % (PROG, build_id()))
    site_packages = os.path.join(target, "site-packages")
    if not os.path.isdir(site_packages):
        import zipfile
        from pathlib import Path
        from _bootstrap import extract_site_packages
        old_umask = os.umask(0o077)
        try:
            with zipfile.ZipFile(ARCHIVE) as archive:
                extract_site_packages(archive, Path(target), compile_pyc=True, compile_workers=1)
        finally:
            os.umask(old_umask)
    return site_packages


def add_to_path(site_packages):
    """Put SITE_PACKAGES before the system's site directories, as shiv does, minus .pth files."""
    for index, entry in enumerate(sys.path):
        if os.path.basename(entry) in ("site-packages", "dist-packages"):
            sys.path.insert(index, site_packages)
            return
    sys.path.append(site_packages)


def launch():
    check_python()
    program = import_program()
    if sys.argv[1:2] and sys.argv[1] in NO_UNPACK:
        return program.main()
    try:
        root = os.path.realpath(cache_root())
    except OSError as exc:
        fail("cannot create the unpack directory: %s (set SHIV_ROOT to a private writable "
             "directory)" % exc)
    problem = program.unpack_dir_problem(root)
    if problem:
        fail(problem)
    try:
        site_packages = unpack(root)
    except OSError as exc:
        fail("cannot unpack into %s: %s (set SHIV_ROOT to a private writable directory)"
             % (root, exc))
    add_to_path(site_packages)
    return program.main()


sys.exit(launch())
