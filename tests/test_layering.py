"""Import direction is a hard rule: device -> shared <- cloud; device and cloud never meet."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"shared": {"cloud", "device"}, "device": {"cloud"}, "cloud": {"device"}}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    tops: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            tops.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            tops.add(node.module.split(".")[0])
    return tops


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_respect_layering(package: str) -> None:
    offenders = [
        f"{p.relative_to(ROOT)} imports {sorted(_imports(p) & FORBIDDEN[package])}"
        for p in sorted((ROOT / package).rglob("*.py"))
        if _imports(p) & FORBIDDEN[package]
    ]
    assert not offenders, offenders


def test_scanner_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "x.py"
    bad.write_text("from cloud.server import CloudServer\nimport device.agent\n")
    assert {"cloud", "device"} <= _imports(bad)
