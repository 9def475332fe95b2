"""Per-job start-up: the manifest job (one per dataset edit) runs without importing torch, which costs 2-9 s per
job on a 2-core machine; the check runs `fluxpipe manifest` on the demo dataset in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO, scaled

PROBE = """
import sys
from fluxpipe.cli import main
code = main(["manifest", "--config", sys.argv[1], "--out", sys.argv[2]])
heavy = sorted(m for m in ("torch", "transformers", "bitsandbytes") if m in sys.modules)
print("HEAVY", ",".join(heavy))
sys.exit(code)
"""


def test_the_manifest_job_does_not_import_torch(tmp_path: Path) -> None:
    out = tmp_path / "manifest.parquet"
    result = subprocess.run(
        [sys.executable, "-c", PROBE, "config/config.yaml", str(out)],
        cwd=REPO,
        env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")},
        capture_output=True,
        text=True,
        timeout=scaled(120),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.is_file()
    assert "HEAVY \n" in result.stdout, result.stdout
