"""Wall time and peak memory of each histoclip stage at 1k, 10k and 100k spots.

Data: the bundled DLPFC 151673 slide (histoclip.datasets.dlpfc(), 3639 spots x 5000 genes, 600 x 600 lowres
image) tiled k x k: the lowres image is tiled the same way (np.tile), every tile's spot coordinates are offset by
one image width/height (in full-resolution pixels) and jittered (normal, sd 2 full-res px), the counts are
repeated; then exactly N spots are drawn without replacement (seeded). k = ceil(sqrt(N / 3639)).

Each stage runs in a fresh subprocess that loads the previous stage's output from disk; its wall time covers the
histoclip call only (not loading/saving), its memory is the subprocess's peak RSS (VmHWM of /proc/self/status),
which includes importing torch/scanpy and reading the h5ad (the "baseline" row measures that alone). Stages:
extract (hc.pp.extract_patches: boxes only, pixels are read lazily by training), train (hc.tl.train with every
default: 2000 Moran's I genes with spatial context, small CNN on patches of the automatic patch_px (16 here: the
lowres image gives 9 px patches), batch 256, epochs from
hc.model.default_max_epochs(N), CPU), embed (hc.tl.embed), domains (hc.tl.domains with its defaults: Moran genes
-> PCA 10 -> 2 rounds of averaging within 150 um (the 6-NN ring on Visium) -> tied GMM, 20 restarts), predict
(hc.tl.predict_expression, retrieval from the image against the training spots, which here are the same spots: a
cost measurement, not an accuracy one).
The 1-minute load average before and after each stage is recorded, so runs on a busy machine show as such.

    python benchmarks/speed.py [--sizes 1000 10000 100000] [--threads 1]

Visium HD depth (issue 23; not run by default): ``--hd-depth 200`` thins every spot's counts to ~200 UMIs
(binomial, each tile drawn anew, so tiles differ) and writes ``results/speed_hd.*``; the rows asked for are

    nice -n 10 python benchmarks/speed.py --hd-depth 200 --sizes 20000 300000 1000000 --stages baseline extract \
        train embed domains

(1M needs ~1.5 GB of thinned counts and a 10k x 10k px tiled image; check free memory first.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
STAGES = ("baseline", "extract", "train", "embed", "domains", "predict")


def thin(x, umis: float, gen):
    """Binomial thinning of each row of a CSR count matrix to about ``umis`` counts (rows below keep theirs)."""
    import numpy as np

    x = x.tocsr().astype(np.float32)
    totals = np.asarray(x.sum(axis=1)).ravel()
    p = np.minimum(1.0, umis / np.maximum(totals, 1.0))
    rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
    x.data = gen.binomial(x.data.astype(np.int64), p[rows]).astype(np.float32)
    x.eliminate_zeros()
    return x


def build_slide(n: int, path: Path, seed: int = 0, umis_per_spot: float | None = None) -> dict:
    import numpy as np
    import scipy.sparse as sp

    import histoclip as hc

    a = hc.datasets.dlpfc()
    lib = next(iter(a.uns["spatial"]))
    entry = a.uns["spatial"][lib]
    img = entry["images"]["lowres"]
    scalef = entry["scalefactors"]["tissue_lowres_scalef"]
    k = max(1, math.ceil(math.sqrt(n / a.n_obs)))
    h, w = img.shape[:2]
    gen = np.random.default_rng(seed)
    coords = []
    for ty in range(k):
        for tx in range(k):
            xy = a.obsm["spatial"].astype(np.float64) + np.array([tx * w / scalef, ty * h / scalef])
            coords.append(xy + gen.normal(0, 2.0, size=xy.shape))
    take = np.sort(gen.choice(k * k * a.n_obs, size=n, replace=False))  # the same draws as when counts were tiled
    xy = np.concatenate(coords)[take]
    blocks = []  # only the rows taken are built, so 1M spots never hold k * k copies of the slide's counts
    for t in range(k * k):
        rows = take[(take >= t * a.n_obs) & (take < (t + 1) * a.n_obs)] - t * a.n_obs
        block = sp.csr_matrix(a.X)[rows]
        blocks.append(thin(block, umis_per_spot, gen) if umis_per_spot else block)  # each tile thinned anew
    x = sp.vstack(blocks).tocsr()
    import anndata as ad

    out = ad.AnnData(X=x, var=a.var.copy())
    out.obs_names = [f"s{i}" for i in range(n)]
    out.obsm["spatial"] = xy
    out.uns["spatial"] = {lib: {"images": {"lowres": np.tile(img, (k, k, 1))},
                                "scalefactors": dict(entry["scalefactors"]),
                                "metadata": dict(entry.get("metadata", {}))}}
    out.write_h5ad(path)
    return {"k": k, "image_shape": list(out.uns["spatial"][lib]["images"]["lowres"].shape), "n_genes": out.n_vars,
            "umis_per_spot_median": float(np.median(np.asarray(x.sum(axis=1)).ravel())), "nnz": int(x.nnz)}


def _peak_rss_mb() -> float:
    """This process's peak resident memory in MiB: VmHWM of /proc/self/status.

    Not ``getrusage``'s ``ru_maxrss``: Linux carries the parent's peak across fork + exec into it, so a stage started by
    a parent that built a 1M-spot slide would report the parent's memory.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return float(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: the best there is


