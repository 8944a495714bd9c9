"""Command line: ``histoclip demo`` (also ``python -m histoclip demo``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import histoclip as hc

    hc.settings.verbosity = "warning"
    hc.settings.progress = not args.no_progress
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    adata = hc.datasets.dlpfc()
    print(f"Loaded the bundled DLPFC slide 151673: {adata.n_obs} spots x {adata.n_vars} genes", flush=True)
    hc.pp.extract_patches(adata)
    # the bundled image is Visium's lowres one (the default 130 um patch is 9 px): the default patch_px picks 16
    model = hc.tl.train(adata, max_epochs=args.epochs, rng=args.seed)
    hc.tl.embed(adata, model)
    # the model-free path (no model), for comparison with the default
    hc.tl.domains(adata, n_domains=7, use_rep="expression_pca", rng=args.seed, key_added="histoclip_domain_model_free")
    free = hc.metrics.adjusted_rand(adata.obs["layer"], adata.obs["histoclip_domain_model_free"])
    hc.tl.domains(adata, n_domains=7, rng=args.seed)  # the default after embed: the joint embedding
    weight = float(adata.obs[hc.Key.obs.image_weight].mean())
    scores = hc.metrics.domain_scores(adata.obs["layer"], adata.obs[hc.Key.obs.domain])
    elapsed = time.perf_counter() - t0
    h5ad = out / "dlpfc_151673_histoclip.h5ad"
    png = out / "dlpfc_151673_domains.png"
    adata.write_h5ad(h5ad)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 6))
    hc.pl.domains(adata, color="layer", ax=axes[0], title="manual layers")
    hc.pl.domains(adata, ax=axes[1], reference="layer",  # each domain in the colour of the layer it matches
                  title=f"histoclip domains (ARI {scores['ari']:.3f})")
    fig.tight_layout()
    fig.savefig(png, dpi=130)
    model.save(out / "model", overwrite=True)
    result = {"slide": "DLPFC 151673", "n_domains": 7, "seed": args.seed, "epochs": args.epochs, **scores,
              "ari_model_free": free, "image_weight_mean": round(weight, 4),
              "wall_seconds": round(elapsed, 1), "h5ad": str(h5ad), "figure": str(png)}
    (out / "demo_result.json").write_text(json.dumps(result, indent=2))
    print(f"ARI against the manual layers: {scores['ari']:.3f} (NMI {scores['nmi']:.3f}; the model-free path without "
          f"the model: ARI {free:.3f}; mean weight of the image in the joint embedding {weight:.2f}), {elapsed:.0f} s; "
          "wrote "
          f"{h5ad}, {png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``histoclip`` command."""
    parser = argparse.ArgumentParser(prog="histoclip", description="histoclip command line")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the whole pipeline on the bundled DLPFC slide and score its domains")
    demo.add_argument("--outdir", default="histoclip_results", help="folder for the .h5ad, figure and model")
    demo.add_argument("--epochs", type=int, default=None,
                      help="training epochs (default: the package default, 30 for this slide)")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    return 1


if __name__ == "__main__":
    sys.exit(main())
