"""`python -m demo --quick`: the real cloud-server and two device-agents over mutual TLS complete
an adaptation round (upload -> distil -> DWC update -> verify -> apply -> probe), exit cleanly,
and the report's numbers are consistent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT, subprocess_env

pytestmark = pytest.mark.integration


def test_quick_demo_adapts_both_devices_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "demo", "--quick", "--workdir", str(tmp_path / "work"),
         "--report-dir", str(out)],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((out / "demo.json").read_text())
    assert result["cloud_exit_code"] == 0
    for device, codes in result["device_exit_codes"].items():
        assert [c["command"] for c in codes][0] == "register", device
        assert all(c["exit_code"] == 0 for c in codes), codes
    assert (out / "report.md").read_text().startswith("# CDCA demo")
    for png in ("accuracy.png", "bytes.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    rounds = [r for r in result["rows"] if r["round"] >= 1]
    assert {r["device"] for r in rounds} == set(result["devices"])
    for r in rounds:
        assert r["samples_seen"] > 0
        assert r["uploaded_samples"] > 0 and r["uplink_bytes"] > 0
        assert r["uplink_bytes"] < r["raw_frame_bytes"]  # selected tokens, not frames
        # every round delivers an update; the device's probe may roll it back (then v0 stays)
        assert r["updates_applied"] + r["rollbacks"] >= 1 and r["rejected"] == 0
        assert r["downlink_bytes"] > 0
        assert (r["adapter_version"] >= 1) == (r["updates_applied"] >= 1)
        assert 0.0 <= r["acc_shifted"] <= 1.0 and 0.0 <= r["acc_source"] <= 1.0
    refs = result["references"]
    assert set(refs) == {"teacher", "student"}
    assert set(refs["teacher"]) == set(result["eval_domains"]) == {"source", "low_light",
                                                                  "color_cast"}
    base = [r for r in result["rows"] if r["round"] == 0]
    assert all(r["acc_source"] == refs["student"]["source"] for r in base)