def run_stage(stage: str, work: Path, epochs: int | None = None) -> dict:
    """Body of one subprocess: load inputs, time one histoclip call, save outputs, report peak RSS."""
    import anndata as ad
    import numpy as np

    import histoclip as hc

    hc.settings.progress = False
    extra: dict = {}
    adata = ad.read_h5ad(work / ("patched.h5ad" if stage not in ("baseline", "extract") else "slide.h5ad"))
    t = time.perf_counter()
    if stage == "baseline":
        pass
    elif stage == "extract":
        hc.pp.extract_patches(adata)
        seconds = time.perf_counter() - t
        adata.write_h5ad(work / "patched.h5ad")
    elif stage == "train":
        model = hc.tl.train(adata, max_epochs=epochs, accelerator="cpu", rng=0)
        seconds = time.perf_counter() - t
        epochs = model.history["seconds"].to_numpy(dtype=float)
        epoch_s = float(epochs.mean())
        extra = {"epochs": len(epochs), "patch_px": model.init_params["patch_px"], "epoch_seconds": epoch_s,
                 "first_epoch_seconds": float(epochs[0]),
                 "spots_per_second": adata.n_obs / epoch_s, "setup_seconds": seconds - float(epochs.sum())}
        model.save(work / "model", overwrite=True)
    elif stage in ("embed", "predict"):
        model = hc.model.HistoCLIP.load(work / "model", adata, accelerator="cpu")
        extra = {"load_seconds": time.perf_counter() - t}
        t = time.perf_counter()
        if stage == "embed":
            hc.tl.embed(adata, model)
            np.save(work / "embedding.npy", adata.obsm["X_histoclip"])
        else:
            hc.tl.predict_expression(adata, model, method="retrieval")  # the stage the results measured
    elif stage == "domains":
        if (work / "embedding.npy").exists():  # absent when the stages run leave out train and embed
            adata.obsm["X_histoclip"] = np.load(work / "embedding.npy")
        t = time.perf_counter()
        hc.tl.domains(adata)
        extra = {"n_domains_found": int(adata.obs["histoclip_domain"].nunique())}
    if stage != "extract":
        seconds = time.perf_counter() - t
    rss = _peak_rss_mb()
    return {"seconds": seconds, "peak_rss_mb": rss, **extra}


