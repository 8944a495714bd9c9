"""Expression from the H&E image alone, on HER2ST: patient-level folds (headline) and within-patient folds.

    OMP_NUM_THREADS=1 python benchmarks/prediction.py [--seeds 0 1 2 3 4] [--epochs 60]
    OMP_NUM_THREADS=1 python benchmarks/prediction.py --backbone uni --weights ~/UNI/pytorch_model.bin

``--backbone`` (any ``backbone=`` of ``hc.tl.image_features``: a foundation model name with ``--weights`` a local
file, ``hf-hub:<org>/<model>``, a timm architecture with ``--weights``, ``--model-kwargs``, ``--mean``, ``--std``)
runs the backbone study instead: features at the model's own resolution (``--mpp``, default the registry's, else
0.5 um/px) from the full-resolution images, then on the patient-level folds the HEST-Bench protocol (ridge on
PCA-256 of the features, alpha by inner leave-one-group-out CV) and the package's regression head, next to the same
two on EfficientNet-Lite0 features of 100 um patches. Writes benchmarks/results/prediction_backbone_<name>.json.

Folds. Patient-level (the headline; the honest split): train on patient C's five sections (C2-C6) and predict
patient B's B4, and train on B4 and predict each of C2-C6. Within-patient (labelled so): leave one of C2-C6 out,
train on the other four. Every method runs on every fold; the held-out section is passed to the predictors without
counts.

Metric: Pearson r per gene between measured and predicted log1p(CP10k) expression over the held-out section's
spots (a constant prediction or gene counts as r = 0, ``hc.metrics.gene_pearson``), averaged over the 50 most
expressed genes (highest mean log-normalised expression) of the training sections only. Each kind of fold is
summarised by the mean over its folds; stochastic methods are run with seeds 0-4 and reported as mean and standard
deviation over seeds of that fold mean. Deterministic methods run once.

Image features come from ``hc.tl.image_features`` (frozen ImageNet EfficientNet-Lite0, 1752 features per patch,
tta=False), one patch size at a time, per section, image (full-resolution JPG or the 2000 px ``hires`` image) and
stain setting (none or Macenko fitted per section), cached in benchmarks/cache/ and reused across seeds and methods.

Writes benchmarks/results/prediction.json, prediction.md and prediction_C3.png.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
import torch

import histoclip as hc
from histoclip.model._predict import apply_ridge, fit_ridge, neighbour_mean_xy

warnings.filterwarnings("ignore")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = REPO.parent / "shared" / "data" / "her2st"
C_SECTIONS = [f"C{i}" for i in range(2, 7)]
DEFAULT = [DATA / f"HER2ST_{s}.h5ad" for s in [*C_SECTIONS, "B4"]]
CACHE = HERE / "cache"
RESULTS = HERE / "results"
SIZES_UM = (100, 300, 600, 1200)
BACKBONE = "efficientnet-lite0"
FEAT_KEY = "X_histoclip_features"
ALPHAS = np.logspace(0, 5, 11)
KS = (5, 10, 20, 50, 100)
N_EVAL = 50
METRIC = ("mean over the 50 most expressed genes of the training sections (highest mean log1p(CP10k)) of the "
          "Pearson r between measured and predicted log1p(CP10k) expression of each gene over the held-out "
          "section's spots; a constant prediction or a constant gene counts as r = 0.")


# ---------------------------------------------------------------------------------------------- data
def load_sections(paths: list[Path]) -> list[ad.AnnData]:
    """Read each section, point it to its full-resolution JPG, and give all sections the union of genes (0 = absent)."""
    raw = []
    for p in paths:
        a = ad.read_h5ad(p)
        lib = list(a.uns["spatial"])[0]
        hc.io.set_fullres_image(a, p.parent / a.uns["spatial"][lib]["metadata"]["fullres_image"], library_id=lib)
        a.obs_names = [f"{lib}_{o}" for o in a.obs_names]
        a.obs["section"] = lib
        a.X = sp.csr_matrix(a.X, dtype=np.float32)
        raw.append((lib, a))
    genes = pd.Index(sorted(set().union(*[set(a.var_names) for _, a in raw])))
    out = []
    for _, a in raw:
        idx = genes.get_indexer(a.var_names)
        x = a.X.tocoo()
        X = sp.csr_matrix((x.data, (x.row, idx[x.col])), shape=(a.n_obs, len(genes)), dtype=np.float32)
        out.append(ad.AnnData(X=X, obs=a.obs.copy(), var=pd.DataFrame(index=genes), uns=a.uns, obsm=dict(a.obsm)))
    return out


def block(a: ad.AnnData, img: str, stain: str, backbone: str, size: float) -> np.ndarray:
    """Features of one (image, stain, backbone, patch size) for one section, from the cache or extracted."""
    lib = str(a.obs["section"].iloc[0])
    path = CACHE / f"{lib}_{img}_{stain}_{backbone}_{int(size)}um_n{a.n_obs}.npy"
    if path.is_file():
        return np.load(path)
    b = a[:, :0].copy()
    hc.tl.image_features(b, backbone=backbone, sizes_um=[size], tta=False, img_key=img, spot_diameter_um=100,
                         stain_norm=None if stain == "none" else stain, key_added=FEAT_KEY, batch_size=32,
                         accelerator="cpu")
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(path, b.obsm[FEAT_KEY])
    return b.obsm[FEAT_KEY]


def features(secs: dict[str, ad.AnnData], img: str, stain: str, sizes=None) -> dict[str, np.ndarray]:
    """Per section: the blocks of ``sizes`` side by side (columns: size, then feature)."""
    sizes = SIZES_UM if sizes is None else sizes
    return {n: np.concatenate([block(a, img, stain, BACKBONE, s) for s in sizes], axis=1).astype(np.float64)
            for n, a in secs.items()}


def lognorm(a: ad.AnnData) -> ad.AnnData:
    b = ad.AnnData(X=a.X.copy(), obs=a.obs[["section"]].copy(), var=pd.DataFrame(index=a.var_names))
    sc.pp.normalize_total(b, target_sum=1e4)
    sc.pp.log1p(b)
    return b


def top_hvg(b: ad.AnnData, n: int) -> list[str]:
    c = b.copy()
    sc.pp.highly_variable_genes(c, flavor="seurat", n_top_genes=n)
    return list(c.var_names[c.var["highly_variable"].to_numpy()])


def folds() -> list[dict]:
    out = [{"kind": "patient", "name": "C2-C6 -> B4", "train": C_SECTIONS, "test": ["B4"]}]
    out += [{"kind": "patient", "name": f"B4 -> {c}", "train": ["B4"], "test": [c]} for c in C_SECTIONS]
    out += [{"kind": "within", "name": f"LOSO {c}", "train": [x for x in C_SECTIONS if x != c], "test": [c]}
            for c in C_SECTIONS]
    return out


# ---------------------------------------------------------------------------------------------- predictors
def _r(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    return hc.metrics.gene_pearson(y, pred).to_numpy()


def cv_groups(secs: dict[str, ad.AnnData], names: list[str]) -> np.ndarray:
    """The package's inner-CV groups: sections, or spatial stripes when fewer than three sections."""
    from histoclip.model._predict import spatial_stripes

    if len(names) >= 3:
        return np.concatenate([np.full(secs[n].n_obs, i) for i, n in enumerate(names)])
    return np.concatenate([spatial_stripes(np.asarray(secs[n].obsm["spatial"], float),
                                           np.full(secs[n].n_obs, n)) for n in names])


