"""Spatial-domain benchmark: ARI/NMI of histoclip's representations and baselines on labelled slides, over seeds.

Usage: python benchmarks/domains.py [H5AD ...] [--label layer] [--n-domains K] [--seeds 0 1 2 3 4]
                                    [--ablation-seeds 0 1 2] [--out benchmarks/results/domains]
       python benchmarks/domains.py --pooled [H5AD H5AD ...] [--seeds 0 1 2 3 4] [--model-seeds 0 1 2]
                                    [--out benchmarks/results/domains_pooled]
--pooled clusters the slides together (one labelling, tl.domains with a list) and scores the pooled labels (one ARI
over every labelled spot of every slide) and each slide's share of them, beside each slide clustered alone; on the
slides as they are and on three altered copies of the last slide: its counts rescaled per gene (log-normal factors,
sd 0.5) and thinned to 60% (a section-wide technical shift), its white matter removed (a domain missing from one
section), and both.
Default slides: ../shared/data/dlpfc/DLPFC_151673.h5ad and DLPFC_151674.h5ad (relative to the repository); any
labelled h5ad in the scanpy/squidpy layout works, with or without an image (without one the model is expression-only).
The main table also scores three other candidates for the default after tl.embed (benchmarks/_candidates.py: the fused
latent alone, [expression, fused], the joint with its skip at half weight) beside the joint and each latent.
Metric: adjusted Rand index (and NMI) of the domains against obs[label], spots without a label ignored, with the number
of domains set to the number of labels; seed-to-seed: mean ARI between the domains of every pair of seeds. Every
method runs in this process on the same slide with one set of defaults for every slide (nothing is tuned per slide).
Prints one JSON record per slide, method and seed; writes <out>.json (with every spot's domain) and <out>.md (mean and
sd over seeds, seed-to-seed, main table and ablation table). --sensitivity-seeds adds a table with
one model default changed at a time (the joint, clustered as in the main table, and the scanpy workflow on it); with
--seeds and --ablation-seeds empty it runs alone:
       python benchmarks/domains.py --seeds --ablation-seeds --sensitivity-seeds 0 1 2 --out .../domains_sensitivity
--sensitivity-settings n_genes runs only the rows whose name starts with "n_genes" (merge with --from-json).
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

import histoclip as hc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _candidates import candidate_domains, seed_to_seed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = [ROOT.parent / "shared" / "data" / "dlpfc" / f"DLPFC_{s}.h5ad" for s in ("151673", "151674")]
ABLATIONS = {
    "without the image branch": {"use_image": False},
    "without the expression-preserving term (reconstruction)": {"reconstruction_weight": 0.0},
    "without the cross-modal term": {"cross_modal_weight": 0.0},
    "without spatial context (no neighbourhood input, no neighbour term)": {"spatial_context": False},
    "without fusion weights (fixed 0.5/0.5)": {"fusion": "mean"},
}
#: one default changed at a time (--sensitivity-seeds): how much the joint moves with settings near the defaults
SENSITIVITY = {
    "defaults (n_components=50, context_um=100, spatial_temperature=0.5, n_genes=2000)": {},
    "n_components=20 (fewer expression components)": {"n_components": 20},
    "n_components=10": {"n_components": 10},
    "context_um=150 (wider neighbourhood)": {"context_um": 150.0},
    "spatial_temperature=0.2 (sharper neighbour term)": {"spatial_temperature": 0.2},
    "n_genes=1000 (fewer Moran's I genes)": {"n_genes": 1000},
    "n_genes=5000 (every gene of these slides)": {"n_genes": 5000},
}


def scanpy_workflow(adata: ad.AnnData, n_domains: int, seed: int) -> None:
    """neighbors(use_rep="X_histoclip") + leiden at the resolution giving ``n_domains``, no smoothing, no PCA."""
    hc.tl.domains(adata, n_domains=n_domains, use_rep="X_histoclip", method="leiden", radius_um=0, n_pcs=None,
                  rng=seed)


def untrained_inputs(adata: ad.AnnData, model: hc.HistoCLIP) -> np.ndarray:
    """What the model sees, scaled and concatenated, with no training: the expression projections of each spot and of
    its neighbourhood (the model's own basis and graph) and its patch's colour statistics (none without an image), each
    block scaled to unit total variance."""
    import torch

    from histoclip.data import PatchDataset
    from histoclip.module._module import patch_colour_targets

    section, inputs = model._resolve_query(adata, "joint")
    own = inputs.expression  # each spot's projection on the model's expression basis
    nbr = np.asarray(section.graph @ own)
    blocks = [own, nbr]
    if section.reader is not None:
        loader = torch.utils.data.DataLoader(PatchDataset(section.reader, None, None), batch_size=512)
        blocks.append(np.concatenate([patch_colour_targets(img).numpy() for img, _, _ in loader]))
    return np.concatenate([(b - b.mean(0)) / np.sqrt(((b - b.mean(0)) ** 2).sum(1).mean()) for b in blocks], axis=1)


def group_seed_to_seed(group: pd.DataFrame) -> float:
    """Seed-to-seed agreement of one row's records (NaN for records of earlier runs, which kept no domains)."""
    if "labels" not in group or group["labels"].isna().any():
        return float("nan")
    return seed_to_seed([v.split(",") for v in group["labels"]])


def shifted(adata: ad.AnnData, seed: int = 0) -> ad.AnnData:
    """A copy with every gene's counts rescaled by a log-normal factor (sd 0.5) and thinned to 60%."""
    import scipy.sparse as sp

    r = np.random.default_rng(seed)
    out = adata.copy()
    x = sp.csr_matrix(out.X).astype(np.float64)
    x = x.multiply(np.exp(r.normal(0, 0.5, x.shape[1]))[None, :]).tocsr()
    x.data = np.floor(x.data + r.random(x.data.size))
    x.data = r.binomial(x.data.astype(np.int64), 0.6).astype(np.float64)
    x.eliminate_zeros()
    out.X = x.astype(np.float32)
    return out


def pooled(paths: list[str], label: str, n_domains: int | None, seeds: list[int], model_seeds: list[int],
           records: list[dict]) -> None:
    """Several slides clustered together: model-free (centering on and off) and the joint embedding of one model."""
    slides = {}
    for path in paths:
        a = ad.read_h5ad(path)
        if "gene_symbol" in a.var:
            a.var_names = a.var["gene_symbol"].astype(str).to_numpy()
            a.var_names_make_unique()
        slides[Path(path).stem] = a
    names = list(slides)
    last = names[-1]
    no_wm = lambda a: a[a.obs[label].astype(str) != "WM"].copy()  # noqa: E731
    variants = {
        "as they are": slides,
        f"{last} shifted": {**slides, last: shifted(slides[last])},
        f"{last} without WM": {**slides, last: no_wm(slides[last])},
        f"{last} shifted, without WM": {**slides, last: no_wm(shifted(slides[last]))},
    }
    k = n_domains or int(pd.concat([a.obs[label] for a in slides.values()]).dropna().nunique())

    def score(variant, method, seed, tables, seconds, extra=None):
        truth = pd.concat([t.obs[label].astype(object) for t in tables])
        pred = pd.concat([t.obs["histoclip_domain"].astype(object) for t in tables])
        scores = hc.metrics.domain_scores(truth, pred)
        r = {"table": "pooled", "variant": variant, "method": method, "seed": seed,
             "ari": scores["ari"], "nmi": scores["nmi"],
             "wall_s": round(seconds, 2), "loadavg_1min": round(os.getloadavg()[0], 2), **(extra or {})}
        for name, t in zip(names, tables, strict=True):
            r[f"ari_{name}"] = hc.metrics.domain_scores(t.obs[label], t.obs["histoclip_domain"])["ari"]
        records.append(r)
        print(json.dumps(r), flush=True)

    for variant, data in variants.items():
        tables = [data[n].copy() for n in names]
        for seed in seeds:
            t = time.perf_counter()
            for tab in tables:
                hc.tl.domains(tab, n_domains=k, rng=seed, use_rep="expression_pca")
            score(variant, "model-free, each slide alone", seed, tables, time.perf_counter() - t)
            for bc in ("center", None):
                t = time.perf_counter()
                hc.tl.domains(tables, n_domains=k, rng=seed, use_rep="expression_pca", batch_correction=bc)
                score(variant, f"model-free, pooled, batch_correction={bc!r}", seed, tables, time.perf_counter() - t)
        if variant not in ("as they are", f"{last} shifted"):
            continue
        for seed in model_seeds:
            t = time.perf_counter()
            for tab in tables:
                hc.pp.extract_patches(tab)
            model = hc.tl.train(tables, rng=seed)
            for tab in tables:
                hc.tl.embed(tab, model)
            t_model = time.perf_counter() - t
            for bc in ("center", None):
                t = time.perf_counter()
                hc.tl.domains(tables, n_domains=k, rng=seed, use_rep="X_histoclip", batch_correction=bc)
                score(variant, f"joint X_histoclip of one model trained on all slides, pooled, batch_correction={bc!r}",
                      seed, tables, t_model + time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("h5ad", nargs="*", default=[str(x) for x in DEFAULT])
    p.add_argument("--label", default="layer")
    p.add_argument("--n-domains", type=int, default=None)
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    p.add_argument("--ablation-seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--sensitivity-seeds", type=int, nargs="*", default=[],
                   help="seeds of the sensitivity table (one default changed at a time; off by default)")
    p.add_argument("--sensitivity-settings", nargs="*", default=None,
                   help="run only the sensitivity rows whose name starts with one of these (default: all)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "domains"))
    p.add_argument("--pooled", action="store_true", help="cluster the slides together (see the module docstring)")
    p.add_argument("--model-seeds", type=int, nargs="*", default=[0, 1, 2], help="--pooled: seeds of the model rows")
    p.add_argument("--from-json", nargs="*", default=[], help="summarise the records of earlier runs (one per slide, "
                   "run side by side) instead of running")
    args = p.parse_args()
    hc.settings.progress = False
    records = []
    merged = [json.loads(Path(f).read_text()) for f in args.from_json]
    for run in merged:
        records += run["records"]
    records.sort(key=lambda r: r.get("slide", ""))  # stable: per slide, in the order the runs wrote them
    # merged runs report the busiest start among them (per-record loads stay in the JSON), not this process's load
    load = max((tuple(run["loadavg_at_start"]) for run in merged), default=os.getloadavg())
    if args.pooled and not args.from_json:
        pooled(args.h5ad, args.label, args.n_domains, args.seeds, args.model_seeds, records)
    for path in [] if (args.from_json or args.pooled) else args.h5ad:
        adata = ad.read_h5ad(path)
        if "gene_symbol" in adata.var:
            adata.var_names = adata.var["gene_symbol"].astype(str).to_numpy()
            adata.var_names_make_unique()
        slide = Path(path).stem
        truth = adata.obs[args.label]
        k = args.n_domains or int(truth.dropna().nunique())
        if any(entry.get("images") for entry in adata.uns.get("spatial", {}).values()):
            hc.pp.extract_patches(adata)  # else tl.train builds an expression-only model (and logs it)

        def rec(table, method, seed, labels, seconds, truth=truth, slide=slide):
            s = hc.metrics.domain_scores(truth, labels)
            r = {"table": table, "slide": slide, "method": method, "seed": seed, "ari": s["ari"], "nmi": s["nmi"],
                 "wall_s": round(seconds, 2), "loadavg_1min": round(os.getloadavg()[0], 2)}
            print(json.dumps(r), flush=True)
            r["labels"] = ",".join(map(str, labels))  # every spot's domain: the seed-to-seed agreement
            records.append(r)

        for seed in sorted(set(args.seeds) | set(args.ablation_seeds) | set(args.sensitivity_seeds)):
            runs = [("main", "histoclip (defaults)", {})] if seed in args.seeds else []
            if seed in args.ablation_seeds:
                runs += [("ablation", name, kw) for name, kw in ABLATIONS.items()]
            if seed in args.sensitivity_seeds:
                runs += [("sensitivity", name, kw) for name, kw in SENSITIVITY.items()
                         if args.sensitivity_settings is None or name.startswith(tuple(args.sensitivity_settings))]
            for table, name, kwargs in runs:
                a = adata.copy()
                t = time.perf_counter()
                model = hc.tl.train(a, rng=seed, **kwargs)
                hc.tl.embed(a, model)
                t_model = time.perf_counter() - t
                t = time.perf_counter()
                hc.tl.domains(a, n_domains=k, use_rep="X_histoclip", rng=seed)  # not smoothed again (n_hops=None)
                t_dom = time.perf_counter() - t
                if table == "sensitivity":
                    rec(table, name, seed, a.obs["histoclip_domain"], t_model + t_dom)
                    t = time.perf_counter()
                    scanpy_workflow(a, k, seed)
                    rec(table, f"{name}; scanpy workflow (leiden)", seed, a.obs["histoclip_domain"],
                        time.perf_counter() - t)
                    continue
                if table == "ablation":
                    rec(table, name, seed, a.obs["histoclip_domain"], t_model + t_dom)
                    continue
                rec("main", "joint embedding X_histoclip (train + embed + domains)", seed,
                    a.obs["histoclip_domain"], t_model + t_dom)
                if "histoclip_image_weight" in a.obs:  # absent for an expression-only model (no image)
                    records[-1]["image_weight_mean"] = round(float(a.obs["histoclip_image_weight"].mean()), 4)
                rec("ablation", "histoclip (all components)", seed, a.obs["histoclip_domain"], t_model + t_dom)
                for rep, label in (("X_histoclip_expression", "expression latent alone"),
                                   ("X_histoclip_image", "image latent alone")):
                    if rep not in a.obsm:  # no image latent without an image
                        continue
                    t = time.perf_counter()
                    hc.tl.domains(a, n_domains=k, use_rep=rep, rng=seed)
                    rec("main", f"tl.domains on {rep} ({label})", seed, a.obs["histoclip_domain"],
                        t_model + time.perf_counter() - t)
                for description, labels, seconds in candidate_domains(a, model, n_domains=k, seed=seed):
                    rec("main", f"candidate default after embed: {description}", seed, labels, t_model + seconds)
                t = time.perf_counter()
                hc.tl.domains(a, n_domains=k, use_rep="X_histoclip", n_hops=2, rng=seed)
                rec("main", "joint X_histoclip smoothed again (2 hops within 150 um, as before n_hops=None)", seed,
                    a.obs["histoclip_domain"], t_model + t_dom + time.perf_counter() - t)
                t = time.perf_counter()
                scanpy_workflow(a, k, seed)
                rec("main", "scanpy workflow: neighbors(use_rep='X_histoclip') + leiden, no smoothing", seed,
                    a.obs["histoclip_domain"], time.perf_counter() - t)
                t = time.perf_counter()
                a.obsm["X_untrained"] = untrained_inputs(a, model)
                for hops, how in ((0, "same clustering as the joint (no smoothing)"), (2, "smoothed, 2 hops")):
                    hc.tl.domains(a, n_domains=k, use_rep="X_untrained", n_hops=hops, rng=seed)
                    rec("main", f"untrained: the model's inputs scaled and concatenated, {how}", seed,
                        a.obs["histoclip_domain"], time.perf_counter() - t)
                t = time.perf_counter()
                hc.tl.domains(a, n_domains=k, use_rep="expression_pca", rng=seed)  # after embed: not the default
                rec("main", "model-free: Moran-gene expression PCA (use_rep='expression_pca'; the default without a "
                    "model)", seed, a.obs["histoclip_domain"], time.perf_counter() - t)
                t = time.perf_counter()
                hc.tl.domains(a, n_domains=k, use_rep="expression_pca", n_hops=2, n_neighbors=6, rng=seed)
                rec("main", "model-free, earlier grid smoothing: 2 hops of 6-NN", seed, a.obs["histoclip_domain"],
                    time.perf_counter() - t)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"loadavg_at_start": load, "records": records}, indent=1))
    # the busiest minute of the run: the start or any record (a run beside another one loads both cores)
    peak_load = max([load[0]] + [r["loadavg_1min"] for r in records if "loadavg_1min" in r])
    df = pd.DataFrame(records)
    lines = ["# Spatial domains on DLPFC", "",
             f"ARI and NMI against `obs['{args.label}']` (unlabelled spots ignored), as many domains as labels; mean "
             "and "
             f"sd over seeds (main table: seeds {args.seeds}; ablations: seeds {args.ablation_seeds}"
             + (f"; sensitivity: seeds {args.sensitivity_seeds}" if args.sensitivity_seeds else "")
             + "). Every row uses the package defaults except a setting it names (30 epochs for a Visium slide, "
             "16 px patches of the lowres image, GMM with tied covariance, 50 restarts); wall time = train + embed + "
             "domains per slide and seed on the 2-core CPU, "
             f"shared with other jobs (1-min load up to {peak_load:.1f}, at the start or any record). "
             "Seed-to-seed: mean ARI between the domains of every pair of seeds. Produced by `benchmarks/domains.py`.",
             ""]
    if args.pooled:
        lines[0] = "# Spatial domains on several DLPFC sections clustered together"
        lines[2] = (f"Pooled ARI: one ARI over every labelled spot of every slide against `obs['{args.label}']`, with "
                    "as many domains as labels; per-slide ARI of the same labels beside it. Mean and sd over seeds "
                    f"(model-free: {args.seeds}; model rows: {args.model_seeds}). Package defaults throughout; "
                    f"1-min load up to {peak_load:.1f}. Produced by `benchmarks/domains.py --pooled`.")
        # slides clustered alone have labels of their own: a pooled ARI over them would compare unmatched labels
        df.loc[df["method"].str.endswith("alone"), ["ari", "nmi"]] = np.nan
        per = [c for c in df.columns if c.startswith("ari_")]
        agg = {"ari_mean": ("ari", "mean"), "ari_sd": ("ari", "std"), **{c: (c, "mean") for c in per},
               "wall_s": ("wall_s", "mean"), "n": ("seed", "count")}
        summary = df.groupby(["variant", "method"], sort=False).agg(**agg)
        head = " | ".join(c[4:] for c in per)
        lines += [f"| slides | method | pooled ARI mean | sd | {head} | wall s | seeds |",
                  "|---|---|---|---|" + "---|" * len(per) + "---|---|"]
        for (variant, method), row in summary.iterrows():
            lines.append(f"| {variant} | {method} | {row.ari_mean:.3f} | {row.ari_sd:.3f} | ".replace("nan", "-")
                         + " | ".join(f"{row[c]:.3f}" for c in per) + f" | {row.wall_s:.1f} | {int(row.n)} |")
        print(summary.round(3).to_string())
    for table in ("main", "ablation", "sensitivity"):
        sub = df[df.table == table] if "table" in df else df.iloc[:0]
        if sub.empty:
            continue
        summary = sub.groupby(["method", "slide"], sort=False).agg(
            ari_mean=("ari", "mean"), ari_sd=("ari", "std"), nmi_mean=("nmi", "mean"), wall_s=("wall_s", "mean"),
            n=("seed", "count"))
        summary["seed_to_seed"] = [group_seed_to_seed(g) for _, g in sub.groupby(["method", "slide"], sort=False)]
        lines += [f"## {table}", "",
                  "| method | slide | ARI mean | ARI sd | NMI mean | seed-to-seed | wall s | seeds |",
                  "|---|---|---|---|---|---|---|---|"]
        for (method, slide), row in summary.iterrows():
            lines.append(f"| {method} | {slide} | {row.ari_mean:.3f} | {row.ari_sd:.3f} | {row.nmi_mean:.3f} | "
                         f"{row.seed_to_seed:.2f} | {row.wall_s:.1f} | {int(row.n)} |".replace("nan", "-"))
        lines.append("")
        print(summary.round(3).to_string())
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
