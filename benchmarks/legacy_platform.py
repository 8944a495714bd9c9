"""Model-free domains on legacy-ST geometry, with the spot read as Visium's 65 um (before platform inference) and as
inferred from the lattice (after).

Usage: python benchmarks/legacy_platform.py [--seeds 0 1 2] [--out benchmarks/results/legacy_platform]

Slides: DLPFC 151673 aggregated onto a 200 um square grid (``_legacy_grid.legacy_grid``: labels by majority, image
kept; scored against ``obs["layer"]``, unlabelled grid spots ignored); the four STUtility mouse olfactory bulb
sections as shipped (no labels), and the same sections with ``obsm["spatial"]`` in microns and
``spot_diameter_fullres = 100`` (the layout of the held-out olfactory bulb slide: nothing else says legacy ST).
"Before" passes ``spot_diameter_um=65``, which is what histoclip read from such a slide before the platform was
inferred; "after" passes nothing; two more rows keep the inferred geometry with a wider smoothing radius (250 um:
legacy ST's first ring, the same graph "before" used; 300 um: with the diagonal neighbours).
``hc.tl.domains(adata, n_domains=7, method=..., rng=seed)``, everything else default.
For the unlabelled sections: seed-to-seed ARI (mean over pairs of seeds) and the ARI between before and after.
Prints one JSON record per run; writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from sklearn.metrics import adjusted_rand_score

import histoclip as hc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _legacy_grid import fullres_um_per_px, legacy_grid  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
METHODS = ("gmm", "leiden", "kmeans")


def in_microns(adata: ad.AnnData) -> ad.AnnData:
    """The section with obsm['spatial'] in microns, spot_diameter_fullres = 100 and no image: nothing says ST."""
    um = fullres_um_per_px(adata)
    out = ad.AnnData(adata.X.copy(), obs=adata.obs[[]].copy(), var=adata.var[[]].copy())
    out.obsm["spatial"] = np.asarray(adata.obsm["spatial"], dtype=np.float64) * um
    out.uns["spatial"] = {"lib": {"scalefactors": {"spot_diameter_fullres": 100.0}, "metadata": {}}}
    return out


def slides() -> dict[str, tuple[ad.AnnData, str | None]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dlpfc = ad.read_h5ad(DATA / "dlpfc" / "DLPFC_151673.h5ad")
        out = {"DLPFC 151673 on a 200 um grid": (legacy_grid(dlpfc, label_key="layer"), "layer")}
        for i in range(1, 5):
            mob = ad.read_h5ad(DATA / "stutility_mob" / f"STUtility_MOB{i}.h5ad")
            out[f"MOB{i}"] = (mob, None)
            out[f"MOB{i} in microns, spot_diameter_fullres=100"] = (in_microns(mob), None)
    return out


#: (name, spot_diameter_um, radius_um): the spot as read before, as inferred, and as inferred with a smoothing radius
#: that reaches legacy ST's first ring (200 um; 250 um: the same graph "before" gave at 150 um on 130 um spacing) and
#: its diagonal neighbours too (300 um)
VARIANTS = (("before", 65.0, 150.0), ("after", None, 150.0), ("after, radius_um=250", None, 250.0),
            ("after, radius_um=300", None, 300.0))


def run(adata: ad.AnnData, method: str, seed: int, spot: float | None, radius: float) -> tuple[np.ndarray, float, str]:
    a = adata.copy()
    t0 = time.perf_counter()
    hc.tl.domains(a, n_domains=7, method=method, rng=seed, spot_diameter_um=spot, radius_um=radius)
    platform = ",".join(a.uns["histoclip"]["params"]["domains"]["platform"].values())
    return a.obs["histoclip_domain"].astype(str).to_numpy(), time.perf_counter() - t0, platform


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "legacy_platform"))
    p.add_argument("--from-json", help="only rewrite <out>.md from this JSON")
    args = p.parse_args()
    if args.from_json:
        Path(args.out + ".md").write_text(table(json.loads(Path(args.from_json).read_text())))
        return
    logging.getLogger("histoclip").setLevel(logging.ERROR)
    records = []
    for name, (adata, label) in slides().items():
        truth = adata.obs[label].astype(object).to_numpy() if label else None
        ok = pd.notna(truth) if truth is not None else None
        for method in METHODS:
            labels = {}
            for when, spot, radius in VARIANTS:
                for seed in args.seeds:
                    lab, secs, platform = run(adata, method, seed, spot, radius)
                    labels[when, seed] = lab
                    rec = {"slide": name, "method": method, "when": when, "seed": seed, "n_spots": adata.n_obs,
                           "platform": platform, "seconds": round(secs, 2)}
                    if truth is not None:
                        rec["ari"] = round(float(adjusted_rand_score(truth[ok], lab[ok])), 4)
                    records.append(rec)
                    print(json.dumps(rec), flush=True)
            for when, _, _ in VARIANTS:
                pairs = [adjusted_rand_score(labels[when, s], labels[when, t])
                         for s, t in itertools.combinations(args.seeds, 2)]
                s2s = round(float(np.mean(pairs)), 4) if pairs else None
                rec = {"slide": name, "method": method, "when": when, "seed_to_seed_ari": s2s}
                records.append(rec)
                print(json.dumps(rec), flush=True)
            rec = {"slide": name, "method": method, "before_vs_after_ari": round(float(np.mean(
                [adjusted_rand_score(labels["before", s], labels["after", s]) for s in args.seeds])), 4)}
            records.append(rec)
            print(json.dumps(rec), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(records, indent=1))
    Path(args.out + ".md").write_text(table(records))


def table(records: list[dict]) -> str:
    df = pd.DataFrame(records)
    whens = [w for w, _, _ in VARIANTS]
    head = " | ".join(f"{w}: ARI (sd) / seed-to-seed" for w in whens)
    lines = [f"| slide | method | {head} | before vs after |", "|---|---|" + "---|" * len(whens) + "---|"]
    for (slide, method), g in df.groupby(["slide", "method"], sort=False):
        cells = []
        for when in whens:
            r = g[(g["when"] == when) & g["seed"].notna()]
            s2s = g.loc[(g["when"] == when) & g["seed_to_seed_ari"].notna(), "seed_to_seed_ari"]
            ari = (f"{r['ari'].mean():.3f} ({r['ari'].std(ddof=0):.3f})" if "ari" in r and r["ari"].notna().any()
                   else "-")
            cells.append(f"{ari} / {s2s.iloc[0]:.2f}" if len(s2s) else ari)
        ba = g["before_vs_after_ari"].dropna()
        tail = f" | {ba.iloc[0]:.2f} |" if len(ba) else " | |"
        lines.append(f"| {slide} | {method} | " + " | ".join(cells) + tail)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