def ridge_preds(Ftr, Ytr, Fte, alphas, n_pcs=256):
    mu, sd = Ftr.mean(0), Ftr.std(0) + 1e-6
    Ztr, Zte = (Ftr - mu) / sd, (Fte - mu) / sd
    ym = Ytr.mean(0)
    U, s, Vt = np.linalg.svd(Ztr, full_matrices=False)
    U, s, Vt = U[:, :n_pcs], s[:n_pcs], Vt[:n_pcs]
    A, B = Zte @ Vt.T, U.T @ (Ytr - ym)
    return [A @ ((s / (s**2 + a))[:, None] * B) + ym for a in alphas]


def _inner_cv(preds, grid, Ftr, Ytr, groups, Fte):
    """The grid value with the best inner leave-one-group-out mean r (over the training HEG), refitted on all."""
    score = np.zeros(len(grid))
    for g in np.unique(groups):
        m = groups == g
        for i, P in enumerate(preds(Ftr[~m], Ytr[~m], Ftr[m], grid)):
            score[i] += _r(P, Ytr[m]).mean()
    best = grid[int(np.argmax(score))]
    return preds(Ftr, Ytr, Fte, [best])[0], best


def knn_preds(Ftr, Ytr, Fte, ks):
    """Cosine k-NN on 50 PCs of the standardised features, similarity-weighted mean; one prediction per k."""
    mu, sd = Ftr.mean(0), Ftr.std(0) + 1e-6
    Ztr = (Ftr - mu) / sd
    P = np.linalg.svd(Ztr, full_matrices=False)[2][:50].T
    a, b = Ztr @ P, ((Fte - mu) / sd) @ P
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    S = b @ a.T
    order = np.argsort(-S, 1)
    out = []
    for k in ks:
        idx = order[:, : min(k, len(a))]
        w = np.take_along_axis(S, idx, 1).clip(0) + 1e-6
        out.append(np.einsum("nk,nkg->ng", w / w.sum(1, keepdims=True), Ytr[idx]))
    return out


def head_input(F: dict[str, np.ndarray], secs, names, *, zscore: bool, neighbours: bool) -> np.ndarray:
    """The regression head's input: per-section z-scored features (optional) next to their neighbour mean."""
    out = []
    for n in names:
        x = F[n]
        if zscore:
            x = (x - x.mean(0)) / (x.std(0) + 1e-6)
        if neighbours:
            xy = np.asarray(secs[n].obsm["spatial"], float)
            x = np.concatenate([x, neighbour_mean_xy(x.astype(np.float32), xy, np.full(len(x), n))], axis=1)
        out.append(x.astype(np.float32))
    return np.concatenate(out)


