"""Security scan: no pickle-based deserialization anywhere in the shipped code.

Received bytes are parsed (protobuf, safetensors, the DWC container), never unpickled. This scans
the AST of every module for `pickle`/`marshal`/`dill` imports, `torch.load`, and numpy loads with
`allow_pickle=True`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cloud", "device", "shared", "demo", "bench")
BANNED_MODULES = {"pickle", "cPickle", "_pickle", "dill", "marshal", "shelve", "joblib"}


def _violations(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in BANNED_MODULES:
            found.append(node.module or "")
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            if name == "torch.load":  # safetensors.torch.load is fine: it parses, never unpickles
                found.append(name)
            if any(k.arg == "allow_pickle" and ast.unparse(k.value) != "False" for k in node.keywords):
                found.append(f"{name}(allow_pickle=...)")
    return [f"{path.relative_to(ROOT)}: {v}" for v in found]


def test_no_pickle_or_torch_load_in_shipped_code() -> None:
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py")) if "/pb/" not in str(p)]
    assert len(files) > 50
    bad = [v for p in files for v in _violations(p)]
    assert not bad, bad


def test_scan_catches_each_pattern(tmp_path: Path) -> None:
    src = tmp_path / "evil.py"
    src.write_text(
        "import pickle\nfrom marshal import loads\nimport torch, numpy as np\n"
        "torch.load(b)\nnp.load(f, allow_pickle=True)\n"
    )
    global ROOT
    old, ROOT = ROOT, tmp_path
    try:
        assert len(_violations(src)) == 4
    finally:
        ROOT = old
