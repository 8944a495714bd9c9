"""Expression from the H&E image alone: leave-one-section-out benchmark on HER2ST patient C (C2-C6).

    OMP_NUM_THREADS=2 python benchmarks/prediction.py [h5ad ...] [--seeds 0 1 2] [--epochs 150]

Each fold trains on four sections and predicts the fifth from its image only (the held-out section is passed to the
predictors without counts). Gene sets are chosen on the four training sections only: the 50 most highly expressed
genes (mean log-normalised expression) and the 50 most variable (scanpy ``highly_variable_genes``, seurat flavour,
``n_top_genes=50``, on the concatenated log-normalised training sections). Target: log1p of counts per 10,000.
Metric: Pearson r per gene over the held-out section's spots (a constant prediction or gene counts as r = 0,
``hc.metrics.gene_pearson``), summarised as the mean, the median and the number of genes with r > 0.3.

Methods (same folds, same features):
  * ``histoclip retrieval``  HistoCLIP trained contrastively on the multi-scale image features
    (``image_features_key``), genes = top-1000 training HVGs + both evaluation sets, then
    ``hc.tl.predict_expression(method="retrieval")``; seeds 0, 1, 2.
  * ``histoclip regression`` ``hc.tl.predict_expression(method="regression")`` (ridge head on per-section z-scored
    multi-scale features + neighbour mean, PCA 256, alpha by inner leave-one-section-out CV). Deterministic.
  * ``ridge (HEST)``  frozen EfficientNet-Lite0 features of the 100 um spot patch only, standardised, PCA 256, ridge
    with alpha chosen by inner leave-one-training-section-out CV. Deterministic.
  * ``kNN``  k-nearest-neighbour regression on the same spot features (cosine on 50 PCs, k by inner CV).
  * ``training mean``  every spot gets the training mean: r undefined, reported as 0.

Image features: ``hc.tl.image_features`` with two frozen ImageNet backbones, EfficientNet-Lite0 (1752-d per patch)
and EfficientNet-Lite2 (1800-d), at 100, 200, 300, 600, 900 and 1200 um (tta=False), computed once per section from
the full-resolution JPG and cached in benchmarks/cache/. The HEST-style spot features are the Lite0 100 um block of
the same array (the first 1752 columns).
Writes benchmarks/results/prediction.json, prediction.md and prediction_<section>.png.
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

os.environ.setdefault("OMP_NUM_THREADS", "2")

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
import torch

import histoclip as hc

warnings.filterwarnings("ignore")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = REPO.parent / "shared" / "data" / "her2st"
DEFAULT = [DATA / f"HER2ST_C{i}.h5ad" for i in range(2, 7)]
CACHE = HERE / "cache"
RESULTS = HERE / "results"
SIZES_UM = (100, 200, 300, 600, 900, 1200)
TTA = False
BACKBONE = ("efficientnet-lite0", "efficientnet-lite2")
BACKBONE_TXT = "EfficientNet-Lite0 + Lite2 (ImageNet, frozen; 1752 + 1800 features per patch)"
FEAT_KEY = "X_histoclip_features"
ALPHAS = np.logspace(0, 5, 11)
KS = (5, 10, 20, 50, 100)
N_EVAL = 50
METRIC = ("Pearson r between measured and predicted log1p(CP10k) expression of each gene over the held-out "
          "section's spots; a constant prediction or a constant gene counts as r = 0. Per gene set: mean, median "
          "and number of genes with r > 0.3. Gene sets (50 HEG: highest mean log-normalised expression; 50 HVG: "
          "scanpy highly_variable_genes, seurat flavour) are chosen on the four training sections only.")


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
        b = ad.AnnData(X=X, obs=a.obs.copy(), var=pd.DataFrame(index=genes), uns=a.uns, obsm=dict(a.obsm))
        out.append(b)
    return out


def add_features(a: ad.AnnData) -> float:
    """Multi-scale features of both backbones into obsm (cached on disk); returns seconds spent extracting."""
    lib = str(a.obs["section"].iloc[0])
    tag = f"{lib}_{'+'.join(BACKBONE)}_{'-'.join(str(s) for s in SIZES_UM)}um_tta{int(TTA)}_n{a.n_obs}"
    path = CACHE / f"{tag}.npy"
    params = {"backbone": list(BACKBONE), "weights": None, "sizes_um": [float(s) for s in SIZES_UM], "patch_px": 224,
              "tta": TTA, "key_added": FEAT_KEY}
    if path.is_file():
        a.obsm[FEAT_KEY] = np.load(path)
        a.uns.setdefault("histoclip", {}).setdefault("params", {})["image_features"] = params
        return 0.0
    t = time.time()
    hc.tl.image_features(a, backbone=list(BACKBONE), sizes_um=SIZES_UM, tta=TTA, img_key="fullres",
                         spot_diameter_um=100, key_added=FEAT_KEY, batch_size=32, accelerator="cpu")
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(path, a.obsm[FEAT_KEY])
    return time.time() - t


def lognorm(a: ad.AnnData) -> ad.AnnData:
    b = ad.AnnData(X=a.X.copy(), obs=a.obs[["section"]].copy(), var=pd.DataFrame(index=a.var_names))
    sc.pp.normalize_total(b, target_sum=1e4)
    sc.pp.log1p(b)
    return b


def top_hvg(b: ad.AnnData, n: int) -> list[str]:
    c = b.copy()
    sc.pp.highly_variable_genes(c, flavor="seurat", n_top_genes=n)
    return list(c.var_names[c.var["highly_variable"].to_numpy()])


# ---------------------------------------------------------------------------------------------- baselines
def _r(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    return hc.metrics.gene_pearson(y, pred).to_numpy()


def ridge_preds(Ftr, Ytr, Fte, alphas, n_pcs=256):
    mu, sd = Ftr.mean(0), Ftr.std(0) + 1e-6
    Ztr, Zte = (Ftr - mu) / sd, (Fte - mu) / sd
    ym = Ytr.mean(0)
    U, s, Vt = np.linalg.svd(Ztr, full_matrices=False)
    U, s, Vt = U[:, :n_pcs], s[:n_pcs], Vt[:n_pcs]
    A, B = Zte @ Vt.T, U.T @ (Ytr - ym)
    return [A @ ((s / (s**2 + a))[:, None] * B) + ym for a in alphas]


def _inner_cv(preds, grid, Ftr, Ytr, groups, Fte, n_score):
    """The grid value with the best leave-one-training-section-out mean r over the first ``n_score`` targets (the
    training HEG), and the test predictions refitted on all training spots with it."""
    score = np.zeros(len(grid))
    for g in np.unique(groups):
        m = groups == g
        for i, P in enumerate(preds(Ftr[~m], Ytr[~m], Ftr[m], grid)):
            score[i] += _r(P[:, :n_score], Ytr[m][:, :n_score]).mean()
    best = grid[int(np.argmax(score))]
    return preds(Ftr, Ytr, Fte, [best])[0], best


def ridge_cv(Ftr, Ytr, groups, Fte, n_score):
    """Ridge on standardised top-256 PCs; alpha by inner leave-one-training-section-out CV."""
    P, alpha = _inner_cv(ridge_preds, ALPHAS, Ftr, Ytr, groups, Fte, n_score)
    return P, {"alpha": float(alpha)}


def knn_preds(Ftr, Ytr, Fte, ks):
    """Cosine k-NN on 50 PCs of the standardised features, similarity-weighted mean; one prediction per k."""
    mu, sd = Ftr.mean(0), Ftr.std(0) + 1e-6
    Ztr = (Ftr - mu) / sd
    Vt = np.linalg.svd(Ztr, full_matrices=False)[2]
    P = Vt[:50].T
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


def knn_cv(Ftr, Ytr, groups, Fte, n_score):
    """k-NN regression; k by inner leave-one-training-section-out CV."""
    P, k = _inner_cv(knn_preds, KS, Ftr, Ytr, groups, Fte, n_score)
    return P, {"k": int(k)}


# ---------------------------------------------------------------------------------------------- main
def summarise(r: np.ndarray) -> dict:
    return {"mean_r": float(np.mean(r)), "median_r": float(np.median(r)), "n_r_gt_0.3": int((r > 0.3).sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("h5ad", nargs="*", type=Path, default=DEFAULT)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--figure-section", default="C3")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--report-only", action="store_true", help="rewrite prediction.md from prediction.json")
    args = ap.parse_args()
    if args.report_only:
        res = json.loads((args.out / "prediction.json").read_text())
        rows, st = res["records"], res["settings"]
        table = report(rows, st["sections"], st["retrieval"]["seeds"])
        print(table["console"])
        (args.out / "prediction.md").write_text(markdown(table, st))
        return
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    hc.settings.progress = False
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    secs = load_sections(args.h5ad)
    names = [str(a.obs["section"].iloc[0]) for a in secs]
    extract_s = {n: round(add_features(a), 1) for n, a in zip(names, secs, strict=True)}
    print(f"features ({BACKBONE}, sizes {SIZES_UM} um, tta={TTA}): "
          + ", ".join(f"{n} {a.obsm[FEAT_KEY].shape} extract {extract_s[n]} s"
                      for n, a in zip(names, secs, strict=True)),
          file=sys.stderr, flush=True)
    logn = {n: lognorm(a) for n, a in zip(names, secs, strict=True)}
    d = 1752  # the first block (Lite0, 100 um) = HEST-style spot features

    rows, fig_data = [], {}
    train_cfg = dict(max_epochs=args.epochs, batch_size=256, lr=1e-3, weight_decay=1e-3)
    model_cfg = dict(latent_dim=256, temperature=0.1)
    for ti, test in enumerate(names):
        tr_idx = [i for i in range(len(names)) if i != ti]
        train_ln = ad.concat([logn[names[i]] for i in tr_idx])
        heg = list(train_ln.var_names[np.argsort(-np.asarray(train_ln.X.mean(0)).ravel(), kind="stable")[:N_EVAL]])
        hvg = top_hvg(train_ln, N_EVAL)
        hvg1k = top_hvg(train_ln, 1000)
        model_genes = list(dict.fromkeys(heg + hvg + hvg1k))
        eval_genes = heg + hvg
        sets = {"HEG50": heg, "HVG50": hvg}
        ytr = np.asarray(train_ln[:, eval_genes].X.todense(), dtype=np.float64)
        yte = np.asarray(logn[test][:, eval_genes].X.todense(), dtype=np.float64)
        groups = np.asarray(train_ln.obs["section"]).astype(str)
        Ftr = np.concatenate([secs[i].obsm[FEAT_KEY] for i in tr_idx]).astype(np.float64)
        Fte = secs[ti].obsm[FEAT_KEY].astype(np.float64)
        query = secs[ti][:, :0].copy()  # the held-out section without counts: image, spots, features only
        preds: dict[tuple[str, int | None], tuple[np.ndarray, float, dict]] = {}

        t = time.time()
        P = np.repeat(ytr.mean(0, keepdims=True), len(yte), 0)
        preds[("training mean", None)] = (P, time.time() - t, {})
        t = time.time()
        P, info = ridge_cv(Ftr[:, :d], ytr, groups, Fte[:, :d], N_EVAL)
        preds[("ridge s100 (HEST)", None)] = (P, time.time() - t, info)
        t = time.time()
        P, info = knn_cv(Ftr[:, :d], ytr, groups, Fte[:, :d], N_EVAL)
        preds[("kNN s100", None)] = (P, time.time() - t, info)

        train_ads = [secs[i] for i in tr_idx]
        for seed in args.seeds:
            t = time.time()
            model = hc.model.HistoCLIP(train_ads, genes=model_genes, image_features_key=FEAT_KEY, **model_cfg)
            model.train(rng=seed, accelerator="cpu", **train_cfg)
            t_train = time.time() - t
            out = hc.tl.predict_expression(query, model, method="retrieval")
            P = np.asarray(out[:, eval_genes].X, dtype=np.float64)
            info = {"train_s": round(t_train, 1), "final_loss": float(model.history["loss"].iloc[-1])}
            preds[("histoclip retrieval", seed)] = (P, time.time() - t, info)
            if seed == args.seeds[0]:  # the regression head ignores the contrastive weights: deterministic
                t = time.time()
                out = hc.tl.predict_expression(query, model, method="regression")
                P = np.asarray(out[:, eval_genes].X, dtype=np.float64)
                alpha = out.uns["histoclip"]["params"]["predict_expression"]["alpha"]
                preds[("histoclip regression", None)] = (P, time.time() - t, {"alpha": float(alpha)})
                reg_out = out

        for (method, seed), (P, wall, info) in preds.items():
            r_all = hc.metrics.gene_pearson(yte, P, eval_genes)
            if method == "training mean":  # constant prediction: r undefined, counted as 0 (not rounding noise)
                r_all[:] = 0.0
            for gs in sets:
                r = r_all.iloc[:N_EVAL].to_numpy() if gs == "HEG50" else r_all.iloc[N_EVAL:].to_numpy()
                row = {"method": method, "section": test, "gene_set": gs, "seed": seed, **summarise(r),
                       "wall_s": round(wall, 2), "n_train_spots": int(len(ytr)), "n_test_spots": int(len(yte)), **info}
                rows.append(row)
                print(json.dumps(row), flush=True)
        if test == args.figure_section:
            fig_data = {"section": test, "index": ti, "heg": heg, "reg": reg_out,
                        "r": {m if s is None or m != "histoclip retrieval" else f"{m} (seed {s})":
                              hc.metrics.gene_pearson(yte[:, :N_EVAL], P[:, :N_EVAL], heg)
                              for (m, s), (P, _, _) in preds.items()
                              if m != "training mean" and (s is None or s == args.seeds[0])}}
        print(f"fold {test} done ({time.time() - t0:.0f} s elapsed)", file=sys.stderr, flush=True)

    settings = {
        "sections": names, "protocol": "leave-one-section-out (train on the other sections, predict from the image)",
        "features": {"backbone": BACKBONE_TXT, "sizes_um": list(SIZES_UM),
                     "tta": TTA, "patch_px": 224, "spot_diameter_um": 100, "img_key": "fullres",
                     "extract_s": extract_s},
        "retrieval": {"model": model_cfg, "train": train_cfg, "k": 50, "context": 0.5, "seeds": args.seeds,
                      "genes": "top-1000 training HVG + HEG50 + HVG50"},
        "regression": "hc.tl.predict_expression(method='regression') defaults",
        "baselines": {"ridge": "100 um block, standardise, PCA 256, alpha in logspace(0,5,11) by inner LOSO",
                      "knn": f"100 um block, 50 PCs, cosine, k in {KS} by inner LOSO"},
        "deterministic": ["histoclip regression", "ridge s100 (HEST)", "kNN s100", "training mean"],
        "threads": int(os.environ.get("OMP_NUM_THREADS", "2")), "total_s": round(time.time() - t0, 1),
    }
    result = {"metric": METRIC, "settings": settings, "records": rows}
    (args.out / "prediction.json").write_text(json.dumps(result, indent=1))
    table = report(rows, names, args.seeds)
    print(table["console"])
    (args.out / "prediction.md").write_text(markdown(table, settings))
    if fig_data:
        figure(fig_data, secs[fig_data["index"]], args.out / f"prediction_{fig_data['section']}.png")


ORDER = ["histoclip regression", "histoclip retrieval", "ridge s100 (HEST)", "kNN s100", "training mean"]


def report(rows: list[dict], names: list[str], seeds: list[int]) -> dict:
    df = pd.DataFrame(rows)
    lines, md, means = [], [], []
    hdr = ["method", "section", "HEG50 mean", "HEG50 median", "HEG50 n>0.3", "HVG50 mean", "HVG50 median",
           "HVG50 n>0.3", "s/fold"]
    for m in ORDER:
        sub = df[df.method == m]
        per = []
        for s in names + ["5-fold mean"]:
            part = sub if s == "5-fold mean" else sub[sub.section == s]
            cells = [m, s]
            for gs in ("HEG50", "HVG50"):
                g = part[part.gene_set == gs]
                # seeds: mean over seeds per section, then over sections
                by = g.groupby("section")[["mean_r", "median_r", "n_r_gt_0.3"]].mean().mean()
                txt = f"{by['mean_r']:.3f}"
                if m == "histoclip retrieval":
                    sp_ = g.groupby("seed")["mean_r"].mean() if s == "5-fold mean" else g["mean_r"]
                    txt += f" ± {sp_.std(ddof=1) if len(sp_) > 1 else 0:.3f}"
                cells += [txt, f"{by['median_r']:.3f}", f"{by['n_r_gt_0.3']:.1f}" if s == "5-fold mean" or
                          m == "histoclip retrieval" else f"{int(by['n_r_gt_0.3'])}"]
            cells.append(f"{part[part.gene_set == 'HEG50'].groupby('section')['wall_s'].mean().mean():.1f}")
            per.append(cells)
            if s == "5-fold mean":
                means.append(cells)
        md += per
    widths = [max(len(str(c)) for c in col) for col in zip(hdr, *md, strict=True)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    lines = [fmt(hdr), fmt(["-" * w for w in widths])] + [fmt(c) for c in md]
    return {"console": "\n".join(lines), "rows": md, "means": means, "header": hdr, "df": df}


def markdown(table: dict, settings: dict) -> str:
    hdr = table["header"]

    def mdt(rows):
        out = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
        return "\n".join(out + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])
    df = table["df"]
    heg = df[df.gene_set == "HEG50"].groupby(["method", "section"])["mean_r"].mean().groupby("method").mean()
    hvg = df[df.gene_set == "HVG50"].groupby(["method", "section"])["mean_r"].mean().groupby("method").mean()
    top2 = heg.sort_values(ascending=False).index[:2]
    f = settings["features"]
    # seed spread of the retrieval's 5-fold mean (the only stochastic method): a "tie" must be inside it
    ret = df[(df.gene_set == "HEG50") & (df.method == "histoclip retrieval")]
    spread = float(ret.groupby("seed")["mean_r"].mean().std(ddof=1)) if ret["seed"].nunique() > 1 else 0.0
    gap = heg[top2[0]] - heg[top2[1]]
    feats = (f"frozen {f['backbone']} features at {', '.join(str(s) for s in f['sizes_um'])} um "
             f"(tta={f['tta']})")
    if gap <= 2 * spread:
        best_txt = (f"**Best:** a tie on the 50 HEG between `{top2[0]}` ({heg[top2[0]]:.4f}) and `{top2[1]}` "
                    f"({heg[top2[1]]:.4f}): the gap ({gap:.4f}) is within twice the retrieval's seed spread "
                    f"({spread:.4f}). Both use {feats}.")
    else:
        best_txt = (f"**Best:** `{top2[0]}` ({heg[top2[0]]:.3f} mean r on the 50 HEG, {hvg[top2[0]]:.3f} on the 50 "
                    f"HVG), ahead of `{top2[1]}` ({heg[top2[1]]:.3f}, {hvg[top2[1]]:.3f}) by more than twice the "
                    f"retrieval's seed spread ({spread:.4f}); both use {feats}. The regression head (per-section "
                    "z-scored features + neighbour mean, PCA 256, ridge) is also deterministic and faster.")
    return "\n".join([
        "# Expression from the image: HER2ST patient C, leave-one-section-out",
        "",
        "Generated by `benchmarks/prediction.py` (numbers: `benchmarks/results/prediction.json`).",
        "",
        "**Metric.** " + METRIC,
        "",
        "## 5-fold means",
        "",
        mdt(table["means"]),
        "",
        "`histoclip retrieval`: mean over seeds " + ", ".join(map(str, settings["retrieval"]["seeds"]))
        + "; `±` is the standard deviation over seeds (per section: of that section's value; 5-fold mean: of the "
        "seed-wise 5-fold means). Every other method is deterministic (closed form or exhaustive search): one run. "
        "`s/fold`: wall seconds to fit and predict one fold (retrieval: contrastive training + prediction of one "
        f"seed; regression: ridge fit + prediction) on {settings['threads']} shared CPU threads, excluding the "
        "one-off feature extraction.",
        "",
        best_txt,
        "",
        "## Every held-out section",
        "",
        mdt(table["rows"]),
        "",
        "## Settings",
        "",
        f"* Sections: {', '.join(settings['sections'])}; full-resolution JPGs (`img_key=\"fullres\"`), legacy ST spots "
        "of 100 um (`spot_diameter_um=100`). Genes: union over sections (absent = 0 counts).",
        f"* Features: `hc.tl.image_features`, {f['backbone']}, patches of {f['sizes_um']} um resized to "
        f"{f['patch_px']} px, **tta={f['tta']}** (no flip/rotation averaging), computed once per section and cached "
        "in `benchmarks/cache/` (not part of `s/fold`: about 250 s per section of ~180 spots on one CPU thread, 12 "
        "backbone x size passes of 14-44 s each, measured while other jobs shared the machine). The HEST-style "
        "baselines use only the Lite0 100 um block (1752-d).",
        "* histoclip retrieval: `HistoCLIP(train, genes=top-1000 training HVG + HEG50 + HVG50, "
        f"image_features_key=..., "
        f"{', '.join(f'{k}={v}' for k, v in settings['retrieval']['model'].items())})`, `train("
        f"{', '.join(f'{k}={v}' for k, v in settings['retrieval']['train'].items())}, rng=seed)`, then "
        "`hc.tl.predict_expression(method=\"retrieval\")` (k=50, context=0.5, the model's temperature). Settings "
        "fixed before the run (BLEEP-like, from the research study), not tuned on held-out sections.",
        "* histoclip regression: `hc.tl.predict_expression(method=\"regression\")` on the same model (the head uses "
        "only the image features and the training sections' expression; alpha by inner leave-one-section-out CV).",
        "* ridge s100 (HEST protocol): standardise, PCA 256, ridge, alpha in logspace(0, 5, 11) chosen by "
        "leave-one-training-section-out CV on the mean r over the training HEG50.",
        f"* kNN s100: standardise, 50 PCs, cosine similarity, similarity-weighted mean of k neighbours, k in "
        f"{list(KS)} by the same inner CV.",
        "* training mean: r is undefined for a constant prediction and counted as 0.",
        "* Held-out sections are passed to the predictors without counts; gene sets, standardisation, PCA and "
        "hyperparameters use training sections only.",
        f"* Total wall time of the run: {settings['total_s']:.0f} s. Wall times are noisy: the 2 CPU cores were "
        "shared with other jobs (load 8-13 during the first folds), so the first folds are several times slower.",
        "",
        "## Notes",
        "",
        "* Retrieval epochs: 60 instead of the research study's 150, chosen for the CPU budget before any "
        "full-length result was seen (only a 5-epoch smoke test of fold C2 ran before); not tuned on held-out "
        "sections.",
        "* Feature cache of this run: C2 was extracted by `hc.tl.image_features` in this script; C3-C6 were copied "
        "into `benchmarks/cache/` from the research study's extraction of the same crops (same backbone, sizes, "
        "224 px, no TTA), after checking on C2 that the two are bit-identical (max abs difference 0.0). Deleting "
        "`benchmarks/cache/` makes the script extract everything itself.",
        "* The ridge penalty of the regression head was 1e5, the upper end of its grid, in every fold (the HEST "
        "baseline chose 1e4 in every fold); a wider grid was not tried, to avoid tuning on these results.",
        "* Compared with the research study (`ctx-ridge` 0.368, retrieval 0.341 on HEG50): the package regression "
        "head gives 0.358 (no TTA here: the study averaged 8 flips/rotations at 100 and 300 um, worth about +0.005 "
        "to +0.01) and retrieval 0.358 (3-seed mean). Neither is clearly below, so the package code was not changed.",
        "",
        "![C3](prediction_C3.png)",
        "",
    ])


def figure(fd: dict, measured: ad.AnnData, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    r_reg = fd["r"]["histoclip regression"]
    top = list(r_reg.sort_values(ascending=False).index[:3])
    f1 = hc.pl.predicted_expression(measured, fd["reg"], top, spot_diameter_um=100)
    f1.suptitle(f"{fd['section']} held out: histoclip regression, its 3 best-predicted HEG", y=1.0)
    fig2, ax = plt.subplots(figsize=(7.2, 3.8))
    hc.pl.gene_correlation(fd["r"], ax=ax)
    ax.set_title(f"{fd['section']} held out: per-gene r over the 50 HEG", fontsize=10)
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