def regression(Ftr_d, Fte_d, secs, train, test, Ytr, *, zscore=True, neighbours=True):
    """The package's regression head (fit_ridge / apply_ridge) on features of any setting."""
    head = fit_ridge(head_input(Ftr_d, secs, train, zscore=zscore, neighbours=neighbours), Ytr,
                     cv_groups(secs, train))
    return apply_ridge(head_input(Fte_d, secs, test, zscore=zscore, neighbours=neighbours), head), float(head["alpha"])


def with_features(a: ad.AnnData, F: np.ndarray, v: dict) -> ad.AnnData:
    img, stain = v["img"], v["stain"]
    b = a.copy()
    b.obsm[FEAT_KEY] = F.astype(np.float32)
    params = {"backbone": BACKBONE, "weights": None, "sizes_um": [float(s) for s in v["sizes"]], "patch_px": 224,
              "tta": False, "key_added": FEAT_KEY, "img_key": img}
    if stain != "none":
        params["stain_norm"] = stain
    b.uns.setdefault("histoclip", {}).setdefault("params", {})["image_features"] = params
    return b


# ---------------------------------------------------------------------------------------------- factors
#: regression-head variants, measured one factor at a time against the first (raw full-resolution patches of 100 um)
ALL = (100, 300, 600, 1200)
VARIANTS = {
    "raw, 100 um": dict(img="fullres", stain="none", sizes=(100,)),
    "Macenko, 100 um": dict(img="fullres", stain="macenko", sizes=(100,)),
    "raw, 100-1200 um": dict(img="fullres", stain="none", sizes=ALL),
    "Macenko, 100-1200 um": dict(img="fullres", stain="macenko", sizes=ALL),
    "Macenko, 100+300 um": dict(img="fullres", stain="macenko", sizes=(100, 300)),
    "Macenko, 100-600 um": dict(img="fullres", stain="macenko", sizes=(100, 300, 600)),
    "raw, 100 um, no per-section z-score": dict(img="fullres", stain="none", sizes=(100,), zscore=False),
    "Macenko, 100 um, no per-section z-score": dict(img="fullres", stain="macenko", sizes=(100,), zscore=False),
    "Macenko, 100 um, no neighbour mean": dict(img="fullres", stain="macenko", sizes=(100,), neighbours=False),
    "raw, 100 um, hires 2000 px image": dict(img="hires", stain="none", sizes=(100,)),
    "raw, 100-1200 um, hires 2000 px image": dict(img="hires", stain="none", sizes=ALL),
    "raw, 100 um, train hires / query full-res": dict(img="hires", stain="none", sizes=(100,), query_img="fullres"),
}
#: what the package's head can run as (it always z-scores per section and adds the neighbour mean)
CHOICES = tuple(k for k, v in VARIANTS.items() if v.get("zscore", True) and v.get("neighbours", True)
                and "query_img" not in v)


def available(v: dict, secs) -> bool:
    imgs = {v["img"], v.get("query_img", v["img"])}
    return all((CACHE / f"{n}_{i}_{v['stain']}_{BACKBONE}_{int(s)}um_n{a.n_obs}.npy").is_file()
               for n, a in secs.items() for i in imgs for s in v["sizes"])


# ---------------------------------------------------------------------------------------------- backbone study
def backbone_block(a: ad.AnnData, backbone: str, weights, mean, std, mpp, model_kwargs=None) -> np.ndarray:
    """Features of one section with ``backbone`` at ``mpp`` um/px (full-resolution image, no stain normalisation)."""
    lib = str(a.obs["section"].iloc[0])
    slug = "".join(c if c.isalnum() else "-" for c in backbone) + ("" if weights is None else f"-{Path(weights).stem}")
    path = CACHE / f"{lib}_fullres_none_{slug}_{mpp or 'default'}mpp_n{a.n_obs}.npy"
    if path.is_file():
        return np.load(path)
    b = a[:, :0].copy()
    hc.tl.image_features(b, backbone=backbone, weights=weights, model_kwargs=model_kwargs, mean=mean, std=std, mpp=mpp,
                         tta=False,
                         img_key="fullres", key_added=FEAT_KEY, batch_size=32, accelerator="auto")
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(path, b.obsm[FEAT_KEY])
    return b.obsm[FEAT_KEY]


