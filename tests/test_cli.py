import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_and_writes_outputs(tmp_path):
    out = tmp_path / "res"
    proc = subprocess.run(
        [sys.executable, "-m", "histoclip", "demo", "--outdir", str(out), "--epochs", "1", "--no-progress"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ARI against the manual layers" in proc.stdout
    result = json.loads((out / "demo_result.json").read_text())
    assert 0 <= result["ari"] <= 1
    assert (out / "dlpfc_151673_histoclip.h5ad").stat().st_size > 1e6
    assert (out / "dlpfc_151673_domains.png").stat().st_size > 1e4
    assert (out / "model" / "model.safetensors").is_file()


def test_cli_requires_a_command():
    proc = subprocess.run([sys.executable, "-m", "histoclip"], capture_output=True, text=True)
    assert proc.returncode != 0 and "demo" in proc.stderr
