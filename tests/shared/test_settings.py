"""Settings: TOML + environment, with one-line errors naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud.settings import CloudSettings
from shared.errors import ConfigError
from shared.settings import load_settings
from tests.support import write_toml


def test_toml_then_environment_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write_toml(tmp_path / "c.toml", {"data_dir": str(tmp_path), "enrollment_secret": "s",
                                           "grace_s": 3.0})
    monkeypatch.setenv("CDCA_CLOUD_GRACE_S", "7")
    s = load_settings(CloudSettings, cfg)
    assert s.grace_s == 7.0 and s.data_dir == tmp_path


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"enrollment_secret": "s", "data_dir": "/x", "bogus": 1}, "bogus"),
        ({"enrollment_secret": "s", "data_dir": "/x", "grace_s": "soon"}, "grace_s"),
        ({"data_dir": "/x"}, "enrollment_secret"),
        ({"enrollment_secret": "s", "data_dir": "/x", "tls": {"cert_file": "a"}}, "tls.key_file"),
    ],
)
def test_bad_config_names_the_field(tmp_path: Path, values: dict, field: str) -> None:
    cfg = write_toml(tmp_path / "c.toml", values)
    with pytest.raises(ConfigError, match=f"`{field}`") as e:
        load_settings(CloudSettings, cfg)
    assert "\n" not in str(e.value)


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(CloudSettings, tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("a = = 1")
    with pytest.raises(ConfigError, match="TOML"):
        load_settings(CloudSettings, tmp_path / "bad.toml")
