"""Standing checks on the code itself: lint findings and the size budgets of the conventions."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

MODULE_LIMIT, RULE_FILE_LIMIT, FUNCTION_LIMIT, LOOP_LIMIT = 600, 150, 60, 150


def python_files() -> list[Path]:
    return sorted((REPO / "fluxpipe").rglob("*.py"))


def test_modules_and_rule_files_fit_their_budgets() -> None:
    too_big = [
        f"{p.relative_to(REPO)}: {n} lines"
        for p in python_files()
        if (n := len(p.read_text().splitlines())) > MODULE_LIMIT
    ]
    too_big += [
        f"{p.relative_to(REPO)}: {n} lines"
        for p in [REPO / "Snakefile", *(REPO / "rules").glob("*.smk")]
        if (n := len(p.read_text().splitlines())) > RULE_FILE_LIMIT
    ]
    assert not too_big


def test_functions_fit_their_budget() -> None:
    long = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                limit = LOOP_LIMIT if node.name.startswith("train") else FUNCTION_LIMIT
                if n > limit:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {n} lines")
    assert not long


@pytest.mark.skipif(shutil.which("ruff", path=str(Path(sys.executable).parent)) is None, reason="ruff not installed")
def test_ruff_finds_nothing() -> None:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent))
    result = subprocess.run([ruff, "check", "fluxpipe", "tests"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
