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
    assert 0 <= result["ari"] <= 1 and -1 <= result["ari_model_free"] <= 1
    assert 0 <= result["image_weight_mean"] <= 1
    assert (out / "dlpfc_151673_histoclip.h5ad").stat().st_size > 1e6
    assert (out / "dlpfc_151673_domains.png").stat().st_size > 1e4
    assert (out / "model" / "model.safetensors").is_file()


def test_cli_requires_a_command():
    proc = subprocess.run([sys.executable, "-m", "histoclip"], capture_output=True, text=True)
    assert proc.returncode != 0 and "demo" in proc.stderr


HEAVY = ("torch", "scanpy", "anndata", "matplotlib", "squidpy", "spatialdata")


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"]], ids=["help", "demo-help"])
def test_cli_help_does_not_import_the_stack(argv):
    """`histoclip --help` answers without loading torch/scanpy (they took 6-20 s to import on a busy machine)."""
    code = (
        "import sys, runpy\n"
        f"sys.argv = ['histoclip', *{argv!r}]\n"
        "try:\n"
        "    runpy.run_module('histoclip', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        f"print('LOADED', [m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: histoclip" in proc.stdout
    assert "LOADED []" in proc.stdout, proc.stdout[-500:]


def test_package_imports_submodules_on_first_use():
    code = (
        "import sys, histoclip as hc\n"
        "assert 'torch' not in sys.modules and 'anndata' not in sys.modules\n"
        "assert hc.settings.progress in (True, False) and hc.Key.obsm.joint == 'X_histoclip'\n"
        "from histoclip import HistoCLIP\n"
        "assert 'torch' in sys.modules and HistoCLIP.__name__ == 'HistoCLIP'\n"
        "assert callable(hc.pp.extract_patches) and callable(hc.tl.train) and callable(hc.datasets.toy)\n"
        "assert {'pp', 'tl', 'pl', 'HistoCLIP'} <= set(dir(hc))\n"
        "try:\n"
        "    hc.nonexistent\n"
        "except AttributeError as e:\n"
        "    assert 'nonexistent' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
        "print('OK')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]
