from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import histoclip as hc

hc.settings.progress = False
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_her2st_file(rel: str) -> Path:
    """Where the shared data folder keeps the file of a HER2ST registry entry (``rel``: its path in pooch's cache)."""
    name = Path(rel).name
    root = SHARED / "her2st"
    if "ST-imgs" in rel:
        return root / "images" / f"{rel.split('/')[3]}_{name}"
    return root / "raw" / ("ST-cnts" if "ST-cnts" in rel else "ST-spotfiles") / name


@pytest.fixture(scope="session")
def her2st_data_root(tmp_path_factory) -> Path:
    """A data folder with every HER2ST registry file in pooch's layout (``root/her2st/<rel>``): no download."""
    from histoclip.datasets._her2st import REGISTRY

    if not (SHARED / "her2st" / "raw").is_dir():
        pytest.skip(f"shared HER2ST raw files not found under {SHARED}")
    root = tmp_path_factory.mktemp("histoclip_data")
    for rel in REGISTRY:
        dst = root / "her2st" / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared_her2st_file(rel), dst)
    return root


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread: tiny models train many times faster than with threads spinning on shared cores."""
    import torch

    n, jobs = torch.get_num_threads(), hc.settings._n_jobs
    torch.set_num_threads(1)
    hc.settings.n_jobs = 1  # training and embedding set torch's threads from this
    yield
    torch.set_num_threads(n)
    hc.settings.n_jobs = jobs


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setattr(hc.settings, "cachedir", tmp_path_factory.getbasetemp() / "image_cache")


@pytest.fixture
def toy():
    """A fresh seeded toy slide (256 spots, 60 genes, uint8 hires image)."""
    return hc.datasets.toy(rng=0)


@pytest.fixture
def toy_patched(toy):
    hc.pp.extract_patches(toy, size_um=110)
    return toy


@pytest.fixture(scope="session")
def trained():
    """A tiny model trained for two epochs on the toy slide, and the slide with its patches."""
    adata = hc.datasets.toy(rng=0)
    hc.pp.extract_patches(adata, size_um=110)
    model = hc.tl.train(adata, max_epochs=2, n_genes=40, rng=0, batch_size=64, accelerator="cpu")
    return model, adata


def toy_spatialdata(adata=None):
    """The toy slide as a SpatialData object: hires image, spot circles and a linked table."""
    import geopandas as gpd
    from shapely.geometry import Point
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    adata = hc.datasets.toy(rng=0) if adata is None else adata
    lib = adata.uns["spatial"]["toy"]
    scalef = lib["scalefactors"]["tissue_hires_scalef"]
    img = np.moveaxis(lib["images"]["hires"], -1, 0)
    image = Image2DModel.parse(img, dims=("c", "y", "x"),
                               transformations={"global": Scale([1 / scalef, 1 / scalef], axes=("y", "x"))})
    xy = adata.obsm["spatial"]
    gdf = gpd.GeoDataFrame({"geometry": [Point(x, y) for x, y in xy],
                            "radius": np.full(len(xy), lib["scalefactors"]["spot_diameter_fullres"] / 2)},
                           index=np.arange(len(xy)))
    shapes = ShapesModel.parse(gdf, transformations={"global": Identity()})
    table = adata.copy()
    del table.uns["spatial"]
    table.obs["region"] = "spots"
    table.obs["region"] = table.obs["region"].astype("category")
    table.obs["spot_id"] = np.arange(table.n_obs)
    table = TableModel.parse(table, region="spots", region_key="region", instance_key="spot_id")
    return SpatialData(images={"he": image}, shapes={"spots": shapes}, tables={"table": table})


@pytest.fixture
def toy_sdata():
    return toy_spatialdata()


@pytest.fixture
def visium_folder():
    path = SHARED / "toy" / "scanpy_visium_data" / "1.0.0"
    if not path.is_dir():
        pytest.skip(f"shared test data not found at {path}")
    return path
