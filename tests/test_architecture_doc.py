"""docs/architecture.md draws the layers of the import-linter contract, in its order, and every part of the
package belongs to a layer."""

from __future__ import annotations

import re
import tomllib

from conftest import REPO

# not layers: the package's version (__init__), a public re-export for the shared conformance check, model data
OUTSIDE_LAYERS = {"__init__", "sampling", "demo_weights"}


def contract_layers() -> list[list[str]]:
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    (layers,) = [c["layers"] for c in contracts if c["type"] == "layers"]
    return [[name.strip().removeprefix("fluxpipe.") for name in layer.split("|")] for layer in layers]


def test_every_part_of_the_package_is_in_a_layer() -> None:
    parts = {p.stem for p in (REPO / "fluxpipe").iterdir() if p.suffix == ".py" or p.is_dir()} - {"__pycache__"}
    layered = {name for layer in contract_layers() for name in layer}
    assert parts - OUTSIDE_LAYERS == layered


def test_the_diagram_lists_the_layers_top_to_bottom() -> None:
    doc = (REPO / "docs" / "architecture.md").read_text()
    diagram = doc.split("```")[1]
    names = [re.split(r"\s{2,}", line[3:])[0] for line in diagram.splitlines() if re.match(r" \| \S", line)]
    drawn = [[n.strip() for n in name.split("|")] for name in names]
    assert drawn == contract_layers()
    for layer in contract_layers():
        assert f"**{' | '.join(layer)}**" in doc  # its paragraph
