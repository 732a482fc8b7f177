"""Regenerate the committed gRPC/protobuf code under shared/pb from protos/.

`python protos/generate.py` writes the files; `--check` generates into a temporary directory and
exits 1 if any committed file differs (the CI drift guard, after Flower's check-protos).
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"


def _protos() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out: Path) -> list[Path]:
    """Run protoc for every .proto into `out`; return the generated paths relative to `out`."""
    from grpc_tools import protoc  # dev dependency only

    out.mkdir(parents=True, exist_ok=True)
    files = [str(p.relative_to(PROTO_ROOT)) for p in _protos()]
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed: {' '.join(args)}")
    return sorted(p.relative_to(out) for p in out.rglob("*") if p.suffix in {".py", ".pyi"})


def main(argv: list[str] | None = None) -> int:
    """Generate (or with --check, verify) the committed code."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed code is stale")
    args = parser.parse_args(argv)
    if not args.check:
        generate(ROOT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        produced = generate(Path(tmp))
        stale = [
            str(rel)
            for rel in produced
            if not (ROOT / rel).exists() or not filecmp.cmp(Path(tmp) / rel, ROOT / rel, False)
        ]
    if stale:
        sys.stderr.write(f"stale generated code (run python protos/generate.py): {stale}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
