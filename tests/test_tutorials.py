"""Every notebook in tutorials/ runs top to bottom (quick settings), offline, without touching its committed outputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TUTORIALS = REPO / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))

# the notebooks that read the HER2ST registry (the others use only the data bundled with the package, so they run on a
# machine without the shared data folder)
NEEDS_HER2ST = {"prediction_her2st.ipynb"}


def test_there_are_tutorials():
    assert {p.name for p in NOTEBOOKS} >= {"domains_dlpfc.ipynb", "prediction_her2st.ipynb", "spatialdata.ipynb",
                                         "several_sections_dlpfc.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_tutorial_runs(path, tmp_path, monkeypatch, request):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

    copy = tmp_path / path.name
    shutil.copyfile(path, copy)  # executed and saved here, never over the committed notebook
    monkeypatch.setenv("HISTOCLIP_TUTORIAL_QUICK", "1")
    # HER2ST: a dataset folder holding the raw files in pooch's layout, so hc.datasets.her2st() never downloads;
    # the other notebooks read only data bundled with the package and get an empty folder
    datadir = request.getfixturevalue("her2st_data_root") if path.name in NEEDS_HER2ST else tmp_path / "data"
    monkeypatch.setenv("HISTOCLIP_DATA", str(datadir))
    monkeypatch.setenv("HISTOCLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MPLBACKEND", "agg")
    nb = nbformat.read(copy, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        # relative paths in a notebook (e.g. the Visium folder) are relative to tutorials/, as for a user
        resources={"metadata": {"path": str(TUTORIALS)}},
    )
    try:
        client.execute()  # raises CellExecutionError on the first cell that errors
    finally:
        nbformat.write(nb, copy)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
