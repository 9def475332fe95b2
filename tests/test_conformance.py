"""The shared conformance cases (outputs of the official FLUX.1 code), run as the user would run them."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO, SHARED, scaled

CHECK = SHARED / "conformance" / "check.py"


@pytest.mark.skipif(not CHECK.is_file(), reason="../shared/conformance not present")
def test_shared_conformance_prints_only_pass() -> None:
    result = subprocess.run([sys.executable, str(CHECK)], cwd=REPO, capture_output=True, text=True, timeout=scaled(300))
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    checks = lines[:-1]
    assert result.returncode == 0 and checks, result.stdout + result.stderr[-2000:]
    assert all(line.startswith("PASS") for line in checks), result.stdout