def backbone_study(backbone: str, weights, mean, std, mpp, out: Path, model_kwargs=None) -> dict:
    """HEST-style ridge and the package's head on ``backbone``'s features, patient-level folds, against EfficientNet."""
    t0 = time.time()
    secs = {str(a.obs["section"].iloc[0]): a for a in load_sections(DEFAULT)}
    logn = {n: lognorm(a) for n, a in secs.items()}
    feats = {backbone: {n: backbone_block(a, backbone, weights, mean, std, mpp, model_kwargs).astype(np.float64)
                        for n, a in secs.items()},
             f"{BACKBONE} 100 um": features(secs, "fullres", "none", (100,))}
    rows: list[dict] = []
    for fold in [f for f in folds() if f["kind"] == "patient"]:
        train, test = fold["train"], fold["test"]
        tr_ln = ad.concat([logn[n] for n in train])
        heg = list(tr_ln.var_names[np.argsort(-np.asarray(tr_ln.X.mean(0)).ravel(), kind="stable")[:N_EVAL]])
        Ytr = np.asarray(tr_ln[:, heg].X.todense(), dtype=np.float64)
        Yte = np.asarray(logn[test[0]][:, heg].X.todense(), dtype=np.float64)
        groups = cv_groups(secs, train)
        for name, F in feats.items():
            Ftr = np.concatenate([F[n] for n in train])
            t = time.time()
            P, a = _inner_cv(ridge_preds, ALPHAS, Ftr, Ytr, groups, F[test[0]])
            record(rows, fold, f"ridge PCA-256 (HEST) | {name}", None, P, Yte,
                   {"alpha": float(a), "wall_s": round(time.time() - t, 2), "n_features": int(Ftr.shape[1])})
            P, alpha = regression(F, F, secs, train, test, Ytr)
            record(rows, fold, f"histoclip regression | {name}", None, P, Yte, {"alpha": alpha})
    df = pd.DataFrame(rows)
    score = patient_score(df).sort_values(ascending=False)
    res = {"metric": METRIC, "backbone": backbone, "weights": None if weights is None else str(weights),
           "model_kwargs": model_kwargs, "mpp": mpp,
           "patient_level_score": {k: round(float(v), 4) for k, v in score.items()},
           "score_is": "mean of the two patient-level directions (C2-C6 -> B4, and the mean over B4 -> C2..C6)",
           "total_s": round(time.time() - t0, 1), "load": open("/proc/loadavg").read().split()[:3], "records": rows}
    slug = "".join(c if c.isalnum() else "_" for c in backbone)
    (out / f"prediction_backbone_{slug}.json").write_text(json.dumps(res, indent=1))
    print(score.to_string())
    return res


