"""Does the trained image branch keep what frozen pretrained features carry? HER2ST, patient-level split.

    OMP_NUM_THREADS=1 python benchmarks/image_probe.py [--seeds 0 1 2] [--skip-domains]

Three ways to build the image branch of ``hc.tl.train`` on legacy-ST sections with a full-resolution H&E
(~0.69 um/px, a 100 um spot is ~146 px):

- ``cnn, hires``: the default, the small CNN trained from scratch on patches of the 2000 px ``hires`` image
  (~3.4 um/px) stored in the AnnData;
- ``cnn, full-res``: the same CNN on patches cut from the full-resolution JPG (``hc.io.set_fullres_image``);
- ``frozen features``: frozen ImageNet EfficientNet-Lite0 features (1752) of Macenko-normalised 100 um full-resolution
  patches (``hc.tl.image_features(..., stain_norm="macenko", tta=False)``), the model training only its heads on
  them (``image_features_key=``).

**Probe** (what the image representation says about expression in a patient it never saw). Folds: train on patient
C's five sections and test on patient B's B4, and train on B4 and test on each of C2-C6. Targets: the first 10
principal components of log1p(CP10k) expression over the 1000 most variable genes (genes present in every section;
variance and PCA fitted on the training sections only). A ridge regression (penalty by leave-one-out CV over
1e-2..1e5) maps a representation to the 10 targets; each representation is z-scored per section (the training and
the held-out sections alike), as the package's regression head does. Metric: the Pearson r between predicted and
measured scores of each component over the held-out section's spots, averaged over the 10 components (and over the
five held-out sections of B4 -> C). Rows: the frozen features themselves (all 1752, and their PCA 32, the width of
the trained latent) and the image latent ``obsm["X_histoclip_image"]`` of a model trained on the training sections
with each branch (the held-out section embedded with that model, ``modality="image"``), seeds as given.

**Domains** (``--skip-domains`` to leave out): each section alone, ``tl.train`` + ``tl.embed`` + ``tl.domains`` with
the number of the authors' expression clusters (``obs["cluster_label"]``, not pathologist labels: a description,
spots without a label ignored), per branch and seed: ARI of the joint domains, of the image latent's domains, the
model-free path's for reference, seed-to-seed ARI of the joint domains, the mean image weight and the wall time.

Writes benchmarks/results/image_probe.json and image_probe.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from itertools import combinations
from pathlib import Path

import anndata as ad
import numpy as np
from prediction import BACKBONE, block
from sklearn.decomposition import PCA
from sklearn.linear_model import RidgeCV

import histoclip as hc
from histoclip.pp._genes import expression_matrix

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "her2st"
RESULTS = HERE / "results"
C_SECTIONS = [f"C{i}" for i in range(2, 7)]
FOLDS = (("C2-C6 -> B4", C_SECTIONS, ["B4"]), ("B4 -> C2-C6", ["B4"], C_SECTIONS))
BRANCHES = ("cnn, hires", "cnn, full-res", "frozen features")
FEAT = "X_frozen"
N_PCS, N_HVG, LATENT_PCA = 10, 1000, 32


def load(section: str, branch: str) -> ad.AnnData:
    """One section as legacy ST (100 um spots), with the image or features the branch trains on."""
    a = ad.read_h5ad(DATA / f"HER2ST_{section}.h5ad")
    lib = next(iter(a.uns["spatial"]))
    meta = a.uns["spatial"][lib].setdefault("metadata", {})
    meta["spot_diameter_um"] = 100.0
    if branch != "cnn, hires":
        hc.io.set_fullres_image(a, DATA / meta["fullres_image"], library_id=lib)
    if branch == "cnn, hires":
        hc.pp.extract_patches(a)
    elif branch == "cnn, full-res":
        hc.pp.extract_patches(a, img_key="fullres")
    else:  # prediction.py's features and cache: Macenko, 100 um, EfficientNet-Lite0, tta=False
        a.obs["section"] = lib
        a.obsm[FEAT] = block(a, "fullres", "macenko", BACKBONE, 100)
    return a


def train_kwargs(branch: str) -> dict:
    return {"image_features_key": FEAT} if branch == "frozen features" else {}


def targets(train: list[ad.AnnData], test: list[ad.AnnData]) -> tuple[np.ndarray, list[np.ndarray]]:
    genes = sorted(set.intersection(*[set(a.var_names) for a in train + test]))
    xtr, xte = ([expression_matrix(a, genes).astype(np.float64) for a in part] for part in (train, test))
    xtr = np.vstack(xtr)
    top = np.argsort(xtr.var(axis=0))[::-1][:N_HVG]
    pca = PCA(N_PCS, random_state=0).fit(xtr[:, top])
    return pca.transform(xtr[:, top]), [pca.transform(x[:, top]) for x in xte]


def zscore(r: np.ndarray) -> np.ndarray:
    return (r - r.mean(axis=0)) / (r.std(axis=0) + 1e-6)


def probe(rtr: list[np.ndarray], ytr: np.ndarray, rte: list[np.ndarray], yte: list[np.ndarray]) -> float:
    """Mean over held-out sections and components of the Pearson r of ridge predictions (per-section z-scores)."""
    fit = RidgeCV(alphas=np.logspace(-2, 5, 15)).fit(np.vstack([zscore(r) for r in rtr]), ytr)
    scores = []
    for r, y in zip(rte, yte, strict=True):
        p = fit.predict(zscore(r))
        scores.append(np.mean([np.corrcoef(p[:, j], y[:, j])[0, 1] for j in range(y.shape[1])]))
    return float(np.mean(scores))


def run_probe(seeds: list[int], rows: list[dict]) -> None:
    for fold, train_secs, test_secs in FOLDS:
        ytr = yte = None
        for branch in BRANCHES:
            train = [load(s, branch) for s in train_secs]
            test = [load(s, branch) for s in test_secs]
            if ytr is None:  # the expression targets of the fold, the same for every branch
                ytr, yte = targets(train, test)
            if branch == "frozen features":
                ftr, fte = [a.obsm[FEAT] for a in train], [a.obsm[FEAT] for a in test]
                rows.append({"fold": fold, "representation": "frozen features (1752)", "seed": None,
                             "r": probe(ftr, ytr, fte, yte)})
                pca = PCA(LATENT_PCA, random_state=0).fit(np.vstack(ftr))
                rows.append({"fold": fold, "representation": f"frozen features, PCA {LATENT_PCA}", "seed": None,
                             "r": probe([pca.transform(f) for f in ftr], ytr, [pca.transform(f) for f in fte], yte)})
                print(json.dumps(rows[-2]), json.dumps(rows[-1]), flush=True)
            for seed in seeds:
                t = time.perf_counter()
                model = hc.tl.train(train if len(train) > 1 else train[0], rng=seed, **train_kwargs(branch))
                wall = time.perf_counter() - t
                for a in train + test:
                    hc.tl.embed(a, model, modality="image")
                rows.append({"fold": fold, "representation": f"image latent, {branch}", "seed": seed,
                             "r": probe([a.obsm["X_histoclip_image"] for a in train], ytr,
                                        [a.obsm["X_histoclip_image"] for a in test], yte),
                             "train_s": round(wall, 1), "loadavg_1min": round(os.getloadavg()[0], 2)})
                print(json.dumps(rows[-1]), flush=True)


def run_domains(seeds: list[int], rows: list[dict]) -> None:
    for section in ["B4", *C_SECTIONS]:
        for branch in BRANCHES:
            base = load(section, branch)
            truth = base.obs["cluster_label"]
            k = int(truth.nunique())
            labels = []
            for seed in seeds:
                a = base.copy()
                t = time.perf_counter()
                model = hc.tl.train(a, rng=seed, **train_kwargs(branch))
                hc.tl.embed(a, model)
                hc.tl.domains(a, n_domains=k, rng=seed)
                wall = time.perf_counter() - t
                labels.append(a.obs["histoclip_domain"].to_numpy().copy())
                hc.tl.domains(a, n_domains=k, use_rep="X_histoclip_image", rng=seed, key_added="image_domain")
                hc.tl.domains(a, n_domains=k, use_rep="expression_pca", rng=seed, key_added="model_free")
                rows.append({"section": section, "branch": branch, "seed": seed, "n_spots": int(a.n_obs),
                             "ari_joint": hc.metrics.adjusted_rand(truth, labels[-1]),
                             "ari_image_latent": hc.metrics.adjusted_rand(truth, a.obs["image_domain"]),
                             "ari_model_free": hc.metrics.adjusted_rand(truth, a.obs["model_free"]),
                             "image_weight": float(a.obs["histoclip_image_weight"].mean()),
                             "wall_s": round(wall, 1), "loadavg_1min": round(os.getloadavg()[0], 2)})
                print(json.dumps(rows[-1]), flush=True)
            agree = [hc.metrics.adjusted_rand(x, y) for x, y in combinations(labels, 2)]
            rows.append({"section": section, "branch": branch, "seed_to_seed": float(np.mean(agree))})


def _mean_sd(v: list[float]) -> str:
    return f"{np.mean(v):.3f}" if len(v) == 1 else f"{np.mean(v):.3f} ± {np.std(v):.3f}"


def markdown(res: dict) -> str:
    out = ["# Image branch: frozen features against the trained image latent (HER2ST)", "",
           "Generated by `benchmarks/image_probe.py` (numbers: `benchmarks/results/image_probe.json`); protocol in "
           "the script's docstring.", "", f"**Probe metric.** {res['probe_metric']}", "",
           "| representation | " + " | ".join(f for f, _, _ in FOLDS) + " |", "|---|" + "---|" * len(FOLDS)]
    reps = list(dict.fromkeys(r["representation"] for r in res["probe"]))
    for rep in reps:
        cells = [_mean_sd([r["r"] for r in res["probe"] if r["representation"] == rep and r["fold"] == f])
                 for f, _, _ in FOLDS]
        out.append(f"| {rep} | " + " | ".join(cells) + " |")
    out += ["", f"Seeds {res['seeds']} for the trained latents (mean ± sd over seeds); the frozen rows are "
            "deterministic.", ""]
    if res["domains"]:
        out += ["**Domains**, each section alone, k = the authors' clusters; mean over seeds (seed-to-seed: mean ARI "
                "between the seeds' joint domains).", "",
                "| section | branch | joint | image latent | model-free | seed-to-seed | image weight "
                "| train+embed+domains s |",
                "|---|---|---|---|---|---|---|---|"]
        d = res["domains"]
        for section in dict.fromkeys(r["section"] for r in d):
            for branch in BRANCHES:
                rs = [r for r in d if r["section"] == section and r["branch"] == branch and "seed" in r]
                s2s = next(r["seed_to_seed"] for r in d if r["section"] == section and r["branch"] == branch
                           and "seed_to_seed" in r)
                out.append(f"| {section} | {branch} | " + " | ".join(
                    f"{np.mean([r[c] for r in rs]):.3f}" for c in ("ari_joint", "ari_image_latent", "ari_model_free"))
                    + f" | {s2s:.2f} | {np.mean([r['image_weight'] for r in rs]):.2f} | "
                    f"{np.mean([r['wall_s'] for r in rs]):.1f} |")
        out.append("")
        for branch in BRANCHES:
            rs = [r for r in d if r["branch"] == branch and "seed" in r]
            ss = [r["seed_to_seed"] for r in d if r["branch"] == branch and "seed_to_seed" in r]
            out.append(f"- {branch}: joint {np.mean([r['ari_joint'] for r in rs]):.3f} over the six sections, "
                       f"seed-to-seed {np.mean(ss):.2f}, {np.mean([r['wall_s'] for r in rs]):.1f} s per run.")
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--skip-domains", action="store_true")
    args = p.parse_args()
    hc.settings.progress = False
    res = {"seeds": args.seeds, "probe_metric": (
        f"mean over the first {N_PCS} expression principal components (log1p CP10k, {N_HVG} most variable genes, "
        "fitted on the training sections) of the Pearson r between ridge-predicted and measured component scores "
        "over the held-out section's spots; representations z-scored per section."), "probe": [], "domains": []}
    t = time.perf_counter()
    run_probe(args.seeds, res["probe"])
    if not args.skip_domains:
        run_domains(args.seeds, res["domains"])
    res["wall_s"] = round(time.perf_counter() - t, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "image_probe.json").write_text(json.dumps(res, indent=1))
    (RESULTS / "image_probe.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
