"""Domains on every slide at hand, large and small: the model-free path against the joint embedding, over seeds.

Usage: python benchmarks/domains_slides.py [SLIDE ...] [--seeds 0 1 2 3 4] [--init-seeds] [--no-image SLIDE ...]
                                           [--out benchmarks/results/domains_slides]
       python benchmarks/domains_slides.py --from-json A.json B.json --out ...   (merge runs made side by side)

Slides (names; the data are in ../shared/data beside the repository):

- ``151673``, ``151674``: DLPFC Visium sections, labels ``obs["layer"]`` (7);
- ``grid151673``, ``grid151674``: the same sections in legacy-ST geometry: spots summed onto a 200 um square grid,
  100 um spots, the layer by majority (725 / 741 spots, 7 layers);
- ``HER2ST_B4``, ``HER2ST_C2`` ... ``HER2ST_C6``: legacy-ST HER2+ breast sections (178-283 spots); their
  ``obs["cluster_label"]`` are the authors' expression clusters, not pathologist labels: the ARI against them is a
  description, seed-to-seed agreement is the measure;
- ``MOB1`` ... ``MOB4``: legacy-ST mouse olfactory bulb sections (379-438 spots, no labels, 5 domains): seed-to-seed
  agreement only;
- ``q151673_0`` ... ``q151673_3``, ``q151674_0`` ... ``q151674_3`` (not run by default): the quadrants of each DLPFC
  section, cut at the median x and y (about 900 spots each, Visium geometry), as many domains as layers with at least
  20 spots in the quadrant (3-6): small Visium slides with real labels, the model retrained on each.

Legacy-ST slides get ``metadata["spot_diameter_um"] = 100``. For each slide and seed, with package defaults and the
number of domains set to the number of labels: ``tl.domains`` model-free (``use_rep="expression_pca"``); ``tl.train`` +
``tl.embed``; ``tl.domains`` after embed (the joint, the default); each latent alone; three other candidates for
the default after embed (``_candidates.py``: the fused latent alone, ``[expression, fused]``, the joint with its skip
at half weight); the scanpy workflow on the joint (neighbors + leiden at the resolution giving the number of
domains). ``--init-seeds`` also trains with
``init_seed=None`` (the starting weights drawn from the seed too): the spread over starting weights. ``--no-image``
runs the listed slides with their image removed (an expression-only model). Metric: adjusted Rand index against the
labels (unlabelled spots ignored); seed-to-seed = mean ARI between the domains of every pair of seeds. Prints one
JSON record per slide, method and seed; writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

import histoclip as hc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _candidates import candidate_domains, seed_to_seed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DEFAULT = ["151673", "151674", "grid151673", "grid151674", "HER2ST_B4", "HER2ST_C2", "HER2ST_C3", "HER2ST_C4",
           "HER2ST_C5", "HER2ST_C6", "MOB1", "MOB2", "MOB3", "MOB4"]


def dlpfc(section: str) -> ad.AnnData:
    a = ad.read_h5ad(DATA / "dlpfc" / f"DLPFC_{section}.h5ad")
    if "gene_symbol" in a.var:
        a.var_names = a.var["gene_symbol"].astype(str).to_numpy()
        a.var_names_make_unique()
    return a


def legacy_grid(a: ad.AnnData, label: str = "layer", spacing_um: float = 200.0, spot_um: float = 100.0):
    """A Visium slide in legacy-ST geometry: counts summed over each ``spacing_um`` square, label by majority."""
    lib = next(iter(a.uns["spatial"]))
    sf = a.uns["spatial"][lib]["scalefactors"]
    um_px = 65.0 / sf["spot_diameter_fullres"]  # Space Ranger's spot_diameter_fullres spans 65 um
    xy = np.asarray(a.obsm["spatial"], float) * um_px
    cell = np.floor((xy - xy.min(0)) / spacing_um).astype(np.int64)
    codes, uniq = pd.factorize(cell[:, 0] * 1_000_000 + cell[:, 1])
    n = len(uniq)
    member = sp.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(n, len(codes)))
    out = ad.AnnData((member @ sp.csr_matrix(a.X)).astype(np.float32), var=a.var.copy())
    out.obs_names = [f"g{i}" for i in range(n)]
    labels = pd.Series(a.obs[label].astype(object).to_numpy())
    majority = [labels[codes == i].dropna().mode() for i in range(n)]
    out.obs[label] = pd.Categorical([m.iloc[0] if len(m) else np.nan for m in majority])
    centre = (np.c_[uniq // 1_000_000, uniq % 1_000_000] + 0.5) * spacing_um + xy.min(0)
    out.obsm["spatial"] = centre / um_px
    entry = a.uns["spatial"][lib]
    scalefactors = {k: v for k, v in sf.items() if k != "fiducial_diameter_fullres"}
    scalefactors["spot_diameter_fullres"] = spot_um / um_px
    out.uns["spatial"] = {f"{lib}_grid": {"images": entry["images"], "scalefactors": scalefactors,
                                          "metadata": {**dict(entry.get("metadata", {})), "spot_diameter_um": spot_um}}}
    return out


def quadrant(a: ad.AnnData, q: int, label: str = "layer") -> tuple[ad.AnnData, int]:
    """Quadrant ``q`` (0-3) of a slide, cut at the median x and y, and its number of layers with >= 20 spots."""
    xy = np.asarray(a.obsm["spatial"], float)
    right, top = divmod(int(q), 2)
    sel = ((xy[:, 0] > np.median(xy[:, 0])) == bool(right)) & ((xy[:, 1] > np.median(xy[:, 1])) == bool(top))
    out = a[sel].copy()
    counts = out.obs[label].value_counts()
    return out, int((counts >= 20).sum())


def legacy(path: Path) -> ad.AnnData:
    a = ad.read_h5ad(path)
    lib = next(iter(a.uns["spatial"]))
    a.uns["spatial"][lib]["metadata"] = {**dict(a.uns["spatial"][lib].get("metadata", {})), "spot_diameter_um": 100.0}
    return a


def load(name: str) -> tuple[ad.AnnData, str | None, int]:
    """A slide, its label column (None: unlabelled) and its number of domains."""
    if name in ("151673", "151674"):
        return dlpfc(name), "layer", 7
    if name.startswith("q"):
        section, q = name[1:].split("_")
        a, k = quadrant(dlpfc(section), int(q))
        return a, "layer", k
    if name.startswith("grid"):
        return legacy_grid(dlpfc(name[4:])), "layer", 7
    if name.startswith("HER2ST"):
        a = legacy(DATA / "her2st" / f"{name}.h5ad")
        return a, "cluster_label", int(a.obs["cluster_label"].nunique())
    if name.startswith("MOB"):
        return legacy(DATA / "stutility_mob" / f"STUtility_{name}.h5ad"), None, 5
    raise KeyError(f"unknown slide {name!r}")


def without_image(a: ad.AnnData) -> ad.AnnData:
    a = a.copy()
    for entry in a.uns["spatial"].values():
        entry.pop("images", None)
        entry.get("metadata", {}).pop("fullres_image", None)
    return a


def run_slide(name: str, seeds: list[int], init_seeds: bool, no_image: bool, records: list[dict]) -> None:
    a0, label, k = load(name)
    if no_image:
        a0 = without_image(a0)
    else:
        hc.pp.extract_patches(a0)
    slide = f"{name} (no image)" if no_image else name

    def rec(method, seed, labels, seconds):
        r = {"slide": slide, "method": method, "seed": seed, "labels": [str(v) for v in labels],
             "wall_s": round(seconds, 2), "loadavg_1min": round(os.getloadavg()[0], 2)}
        if label is not None:
            r["ari"] = hc.metrics.adjusted_rand(a0.obs[label], labels)
        records.append(r)
        print(json.dumps({kk: v for kk, v in r.items() if kk != "labels"}), flush=True)

    for seed in seeds:
        a = a0.copy()
        t = time.perf_counter()
        hc.tl.domains(a, n_domains=k, use_rep="expression_pca", rng=seed)
        rec("model-free (tl.domains without a model)", seed, a.obs["histoclip_domain"], time.perf_counter() - t)
        runs = [("", {})] + ([(" [starting weights from the seed: init_seed=None]", {"init_seed": None})]
                             if init_seeds else [])
        for suffix, kw in runs:
            b = a.copy()
            t = time.perf_counter()
            model = hc.tl.train(b, rng=seed, **kw)
            hc.tl.embed(b, model)
            hc.tl.domains(b, n_domains=k, rng=seed)  # the default after embed: the joint embedding
            rec(f"joint X_histoclip (tl.domains after tl.embed){suffix}", seed, b.obs["histoclip_domain"],
                time.perf_counter() - t)
            if suffix:
                continue
            for rep in ("X_histoclip_expression", "X_histoclip_image"):
                if rep in b.obsm:
                    t = time.perf_counter()
                    hc.tl.domains(b, n_domains=k, use_rep=rep, rng=seed)
                    rec(f"{rep} alone", seed, b.obs["histoclip_domain"], time.perf_counter() - t)
            for description, labels, seconds in candidate_domains(b, model, n_domains=k, seed=seed):
                rec(f"candidate: {description}", seed, labels, seconds)
            t = time.perf_counter()
            hc.tl.domains(b, n_domains=k, use_rep="X_histoclip", method="leiden", radius_um=0, n_pcs=None, rng=seed)
            rec("scanpy workflow on the joint (neighbors + leiden)", seed, b.obs["histoclip_domain"],
                time.perf_counter() - t)


def summarise(records: list[dict]) -> pd.DataFrame:
    rows = []
    df = pd.DataFrame(records)
    for (slide, method), g in df.groupby(["slide", "method"], sort=False):
        ari = g["ari"] if "ari" in g and g["ari"].notna().any() else pd.Series(dtype=float)
        rows.append({"slide": slide, "method": method, "ari_mean": ari.mean(), "ari_sd": ari.std(),
                     "seed_to_seed": seed_to_seed(list(g["labels"])), "wall_s": g["wall_s"].mean(),
                     "seeds": len(g)})
    return pd.DataFrame(rows)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("slides", nargs="*", default=DEFAULT)
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    p.add_argument("--init-seeds", action="store_true", help="also train with init_seed=None")
    p.add_argument("--no-image", nargs="*", default=[], help="slides to run again without their image")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "domains_slides"))
    p.add_argument("--from-json", nargs="*", default=[])
    args = p.parse_args()
    hc.settings.progress = False
    records, loads = [], []
    for f in args.from_json:
        run = json.loads(Path(f).read_text())
        records += run["records"]
        loads.append(run["loadavg_at_start"])
    if not args.from_json:
        loads.append(os.getloadavg())
        for name in args.slides:
            run_slide(name, args.seeds, args.init_seeds, False, records)
        for name in args.no_image:
            run_slide(name, args.seeds, False, True, records)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"loadavg_at_start": max(loads), "records": records}))
    summary = summarise(records)
    peak_load = max([max(loads)[0]] + [r["loadavg_1min"] for r in records if "loadavg_1min" in r])
    print(summary.round(3).to_string())
    lines = ["# Domains on every slide: model-free path and joint embedding", "",
             "Package defaults; as many domains as labels (on a DLPFC quadrant, layers with at least 20 spots there; 5 "
             "on the unlabelled olfactory bulb sections). ARI against "
             "the labels, unlabelled spots ignored (HER2ST: the authors' expression clusters, a description only); "
             "seed-to-seed: mean ARI between the domains of every pair of seeds (the seed drives the training noise "
             "and the clustering; the starting weights are fixed, `init_seed=0`, unless a row says otherwise). Wall "
             "time: train + embed + domains (model-free: domains) per seed, one thread, on the "
             f"2-core CPU shared with other jobs (1-min load up to {peak_load:.1f}, at the start or any record). "
             "Produced by `benchmarks/domains_slides.py`.", "",
             "| slide | method | ARI mean | ARI sd | seed-to-seed | wall s | seeds |", "|---|---|---|---|---|---|---|"]
    for r in summary.itertuples():
        lines.append(f"| {r.slide} | {r.method} | {r.ari_mean:.3f} | {r.ari_sd:.3f} | {r.seed_to_seed:.3f} | "
                     f"{r.wall_s:.1f} | {r.seeds} |".replace("nan", "-"))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
