"""Fixtures shared by the fast stage (tests/) and the slow stage (tests/system/)."""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build_zipapp.sh"
ARCHES = ("x86_64", "aarch64")


def build_pyz(out_dir, *args):
    """Run build_zipapp.sh with this test run's Python (it has shiv); return the process."""
    return subprocess.run([str(BUILD), "--python", sys.executable, "--out", str(out_dir), *args],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def pyz_dir():
    """Both architectures' pyz, built once per test session.

    The directory is world-traversable so that tests can run the pyz as other uids.
    """
    out = Path(tempfile.mkdtemp(prefix="psp-pyz-"))
    out.chmod(0o755)
    result = build_pyz(out)
    assert result.returncode == 0, result.stderr
    yield out
    shutil.rmtree(out)


@pytest.fixture(scope="session")
def pyz(pyz_dir):
    """The pyz for this machine's architecture."""
    return pyz_dir / f"pulse-sensor-proxy-{os.uname().machine}.pyz"