def _child(stage: str, work: Path, threads: int, epochs: int | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    load_before = os.getloadavg()[0]
    t = time.perf_counter()
    cmd = [sys.executable, __file__, "--stage", stage, "--work", str(work)]
    cmd += ["--epochs", str(epochs)] if epochs else []
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}",
                "process_seconds": time.perf_counter() - t}
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    rec["process_seconds"] = time.perf_counter() - t
    rec["loadavg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return rec


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    sizes = [int(s) for s in result["runs"]]
    for stage in STAGES[1:]:
        pts = [(n, result["runs"][str(n)].get(stage, {})) for n in sizes]
        pts = [(n, r) for n, r in pts if "seconds" in r]
        if not pts:
            continue
        ns = [n for n, _ in pts]
        ax_t.plot(ns, [max(r["seconds"], 1e-3) for _, r in pts], "o-", label=stage)
        ax_m.plot(ns, [r["peak_rss_mb"] / 1024 for _, r in pts], "o-", label=stage)
        if stage == "train" and all("epoch_seconds" in r for _, r in pts):
            ax_t.plot(ns, [r["epoch_seconds"] for _, r in pts], "o--", color=ax_t.lines[-1].get_color(),
                      label="train, per epoch")
    ref = [sizes[0], sizes[-1]]
    for ax in (ax_t, ax_m):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("spots (N)")
        ax.grid(True, which="both", alpha=0.3)
    t0 = result["runs"][str(sizes[0])].get("train", {}).get("epoch_seconds")
    if t0:
        ax_t.plot(ref, [t0, t0 * ref[1] / ref[0]], "k:", lw=0.8, label=f"linear (from the {sizes[0]:,}-spot epoch)")
    ax_t.set_ylabel("wall time of the call (s)")
    ax_m.set_ylabel("peak RSS of the stage's process (GiB)")
    ax_m.axhline(8, color="r", lw=0.8, ls=":", label="8 GiB")
    ax_t.legend(fontsize=8)
    ax_m.legend(fontsize=8)
    fig.suptitle(f"histoclip stages on tiled DLPFC 151673 (CPU, {result['threads']} threads; "
                 "training runs default_max_epochs(N) epochs)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_ratios(result: dict) -> None:
    """time(100k) / time(10k) per stage (10 = linear); training also per epoch and for the first epoch alone.

    For every other pair of consecutive sizes: time ratio over size ratio of train + embed and of every stage
    (``scaling``; 1 = linear in N).
    """
    runs = result["runs"]
    sizes = sorted(int(n) for n in runs)
    scaling = {}
    for a, b in zip(sizes, sizes[1:], strict=False):
        ra, rb = runs[str(a)], runs[str(b)]
        row = {"size_ratio": b / a}
        for stage in ("extract", "train", "embed", "domains"):
            if "seconds" in ra.get(stage, {}) and "seconds" in rb.get(stage, {}):
                row[f"{stage}_time_ratio"] = rb[stage]["seconds"] / max(ra[stage]["seconds"], 1e-9)
        if "train_time_ratio" in row and "embed_time_ratio" in row:
            row["train_embed_time_ratio"] = (rb["train"]["seconds"] + rb["embed"]["seconds"]) / max(
                ra["train"]["seconds"] + ra["embed"]["seconds"], 1e-9)
        scaling[f"{b}/{a}"] = row
    if scaling:
        result["scaling"] = scaling
    if "10000" not in runs or "100000" not in runs:
        return
    ratio = {}
    for stage in STAGES[1:]:
        a, b = runs["10000"].get(stage, {}), runs["100000"].get(stage, {})
        if "seconds" in a and "seconds" in b:
            ratio[stage] = b["seconds"] / max(a["seconds"], 1e-9)
        if stage == "train" and "epoch_seconds" in a and "epoch_seconds" in b:
            ratio["train_per_epoch"] = b["epoch_seconds"] / max(a["epoch_seconds"], 1e-9)
            # the first epoch reads every patch from the image at both sizes; later ones read the patch cache
            ratio["train_first_epoch"] = b["first_epoch_seconds"] / max(a["first_epoch_seconds"], 1e-9)
    tot = [sum(runs[s].get(st, {}).get("seconds", 0.0) for st in STAGES[1:]) for s in ("10000", "100000")]
    ratio["all_stages"] = tot[1] / tot[0]
    result["time_ratio_100k_over_10k"] = ratio


def markdown(result: dict) -> str:
    """The tables of docs/performance.md, from speed.json."""
    lines = ["| N | stage | time (s) | peak RSS (GiB) | load avg (before, after) | note |", "|---|---|---|---|---|---|"]
    for n, run in result["runs"].items():
        for stage in STAGES:
            if stage not in run:  # left out with --stages
                continue
            r = run[stage]
            if "seconds" not in r:
                note = r.get("error", r.get("skipped", ""))[:90]
                lines.append(f"| {int(n):,} | {stage} | - | - | - | {note} |")
                continue
            note = ""
            if stage == "train":
                note = (f"{r['epochs']} epochs ({r['epoch_seconds']:.2f} s each, {r['spots_per_second']:.0f} spots/s), "
                        f"patch_px {r.get('patch_px')}")
            load = r.get("loadavg_1min", ["", ""])
            lines.append(f"| {int(n):,} | {stage} | {r['seconds']:.2f} | {r['peak_rss_mb'] / 1024:.2f} | "
                         f"{load[0]}, {load[1]} | {note} |")
        done = [st for st in ("extract", "train", "embed", "domains") if "seconds" in run.get(st, {})]
        e2e = sum(run[st]["seconds"] for st in done)
        lines.append(f"| {int(n):,} | **{' + '.join(done)}** | **{e2e:.1f}** | | | calls only |")
    ratio = result.get("time_ratio_100k_over_10k", {})
    out = ["\n".join(lines), ""]
    for pair, row in result.get("scaling", {}).items():
        out.append(f"Time ratio {pair} (size ratio {row['size_ratio']:.1f}): " + ", ".join(
            f"{k.removesuffix('_time_ratio')} {v:.2f}" for k, v in row.items() if k != "size_ratio") + ".")
    if result.get("scaling"):
        out.append("")
    if ratio:
        out.append("Time ratio 100k / 10k per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in ratio.items())
                   + " (linear = 10; training runs 12 epochs at 10k and 1 at 100k by default, so compare "
                   "`train_per_epoch`, and `train_first_epoch` for epochs that both read every patch from the image).")
    out.append(f"Peak RSS over all stages: {result['peak_rss_gib_max']:.2f} GiB. Settings: {result['settings']}. "
               f"Machine: {result['machine']}; {result['threads']} torch/OpenMP threads per stage.")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--threads", type=int, default=1,
                    help="torch/OpenMP threads per stage (1: on a shared, oversubscribed VM 2 threads ran ~5x slower)")
    ap.add_argument("--hd-depth", type=float, default=None, metavar="UMIS",
                    help="thin each spot's counts (binomial, each tile anew) to about UMIS, e.g. 200 for Visium HD "
                         "8 um bins; results go to speed_hd.json/.md/.png")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                    help="stages to run (e.g. leave out predict at 1M)")
    ap.add_argument("--epochs", type=int, default=None,
                    help="fixed training epochs (default: hc.model.default_max_epochs(N)); for time-vs-N scaling")
    ap.add_argument("--name", default=None,
                    help="results file stem (default: speed, or speed_hd with --hd-depth)")
    ap.add_argument("--report-only", action="store_true", help="rewrite speed.md from speed.json")
    ap.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:
        print(json.dumps(run_stage(args.stage, args.work, args.epochs)))
        return
    name = args.name or ("speed_hd" if args.hd_depth else "speed")
    if args.report_only:
        result = json.loads((RESULTS / f"{name}.json").read_text())
        add_ratios(result)
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
        (RESULTS / f"{name}.md").write_text(markdown(result))
        plot(result, RESULTS / f"{name}.png")
        return
    import torch

    import histoclip as hc

    result: dict = {
        "what": "wall time of each histoclip call and peak RSS of its fresh subprocess, per number of spots",
        "data": "DLPFC 151673 (bundled) tiled k x k with its lowres image tiled the same way, coordinates offset per "
                "tile + N(0, 2 px) jitter, then N spots drawn without replacement"
                + (f"; counts binomially thinned to ~{args.hd_depth:g} UMIs per spot (Visium HD depth)"
                   if args.hd_depth else ""),
        "umis_per_spot": args.hd_depth,
        "memory": "peak RSS (VmHWM) of a fresh subprocess per stage; includes imports and "
                  "reading the h5ad (see 'baseline')",
        "settings": "every default (2000 Moran genes with spatial context, small CNN at the automatic patch_px, "
                    "batch 256, epochs = " + (f"{args.epochs} (fixed)" if args.epochs else
                                              "hc.model.default_max_epochs(N)") + "), CPU",
        "epochs": {str(n): args.epochs or hc.model.default_max_epochs(n) for n in args.sizes},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, torch "
                   f"{torch.__version__}; see each stage's loadavg_1min for other load",
        "threads": args.threads,
        "histoclip": hc.__version__,
        "predict_expression": hasattr(hc.tl, "predict_expression"),
        "runs": {},
    }
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix=f"hc-speed-{n}-") as tmp:
            work = Path(tmp)
            t = time.perf_counter()
            info = build_slide(n, work / "slide.h5ad", umis_per_spot=args.hd_depth)
            run: dict = {"slide": {**info, "build_seconds": time.perf_counter() - t}}
            for stage in STAGES:
                if stage not in args.stages:
                    continue
                if stage == "predict" and not result["predict_expression"]:
                    run[stage] = {"skipped": "histoclip.tl.predict_expression does not exist yet"}
                    continue
                run[stage] = _child(stage, work, args.threads, args.epochs)
                print(f"N={n:6d} {stage:8s} {json.dumps(run[stage])}", file=sys.stderr, flush=True)
            run["end_to_end_seconds"] = sum(r.get("process_seconds", 0.0) for r in run.values() if isinstance(r, dict))
            result["runs"][str(n)] = run
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    add_ratios(result)
    result["peak_rss_gib_max"] = max(r.get("peak_rss_mb", 0) for run in result["runs"].values()
                                     for r in run.values() if isinstance(r, dict)) / 1024
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    plot(result, RESULTS / f"{name}.png")
    (RESULTS / f"{name}.md").write_text(markdown(result))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