def record(rows, fold, method, seed, P, Yte, info=None):
    r = _r(P, Yte) if method != "training mean" else np.zeros(Yte.shape[1])
    row = {"kind": fold["kind"], "fold": fold["name"], "method": method, "seed": seed, "mean_r": float(r.mean()),
           "median_r": float(np.median(r)), "n_r_gt_0.3": int((r > 0.3).sum()), "n_genes": int(len(r)),
           "n_predicted": int(np.isfinite(P).all(0).sum()), **(info or {})}
    rows.append(row)
    print(json.dumps(row), flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--no-retrieval", action="store_true", help="skip the contrastive models (factors only)")
    ap.add_argument("--cnn", action="store_true", help="only the small-CNN side study (prediction_cnn.json)")
    ap.add_argument("--report-only", action="store_true", help="rewrite prediction.md from prediction.json")
    ap.add_argument("--backbone", default=None, help="run the backbone study with this hc.tl.image_features backbone")
    ap.add_argument("--weights", type=Path, default=None, help="local weights file of --backbone")
    ap.add_argument("--mean", type=float, nargs=3, default=None, help="RGB normalisation of --backbone's weights")
    ap.add_argument("--std", type=float, nargs=3, default=None)
    ap.add_argument("--mpp", type=float, default=None, help="microns per pixel (default: the registry's, else 0.5)")
    ap.add_argument("--model-kwargs", type=json.loads, default=None, help='architecture arguments as JSON, e.g. '
                    '\'{"init_values": 1e-5}\'')
    args = ap.parse_args()
    if args.backbone is not None:
        from histoclip.module._foundation import known_model

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        hc.settings.progress = False
        args.out.mkdir(parents=True, exist_ok=True)
        mpp = args.mpp if args.mpp is not None else (None if known_model(args.backbone) else 0.5)
        backbone_study(args.backbone, args.weights, args.mean, args.std, mpp, args.out, args.model_kwargs)
        return
    if args.cnn:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        hc.settings.progress = False
        args.out.mkdir(parents=True, exist_ok=True)
        cnn_study(args.seeds, args.out)
        return
    if args.report_only:
        res = json.loads((args.out / "prediction.json").read_text())
        (args.out / "prediction.md").write_text(markdown(res, _cnn(args.out)))
        print(markdown(res, _cnn(args.out)))
        return
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    hc.settings.progress = False
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    secs = {str(a.obs["section"].iloc[0]): a for a in load_sections(DEFAULT)}
    logn = {n: lognorm(a) for n, a in secs.items()}
    variants = {k: v for k, v in VARIANTS.items() if available(v, secs)}
    print(f"factor variants with cached features: {list(variants)}", file=sys.stderr, flush=True)
    feats = {(i, v["stain"], v["sizes"]): features(secs, i, v["stain"], v["sizes"]) for v in variants.values()
             for i in {v["img"], v.get("query_img", v["img"])}}
    rows: list[dict] = []
    fold_data = {}
    for fold in folds():
        train, test = fold["train"], fold["test"]
        tr_ln = ad.concat([logn[n] for n in train])
        heg = list(tr_ln.var_names[np.argsort(-np.asarray(tr_ln.X.mean(0)).ravel(), kind="stable")[:N_EVAL]])
        Ytr = np.asarray(tr_ln[:, heg].X.todense(), dtype=np.float64)
        Yte = np.asarray(logn[test[0]][:, heg].X.todense(), dtype=np.float64)
        fold_data[fold["name"]] = {"heg": heg, "Yte": Yte, "tr_ln": tr_ln}
        groups = cv_groups(secs, train)
        record(rows, fold, "training mean", None, np.repeat(Ytr.mean(0, keepdims=True), len(Yte), 0), Yte)
        F = feats[("fullres", "none", (100,))]
        Ftr = np.concatenate([F[n][:, :1752] for n in train])
        t = time.time()
        P, a = _inner_cv(ridge_preds, ALPHAS, Ftr, Ytr, groups, F[test[0]][:, :1752])
        record(rows, fold, "ridge s100 (HEST)", None, P, Yte, {"alpha": float(a), "wall_s": round(time.time() - t, 2)})
        t = time.time()
        P, k = _inner_cv(knn_preds, KS, Ftr, Ytr, groups, F[test[0]][:, :1752])
        record(rows, fold, "kNN s100", None, P, Yte, {"k": int(k), "wall_s": round(time.time() - t, 2)})
        for name, v in variants.items():
            t = time.time()
            sizes = v["sizes"]
            Ft, Fq = feats[(v["img"], v["stain"], sizes)], feats[(v.get("query_img", v["img"]), v["stain"], sizes)]
            P, alpha = regression(Ft, Fq, secs, train, test, Ytr, zscore=v.get("zscore", True),
                                  neighbours=v.get("neighbours", True))
            record(rows, fold, f"regression | {name}", None, P, Yte,
                   {"alpha": alpha, "wall_s": round(time.time() - t, 2)})
        print(f"{fold['name']}: factors done ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)

    # the default path and its features: chosen on the patient-level folds only
    df = pd.DataFrame(rows)
    pat = df[(df.kind == "patient") & df.method.str.startswith("regression | ")]
    score = patient_score(pat)
    cands = [c for c in CHOICES if f"regression | {c}" in score.index]
    chosen = max(cands, key=lambda c: score[f"regression | {c}"])
    v = VARIANTS[chosen]
    print(f"chosen features (patient-level folds only): {chosen} ({score[f'regression | {chosen}']:.3f})",
          file=sys.stderr, flush=True)
    F = feats[(v["img"], v["stain"], v["sizes"])]
    fig = None
    if not args.no_retrieval:
        by_train: dict[tuple, list[dict]] = {}
        for fold in folds():
            by_train.setdefault(tuple(fold["train"]), []).append(fold)
        for train, fs in by_train.items():
            tr_ln = fold_data[fs[0]["name"]]["tr_ln"]
            heg = fold_data[fs[0]["name"]]["heg"]
            model_genes = list(dict.fromkeys(heg + top_hvg(tr_ln, 1000)))
            train_ads = [with_features(secs[n], F[n], v) for n in train]
            ens = {f["name"]: [] for f in fs}
            for seed in args.seeds:
                t = time.time()
                model = hc.model.HistoCLIP(train_ads, genes=model_genes, image_features_key=FEAT_KEY, latent_dim=256,
                                           temperature=0.1)
                model.train(max_epochs=args.epochs, batch_size=256, lr=1e-3, weight_decay=1e-3, rng=seed,
                            accelerator="cpu")
                t_train = time.time() - t
                for fold in fs:
                    fd = fold_data[fold["name"]]
                    q = with_features(secs[fold["test"][0]], F[fold["test"][0]], v)[:, :0].copy()
                    P = np.asarray(hc.tl.predict_expression(q, model, method="retrieval", genes=fd["heg"]).X, float)
                    ens[fold["name"]].append(P)
                    record(rows, fold, "histoclip retrieval", seed, P, fd["Yte"], {"train_s": round(t_train, 1)})
                    if seed == args.seeds[0]:  # the regression head does not use the contrastive weights
                        out = hc.tl.predict_expression(q, model, method="regression", genes=fd["heg"])
                        P = np.asarray(out.X, float)
                        r = record(rows, fold, "histoclip regression", None, P, fd["Yte"],
                                   {"alpha": float(out.uns["histoclip"]["params"]["predict_expression"]["alpha"])})
                        if fold["name"] == "B4 -> C3":
                            fig = {"fold": fold["name"], "pred": out, "heg": fd["heg"],
                                   "r": {"histoclip regression": r}}
                print(f"{'+'.join(train)} seed {seed}: {t_train:.0f} s train ({time.time() - t0:.0f} s)",
                      file=sys.stderr, flush=True)
            for fold in fs:
                fd = fold_data[fold["name"]]
                r = record(rows, fold, "histoclip retrieval, 5-seed ensemble", None,
                           np.mean(ens[fold["name"]], axis=0), fd["Yte"])
                if fig is not None and fold["name"] == fig["fold"]:
                    fig["r"]["histoclip retrieval, 5-seed ensemble"] = r
    settings = {
        "folds": folds(), "sizes_um": list(v["sizes"]), "backbone": BACKBONE, "seeds": args.seeds,
        "epochs": args.epochs, "chosen": chosen, "chosen_by": "mean of the two patient-level directions",
        "variants": {k: VARIANTS[k] for k in variants}, "threads": int(os.environ.get("OMP_NUM_THREADS", "1")),
        "total_s": round(time.time() - t0, 1), "load": open("/proc/loadavg").read().split()[:3],
    }
    res = {"metric": METRIC, "settings": settings, "records": rows}
    (args.out / "prediction.json").write_text(json.dumps(res, indent=1))
    (args.out / "prediction.md").write_text(markdown(res, _cnn(args.out)))
    print(markdown(res, _cnn(args.out)))
    if fig is not None:
        figure(fig, secs[fig["fold"].split()[-1]], args.out / "prediction_C3.png")


def _jitter(read, rng):
    from histoclip.pp._stain import augment_stain

    def call(self, i):
        return augment_stain(read(self, i), rng)

    return call


def cnn_study(seeds: list[int], out: Path) -> None:
    """The small-CNN path (``hc.tl.train`` defaults on 200 um patches of the 2000 px image), with and without stain
    augmentation during training (``histoclip.pp._stain.augment_stain`` on every training patch, sigma = bias =
    0.05), on the patient-level folds; writes prediction_cnn.json."""
    from histoclip.data import PatchReader

    secs = {str(a.obs["section"].iloc[0]): a for a in load_sections(DEFAULT)}
    logn = {n: lognorm(a) for n, a in secs.items()}
    for a in secs.values():
        hc.pp.extract_patches(a, img_key="hires", spot_diameter_um=100)
    rows, t0 = [], time.time()
    original = PatchReader.__call__
    for train in (C_SECTIONS, ["B4"]):
        fs = [f for f in folds() if f["kind"] == "patient" and f["train"] == train]
        tr_ln = ad.concat([logn[n] for n in train])
        heg = list(tr_ln.var_names[np.argsort(-np.asarray(tr_ln.X.mean(0)).ravel(), kind="stable")[:N_EVAL]])
        for augment in (False, True):
            for seed in seeds:
                t = time.time()
                model = hc.model.HistoCLIP([secs[n] for n in train])
                if augment:
                    PatchReader.__call__ = _jitter(original, np.random.default_rng(seed))  # training patches only
                try:
                    model.train(rng=seed, accelerator="cpu")
                finally:
                    PatchReader.__call__ = original
                t_train = time.time() - t
                for fold in fs:
                    q = secs[fold["test"][0]][:, :0].copy()
                    Yte = np.asarray(logn[fold["test"][0]][:, heg].X.todense(), dtype=np.float64)
                    for method in ("retrieval", "regression"):
                        P = np.asarray(hc.tl.predict_expression(q, model, method=method, genes=heg).X, float)
                        name = f"CNN {method}{' + stain augmentation' if augment else ''}"
                        record(rows, fold, name, seed, P, Yte, {"train_s": round(t_train, 1)})
                print(f"CNN {'+'.join(train)} augment={augment} seed {seed}: {t_train:.0f} s "
                      f"({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
                (out / "prediction_cnn.json").write_text(json.dumps({"records": rows, "seeds": seeds}, indent=1))


def _cnn(out: Path) -> dict | None:
    path = out / "prediction_cnn.json"
    return json.loads(path.read_text()) if path.is_file() else None


def patient_score(df: pd.DataFrame) -> pd.Series:
    """Per method: the mean of the two patient-level directions (C2-C6 -> B4, and the mean over B4 -> C2..C6)."""
    m = df.groupby(["method", "fold"])["mean_r"].mean().unstack()
    b4 = [c for c in m.columns if c.startswith("B4 ->")]
    return (m["C2-C6 -> B4"] + m[b4].mean(1)) / 2


ORDER = ["histoclip regression", "histoclip retrieval", "histoclip retrieval, 5-seed ensemble", "ridge s100 (HEST)",
         "kNN s100", "training mean"]
COLS = ["C2-C6 -> B4", "B4 -> C (5 folds)", "patient-level", "within-patient LOSO (5 folds)"]


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per method and seed: the four summary columns (fold means)."""
    out = []
    for (m, seed), g in df.groupby(["method", df["seed"].fillna(-1)]):
        f = g.groupby("fold")["mean_r"].mean()
        b4 = f[[c for c in f.index if c.startswith("B4 ->")]].mean()
        loso = f[[c for c in f.index if c.startswith("LOSO")]].mean()
        out.append({"method": m, "seed": seed, COLS[0]: f.get("C2-C6 -> B4", np.nan), COLS[1]: b4,
                    COLS[2]: (f.get("C2-C6 -> B4", np.nan) + b4) / 2, COLS[3]: loso,
                    "genes": f"{int(g['n_predicted'].min())}/{int(g['n_genes'].max())}"})
    return pd.DataFrame(out)


def _cells(s: pd.DataFrame) -> list[str]:
    if len(s) == 1:
        return [f"{s[c].iloc[0]:.3f}" for c in COLS]
    return [f"{s[c].mean():.3f} ± {s[c].std(ddof=1):.3f}" for c in COLS]


def cnn_table(cnn: dict) -> list[str]:
    """The small-CNN side study (``--cnn``), patient-level folds only."""
    sm = summary(pd.DataFrame(cnn["records"]))
    cols = COLS[:3]
    out = ["| method | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for m in sorted(set(sm.method)):
        s = sm[sm.method == m]
        out.append(f"| {m} | " + " | ".join(f"{s[c].mean():.3f} ± {s[c].std(ddof=1):.3f}" for c in cols) + " |")
    return out


def markdown(res: dict, cnn: dict | None = None) -> str:
    df = pd.DataFrame(res["records"])
    st = res["settings"]
    sm = summary(df)
    head = "| method | " + " | ".join(COLS) + " | genes predicted |\n|" + "---|" * (len(COLS) + 2)
    main_rows = [f"| {m} | " + " | ".join(_cells(sm[sm.method == m])) + f" | {sm[sm.method == m]['genes'].iloc[0]} |"
                 for m in ORDER if m in set(sm.method)]
    base = sm[sm.method == f"regression | {next(iter(st['variants']))}"][COLS[2]].iloc[0]
    var_rows = []
    for name in st["variants"]:
        s = sm[sm.method == f"regression | {name}"]
        var_rows.append(f"| {name} | " + " | ".join(_cells(s)) + f" | {s[COLS[2]].iloc[0] - base:+.3f} |")
    per = df.groupby(["method", "fold"])["mean_r"].mean().unstack()
    fold_names = [f["name"] for f in st["folds"]]
    per_rows = [f"| {m.replace(' | ', ': ')} | " + " | ".join(f"{per.loc[m, f]:.3f}" for f in fold_names) + " |"
                for m in ORDER + [f"regression | {n}" for n in st["variants"]] if m in per.index]
    reg = sm[sm.method == "histoclip regression"]
    ret = sm[sm.method == "histoclip retrieval"]
    lines = [
        "# Expression from the image: HER2ST, patient-level and within-patient folds",
        "",
        "Generated by `benchmarks/prediction.py` (numbers: `benchmarks/results/prediction.json`).",
        "",
        "**Metric.** " + res["metric"],
        "",
        "**Folds.** Patient-level (the headline; the honest split for a new patient): `C2-C6 -> B4` trains on patient "
        "C's five sections and predicts patient B's B4; `B4 -> C` trains on B4 and predicts each of C2-C6 (mean over "
        "the five). `patient-level` is the mean of those two directions. Within-patient (sections of one patient are "
        "not independent): leave one of C2-C6 out, train on the other four (mean over the five). The held-out "
        "section is passed to the predictors without counts; genes, standardisation, PCA and penalties use the "
        "training sections only.",
        "",
        "## Methods",
        "",
        head,
        *main_rows,
        "",
        f"`histoclip retrieval`: seeds {', '.join(map(str, st['seeds']))}; `mean ± sd` over seeds of the fold "
        "means. `5-seed ensemble`: the mean of the five seeds' predictions. Every other method is deterministic "
        "(closed form or exhaustive search) and ran once.",
        "",
    ]
    if len(reg):
        lines += [
            f"**Default path** (`hc.tl.predict_expression` default, `method=\"regression\"`), chosen on the "
            f"patient-level folds only: the regression head on frozen EfficientNet-Lite0 features of "
            f"{', '.join(str(s) for s in st['sizes_um'])} um patches, features `{st['chosen']}`. Across patients: "
            f"{reg[COLS[0]].iloc[0]:.3f} (C2-C6 -> B4) and {reg[COLS[1]].iloc[0]:.3f} (B4 -> C); within patient C: "
            f"{reg[COLS[3]].iloc[0]:.3f} (leave one section out). Retrieval on the same features: "
            f"{ret[COLS[0]].mean():.3f} and {ret[COLS[1]].mean():.3f} across patients, {ret[COLS[3]].mean():.3f} "
            "within.",
            "",
        ]
        var = sm[sm.method.str.startswith("regression | ")].set_index("method")
        best_in = var[COLS[3]].idxmax()
        lines += [
            f"**Goals of issue 15.** C2-C6 -> B4 >= 0.25 with all 50 genes predicted: not reached "
            f"({reg[COLS[0]].iloc[0]:.3f}, {reg['genes'].iloc[0]} genes). Within-patient LOSO >= 0.35: not reached by "
            f"the default chosen across patients ({reg[COLS[3]].iloc[0]:.3f}); the best features within patient C "
            f"(`{best_in.split(' | ')[1]}`) give {var.loc[best_in, COLS[3]]:.3f} there but "
            f"{var.loc[best_in, COLS[2]]:.3f} across patients (a guess, not tested: wide patches see a tissue layout "
            "that consecutive sections of one tumour share).",
            "",
        ]
    lines += [
        "## What makes the features transfer: one factor at a time",
        "",
        "The package's regression head (per-section z-scored features next to their neighbours' mean, PCA 256, "
        "ridge with the penalty by inner cross-validation) on frozen EfficientNet-Lite0 features (tta=False) of "
        "patches of the listed sizes (concatenated), changing one thing at a time against the first row "
        "(full-resolution 100 um patches, no stain normalisation). Deterministic: one run each. The default's "
        "features are the row with the best patient-level score among those the package head runs as (per-section "
        "z-score and neighbour mean on).",
        "",
        "| features / head | " + " | ".join(COLS) + " | patient-level vs first row |\n|" + "---|" * (len(COLS) + 2),
        *var_rows,
        "",
        "* `Macenko`: `hc.tl.image_features(..., stain_norm=\"macenko\")`, stain vectors fitted per section on its "
        "spot patches and mapped onto Macenko's reference.",
        "* `no per-section z-score`: features standardised over all training spots only (the query with the "
        "training mean and sd), instead of within each section.",
        "* `no neighbour mean`: the spot's own features only.",
        "* `hires 2000 px image`: the same physical patch sizes cut from the 2000 px image (~3.4 um/px instead of "
        "~0.69); `train hires / query full-res`: resolutions mismatched between training and query.",
        "",
        *([
            "## The small-CNN path and stain augmentation",
            "",
            "`python benchmarks/prediction.py --cnn --seeds 0 1 2`: `hc.model.HistoCLIP(train)` with its defaults "
            "(a small CNN trained from scratch on 200 um patches of the 2000 px image, 2000 Moran's I genes, "
            "`train()` default epochs), predicting the 50 HEG with `genes=`; `+ stain augmentation`: every "
            "training patch goes through `histoclip.pp._stain.augment_stain` (random haematoxylin and eosin "
            "concentration scale and shift, sigma = bias = 0.05; Tellez et al. 2019) during `train()` only. "
            f"Patient-level folds only, seeds {', '.join(map(str, cnn['seeds']))} (mean ± sd over seeds): about "
            "200 s of training per C2-C6 model on the shared CPU, too slow for every fold.",
            "",
            *cnn_table(cnn),
            "",
        ] if cnn else []),
        "## Every fold (mean r over the 50 HEG; seeded methods: mean over seeds)",
        "",
        "| method | " + " | ".join(fold_names) + " |\n|" + "---|" * (len(fold_names) + 1),
        *per_rows,
        "",
        "## Settings",
        "",
        "* Sections: HER2ST C2-C6 (patient C) and B4 (patient B), full-resolution JPGs, legacy ST spots of 100 um. "
        "Genes: union over sections (absent = 0 counts); target log1p(CP10k).",
        f"* Features: `hc.tl.image_features(backbone=\"{st['backbone']}\", sizes_um=[s], tta=False, img_key=..., "
        "stain_norm=...)`, one size per call, cached in `benchmarks/cache/`.",
        f"* histoclip retrieval: `HistoCLIP(train, genes=HEG50 + top-1000 training HVG, image_features_key=..., "
        f"latent_dim=256, temperature=0.1)`, `train(max_epochs={st['epochs']}, batch_size=256, lr=1e-3, "
        "weight_decay=1e-3, rng=seed)`, then `predict_expression(method=\"retrieval\", genes=HEG50)` (k=50, "
        "context=0.5). One model per training set and seed (the five `B4 -> C` folds share theirs).",
        "* histoclip regression: `predict_expression(method=\"regression\", genes=HEG50)` on the seed-0 model (the "
        "head does not use the contrastive weights). Inner CV: leave one training section out; with one training "
        "section (B4), five spatial stripes.",
        "* ridge s100 (HEST protocol): Lite0 features of the 100 um patch (raw), standardised, PCA 256, ridge, "
        "alpha in logspace(0, 5, 11) by the same inner CV. kNN s100: 50 PCs, cosine, k in "
        f"{list(KS)} by the same inner CV. training mean: r undefined, counted as 0.",
        f"* Wall time of the run: {st['total_s']:.0f} s on {st['threads']} thread(s), load average "
        f"{' '.join(st['load'])} at the end (2 shared cores).",
        "",
        "![B4 -> C3](prediction_C3.png)",
        "",
    ]
    return "\n".join(lines)


def figure(fd: dict, measured: ad.AnnData, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    r_reg = fd["r"]["histoclip regression"]
    top = [fd["heg"][i] for i in np.argsort(-r_reg)[:3]]
    meas = measured[:, fd["heg"]].copy()
    f1 = hc.pl.predicted_expression(meas, fd["pred"], top, spot_diameter_um=100)
    f1.canvas.draw()  # the title right above the panels' own titles: no empty band, no overlap
    inv = f1.transFigure.inverted()
    top_y = max(inv.transform(ax.get_tightbbox(f1.canvas.get_renderer()))[1, 1] for ax in f1.axes)
    f1.suptitle(f"{fd['fold']} (patient-level): histoclip regression, its 3 best-predicted HEG", y=top_y + 0.005,
                va="bottom")
    fig2, ax = plt.subplots(figsize=(7.2, 3.4))
    hc.pl.gene_correlation({k: pd.Series(v, index=fd["heg"]) for k, v in fd["r"].items()}, ax=ax)
    ax.set_title(f"{fd['fold']}: per-gene r over the 50 HEG", fontsize=10)
    if ax.get_legend() is not None:  # the legend below the axes, off the bars
        h, lab = ax.get_legend_handles_labels()
        ax.get_legend().remove()
        ax.legend(h, lab, loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=8, frameon=False)
    bufs = []
    for f in (f1, fig2):
        b = io.BytesIO()
        f.savefig(b, dpi=110, bbox_inches="tight", facecolor="white")
        plt.close(f)
        b.seek(0)
        bufs.append(Image.open(b).convert("RGB"))
    w = max(i.width for i in bufs)
    out = Image.new("RGB", (w, sum(i.height for i in bufs)), "white")
    y = 0
    for i in bufs:
        out.paste(i, ((w - i.width) // 2, y))
        y += i.height
    out.save(path)


if __name__ == "__main__":
    main()
