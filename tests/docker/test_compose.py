"""docker/: the compose file passes the Compose spec schema and the real Compose binary's
`config -q` (and broken copies fail both), and everything the images and the compose file name
exists in the repo: COPY sources, modules, console scripts and their flags, TLS file paths,
settings fields. No Docker engine is needed (or available): nothing is built or started."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import io
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import tomllib
import warnings
import zipfile
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from shared import certs
from shared.settings import load_settings
from tests.docker.compose_model import (
    COMPOSE_FILE,
    DOCKERFILES,
    SECRET,
    compose_config,
    dockerignore_allows,
    exec_form,
    generate_like_the_certs_job,
    instructions,
    model,
    mounts,
    schema_check,
    service_env,
)
from tests.support import ROOT

# Commands the compose file references before their code has landed (tracked in the issues).
# While missing they are skipped with this reason; once present their flags are checked.
PLANNED = {
    ("python", "-m", "cloud.zoo", "train"): "cloud.zoo (model zoo training) not committed yet",
    ("device-agent", "run"): "`device-agent run` (the agent loop) not committed yet",
}


# -- commands --------------------------------------------------------------------------------

def _split_shell(argv: list[str]) -> list[list[str]]:
    """`sh -c "a && exec b"` -> [a, b]; anything else is one command."""
    if argv[:2] != ["sh", "-c"]:
        return [argv]
    commands = []
    for part in re.split(r"&&|\|\||;", argv[2]):
        tokens = shlex.split(part)
        if tokens and tokens[0] == "exec":
            tokens = tokens[1:]
        if tokens:
            commands.append(tokens)
    return commands


def all_commands() -> list[list[str]]:
    """Every command line the compose services and the Dockerfiles run (deduplicated)."""
    found: list[list[str]] = []
    for svc in model()["services"].values():
        found += _split_shell(svc["command"])
        test = svc.get("healthcheck", {}).get("test")
        if test:
            assert test[0] == "CMD", test  # exec form: no shell in the probe
            found += _split_shell(test[1:])
    for dockerfile in DOCKERFILES.values():
        for word, rest in instructions(dockerfile):
            if word in ("CMD", "HEALTHCHECK"):
                found += _split_shell(exec_form(rest))
    unique = {tuple(c): c for c in found}
    return list(unique.values())


def _head(argv: list[str]) -> tuple[str, ...]:
    """The program and its subcommand: everything before the first flag."""
    head = []
    for tok in argv:
        if tok.startswith("-") and not (head == ["python"] and tok == "-m"):
            break
        head.append(tok)
    return tuple(head)


@dataclass(frozen=True)
class Help:
    """What `<command> --help` did, run in this process (the entry points import torch; a
    subprocess each would pay that import again)."""

    code: int | str | None
    out: str
    err: str


@cache
def help_text(head: tuple[str, ...]) -> Help:
    out, err = io.StringIO(), io.StringIO()
    code: int | str | None = 0
    argv = [*head[1:], "--help"] if head[0] != "python" else [*head[3:], "--help"]
    saved = sys.argv
    try:
        with redirect_stdout(out), redirect_stderr(err), warnings.catch_warnings():
            # runpy warns when the module was imported already (it is, by other tests).
            warnings.simplefilter("ignore", RuntimeWarning)
            if head[0] == "python":
                sys.argv = [head[2], *argv]
                runpy.run_module(head[2], run_name="__main__", alter_sys=True)
            else:
                target = _scripts()[head[0]]
                module, _, func = target.partition(":")
                getattr(importlib.import_module(module), func)(argv)
    except SystemExit as e:
        code = e.code
    except ImportError as e:
        code, err = "ImportError", io.StringIO(str(e))
    finally:
        sys.argv = saved
    return Help(code, out.getvalue(), err.getvalue())


@cache
def _scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def _command_id(argv: list[str]) -> str:
    return " ".join(_head(argv))


# -- the validators --------------------------------------------------------------------------

def test_compose_schema_and_compose_config_accept_the_file(tmp_path: Path) -> None:
    schema = schema_check(COMPOSE_FILE, tmp_path)
    assert schema.returncode == 0, schema.stdout + schema.stderr
    config = compose_config(COMPOSE_FILE, tmp_path, "-q")
    assert config.returncode == 0, config.stderr


def test_the_enrollment_secret_must_be_supplied(tmp_path: Path) -> None:
    proc = compose_config(COMPOSE_FILE, tmp_path, "-q", secret=False)
    assert proc.returncode != 0
    assert "CDCA_ENROLLMENT_SECRET" in proc.stderr
    assert SECRET not in COMPOSE_FILE.read_text()


# Each edit must break the file for both validators; `old` must occur in the file exactly once
# (so the edit cannot silently stop applying).
BROKEN = {
    "unknown service key": ("    stop_grace_period: 20s\n",
                            "    stop_grace_period: 20s\n    restart_policy_typo: always\n"),
    "bad depends_on condition": ("      condition: service_healthy\n",
                                 "      condition: service_happy\n"),
    "environment of the wrong type": (
        "    environment:\n      CDCA_CLOUD_DATA_DIR: /var/lib/cdca\n",
        "    environment:\n      - [CDCA_CLOUD_DATA_DIR]\n"
        "    labels:\n      CDCA_CLOUD_DATA_DIR: /var/lib/cdca\n"),
}
# Valid against the schema, rejected by Compose itself.
COMPOSE_ONLY = {
    "depends on an undefined service": (
        "      zoo:\n        condition: service_completed_successfully\n    healthcheck:",
        "      model-zoo:\n        condition: service_completed_successfully\n    healthcheck:"),
    "negative healthcheck retries": ("      retries: 3\n      start_period: 60s\n    # SIGTERM",
                                     "      retries: -3\n      start_period: 60s\n    # SIGTERM"),
}


def _broken_copy(edit: tuple[str, str], tmp_path: Path) -> Path:
    old, new = edit
    text = COMPOSE_FILE.read_text()
    assert text.count(old) == 1, f"edit {edit!r} no longer applies"
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text.replace(old, new))
    return broken


@pytest.mark.parametrize("edit", sorted(BROKEN))
def test_broken_copies_fail_both_validators(edit: str, tmp_path: Path) -> None:
    broken = _broken_copy(BROKEN[edit], tmp_path)
    assert schema_check(broken, tmp_path).returncode != 0
    assert compose_config(broken, tmp_path, "-q").returncode != 0


@pytest.mark.parametrize("edit", sorted(COMPOSE_ONLY))
def test_compose_catches_what_the_schema_cannot(edit: str, tmp_path: Path) -> None:
    broken = _broken_copy(COMPOSE_ONLY[edit], tmp_path)
    assert schema_check(broken, tmp_path).returncode == 0
    assert compose_config(broken, tmp_path, "-q").returncode != 0


# -- the topology ----------------------------------------------------------------------------

def test_services_and_start_order() -> None:
    services = model()["services"]
    assert set(services) == {"certs", "zoo", "cloud", "device-lowlight", "device-colorcast"}
    done = {"condition": "service_completed_successfully", "required": True}
    for one_shot in ("certs", "zoo"):
        assert services[one_shot]["restart"] == "no"
        assert services[one_shot]["healthcheck"] == {"disable": True}
    assert services["cloud"]["depends_on"] == {"certs": done, "zoo": done}
    for device in ("device-lowlight", "device-colorcast"):
        assert services[device]["depends_on"] == {
            "certs": done, "zoo": done,
            "cloud": {"condition": "service_healthy", "required": True}}
    domains = {services[d]["environment"]["CDCA_DEVICE_INPUT__DOMAINS"]
               for d in ("device-lowlight", "device-colorcast")}
    assert domains == {'["low_light"]', '["color_cast"]'}
    # Devices first register, then run.
    for device in ("device-lowlight", "device-colorcast"):
        steps = [c[:2] for c in _split_shell(services[device]["command"])]
        assert steps == [["device-agent", "register"], ["device-agent", "run"]]


def test_build_contexts_and_dockerfiles_exist() -> None:
    for name, svc in model()["services"].items():
        context = Path(svc["build"]["context"])
        assert context == ROOT, name
        assert (context / svc["build"]["dockerfile"]).is_file(), name
        assert svc["build"]["dockerfile"] in {f"docker/{p.name}" for p in DOCKERFILES.values()}


# -- the images ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_base_user_install_and_copies(kind: str) -> None:
    dockerfile = DOCKERFILES[kind]
    steps = instructions(dockerfile)
    assert [r for w, r in steps if w == "FROM"] == ["python:3.11-slim-bookworm"]
    users = [r for w, r in steps if w == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    # torch pinned in the same pip command as the project, from the CPU wheel index.
    installs = [r for w, r in steps if w == "RUN" and "pip install" in r]
    assert len(installs) == 1
    pip = shlex.split(installs[0].split("&&")[0])
    assert "torch==2.13.0" in pip and "." in pip
    assert pip[pip.index("--index-url") + 1] == "https://download.pytorch.org/whl/cpu"
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    for word, rest in steps:
        if word != "COPY":
            continue
        *sources, _dest = [t for t in shlex.split(rest) if not t.startswith("--")]
        for src in sources:
            assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src} does not exist"
            assert dockerignore_allows(ignore, src), f"{ignore.name} excludes {src}"
            if (ROOT / src).is_dir():
                assert dockerignore_allows(ignore, f"{src}/__init__.py")
                assert not dockerignore_allows(ignore, f"{src}/__pycache__/x.pyc")
    assert not dockerignore_allows(ignore, ".venv/bin/python")
    assert not dockerignore_allows(ignore, ".git/HEAD")
    assert [w for w, _ in steps].count("HEALTHCHECK") == 1


def test_both_images_share_every_layer_up_to_the_install() -> None:
    cloud, device = (instructions(DOCKERFILES[k]) for k in ("cloud", "device"))
    upto = next(i for i, (w, r) in enumerate(cloud) if w == "RUN" and "pip install" in r)
    assert cloud[: upto + 1] == device[: upto + 1]


# -- commands, modules and flags -------------------------------------------------------------

def _module_exists(name: str) -> bool:
    try:
        spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:
        return False
    if spec is None:
        return False
    if spec.submodule_search_locations is not None:  # a package runs its __main__
        return _module_exists(name + ".__main__")
    return True


@pytest.mark.parametrize("argv", all_commands(), ids=_command_id)
def test_every_command_exists_and_accepts_its_flags(argv: list[str]) -> None:
    head = _head(argv)
    if head[0] == "python":
        assert head[1] == "-m", argv
        exists = _module_exists(head[2])
    elif head[0] in _scripts():
        exists = True
    else:
        pytest.fail(f"{head[0]!r} is neither `python -m` nor a console script of pyproject.toml")
    shown = help_text(head) if exists else None
    if (shown is None or shown.code != 0) and head in PLANNED:
        pytest.skip(f"planned: {PLANNED[head]}")
    assert shown is not None, f"{argv}: module not found"
    assert shown.code == 0, f"{' '.join(head)} --help failed: {shown.err[-2000:]}"
    flags = {t.split("=")[0] for t in argv if t.startswith("--")}
    missing = {f for f in flags if not _mentions(shown.out, f)}
    assert not missing, f"{' '.join(head)} does not accept {sorted(missing)}"


def _mentions(text: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


def test_the_command_checks_can_fail() -> None:
    shown = help_text(("python", "-m", "shared.certs"))
    assert shown.code == 0 and _mentions(shown.out, "--ca-key")
    assert not _mentions(shown.out, "--ca-keys")
    assert help_text(("cloud-server", "no-such-command")).code == 2
    assert help_text(("python", "-m", "shared.no_such_module")).code == "ImportError"
    assert not _module_exists("shared.no_such_module")
    assert _module_exists("shared.certs") and not _module_exists("shared")


# -- files and settings the containers use ---------------------------------------------------

def test_every_tls_path_is_a_file_the_certs_job_writes(tmp_path: Path) -> None:
    volumes = generate_like_the_certs_job(tmp_path)
    services = model()["services"]
    for name in ("cloud", "device-lowlight", "device-colorcast"):
        svc = services[name]
        mnt = mounts(svc)
        assert mnt["/tls"]["source"] == "tls" and mnt["/tls"].get("read_only"), name
        assert "tls-ca" not in {m["source"] for m in mnt.values()}, f"{name} sees the CA key"
        paths = [v for k, v in svc["environment"].items() if k.endswith("_FILE")]
        assert paths, name
        for path in paths:
            assert path.startswith("/tls/"), (name, path)
            local = volumes["/tls"] / path.removeprefix("/tls/")
            assert local.is_file(), f"{name}: {path} is not written by the certs job"


def _check_prefixed_keys(env: dict[str, str], prefix: str, fields: set[str]) -> None:
    for key in env:
        if key.startswith(prefix):
            field = key.removeprefix(prefix).split("__")[0].lower()
            assert field in fields, f"{key}: no settings field {field!r} (would be ignored)"


def test_cloud_settings_load_from_the_container_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cloud.healthcheck import _parser
    from cloud.settings import CloudSettings

    env = service_env("cloud", "cloud")
    _check_prefixed_keys(env, "CDCA_CLOUD_", set(CloudSettings.model_fields))
    for key in [k for k in os.environ if k.startswith("CDCA_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings(CloudSettings)
    assert settings.tls is not None and not settings.insecure
    assert settings.tls.client_ca_file is not None  # mutual TLS
    assert settings.enrollment_secret.get_secret_value() == SECRET
    mnt = mounts(model()["services"]["cloud"])
    assert str(settings.data_dir) in mnt and not mnt[str(settings.data_dir)].get("read_only")
    port = settings.listen_address.rsplit(":", 1)[1]
    published = model()["services"]["cloud"]["ports"][0]
    assert str(published["target"]) == port
    probe = _parser(env).parse_args([])
    assert probe.address == f"127.0.0.1:{port}" and probe.cert_file is not None


@pytest.mark.parametrize("name", ["device-lowlight", "device-colorcast"])
def test_device_settings_load_from_the_container_environment(
    name: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cloud.healthcheck import _parser
    from device.settings import DeviceSettings
    from shared.media.procedural import DOMAINS

    env = service_env(name, "device")
    _check_prefixed_keys(env, "CDCA_DEVICE_", set(DeviceSettings.model_fields))
    for key in [k for k in os.environ if k.startswith("CDCA_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings(DeviceSettings)
    assert len(settings.input.domains) == 1
    assert settings.input.domains[0] in set(DOMAINS) - {"source"}  # a shifted camera domain
    assert settings.tls is not None and settings.tls.cert_file is not None
    # Its client certificate is the one issued for its own device id.
    assert settings.tls.cert_file.name == certs.client_files(settings.device_id)[0]
    assert settings.tls.key_file is not None
    assert settings.tls.key_file.name == certs.client_files(settings.device_id)[1]
    mnt = mounts(model()["services"][name])
    assert str(settings.data_dir) in mnt and not mnt[str(settings.data_dir)].get("read_only")
    host, port = settings.cloud_address.rsplit(":", 1)
    assert host in model()["services"]
    cloud_env = service_env(host, "cloud")
    assert cloud_env["CDCA_CLOUD_LISTEN_ADDRESS"].rsplit(":", 1)[1] == port
    probe = _parser(env).parse_args([])
    assert probe.address == settings.cloud_address
    assert (probe.cert_file, probe.key_file) == (settings.tls.cert_file, settings.tls.key_file)
    # The device ids in the compose file are the clients the certs job issues for.
    assert f"--client {settings.device_id}" in " ".join(model()["services"]["certs"]["command"])


def test_the_zoo_job_publishes_where_the_devices_load_from() -> None:
    from shared.models import zoo

    services = model()["services"]
    job = services["zoo"]
    argv = job["command"]
    assert argv[:4] == ["python", "-m", "cloud.zoo", "train"] and "--commit" in argv
    name = argv[argv.index("--zoo") + 1]
    zoo.zoo_config(name)  # a zoo of that name exists
    (target, mount), = mounts(job).items()
    assert mount["source"] == "models" and not mount.get("read_only")
    # --commit copies to <repo>/zoo/<name>; the images install the tree in place at /opt/cdca.
    for dockerfile in DOCKERFILES.values():
        steps = instructions(dockerfile)
        install = next(i for i, (w, r) in enumerate(steps) if w == "RUN" and "pip install" in r)
        workdir = [r for w, r in steps[:install] if w == "WORKDIR"][-1]
        assert shlex.split(steps[install][1])[-2:] == ["-e", "."]
        assert Path(workdir) / zoo.COMMITTED.relative_to(zoo.REPO_ROOT) == Path(target)
    cache = Path(argv[argv.index("--cache-dir") + 1])
    assert cache.is_relative_to(target), "the training cache must persist in the volume"
    for device in ("device-lowlight", "device-colorcast"):
        svc = services[device]
        assert mounts(svc)[target]["source"] == "models"
        assert mounts(svc)[target].get("read_only")
        ckpt = svc["environment"]["CDCA_DEVICE_MODEL__CHECKPOINT_DIR"]
        assert Path(ckpt) == Path(target) / name / "student"


def test_the_copied_files_are_enough_to_build_the_project(tmp_path: Path) -> None:
    # What the images' COPY lines bring into /opt/cdca, built offline into a wheel.
    context = tmp_path / "opt-cdca"
    steps = instructions(DOCKERFILES["cloud"])
    for word, rest in steps:
        if word == "COPY":
            *sources, _dest = shlex.split(rest)
            for src in sources:
                if (ROOT / src).is_dir():
                    shutil.copytree(ROOT / src, context / src,
                                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                else:
                    context.mkdir(exist_ok=True)
                    shutil.copy2(ROOT / src, context / src)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "-w", str(tmp_path / "dist"), str(context)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PIP_NO_INPUT": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("cdca-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    for module in ("shared/certs.py", "cloud/healthcheck.py", "cloud/__main__.py",
                   "device/__main__.py"):
        assert module in names
    for script in _scripts():
        assert f"{script} = " in entry_points
