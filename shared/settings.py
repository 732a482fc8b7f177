"""Process settings: pydantic-settings models read from an optional TOML file plus environment.

Settings are built once in each process's `main()` and passed down; nothing below `main()` reads
the environment. Environment variables override the TOML file; unknown keys are errors.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from shared.errors import ConfigError

S = TypeVar("S", bound="CdcaSettings")


class CdcaSettings(BaseSettings):
    """Base for the per-process settings: environment first, then the TOML file's values."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init kwargs carry the TOML file; the environment must win over it.
        return (env_settings, init_settings)


def _describe(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "<root>"
    value = first.get("input")
    shown = "<missing>" if first["type"] == "missing" else repr(value)
    if isinstance(value, dict):
        shown = "{...}"
    more = f" (+{error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{source}: field `{field}`: {first['msg']}; got {shown}{more}"


def load_settings(cls: type[S], toml_path: str | Path | None = None, **overrides: Any) -> S:
    """Build settings `cls` from an optional TOML file, the environment and explicit overrides.

    Raises:
        ConfigError: one line naming the file/field, the problem and the value.
    """
    data: dict[str, Any] = {}
    source = "settings"
    if toml_path is not None:
        path = Path(toml_path)
        source = str(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    data.update(overrides)
    try:
        return cls(**data)
    except ValidationError as e:
        raise ConfigError(_describe(e, source)) from None
