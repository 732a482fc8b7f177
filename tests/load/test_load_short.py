"""A short run of bench/load.py: 100 devices against the real cloud-server, nothing lost."""

from __future__ import annotations

import pytest

from bench.load import run

pytestmark = pytest.mark.integration


def test_hundred_devices_upload_concurrently_and_nothing_is_lost() -> None:
    result = run(devices=100, duration_s=5.0)
    assert result["uploads_acked"] >= 100  # every device got at least one receipt on average
    assert result["lost"] == 0 and result["stored_duplicates"] == 0
    assert result["samples_stored"] == result["samples_acked"]
    assert result["server_exit_code"] == 0
    assert not result["errors"], result["errors"]
