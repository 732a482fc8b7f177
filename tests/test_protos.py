"""The committed gencode under shared/pb matches what protos/generate.py produces."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_current() -> None:
    proc = subprocess.run(
        [sys.executable, "protos/generate.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


def test_every_message_and_field_is_documented() -> None:
    lines = (ROOT / "protos/shared/pb/v1/sync.proto").read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        s = line.strip()
        is_decl = s.startswith(("message ", "rpc ", "enum ")) or (
            s.endswith(";") and "=" in s and not s.startswith(("//", "syntax", "package"))
        )
        if is_decl and not lines[i - 1].strip().startswith("//"):
            undocumented.append(f"{i + 1}: {s}")
    assert not undocumented, undocumented
