"""Time to draw (and save) spots over an image at Visium HD scale: raster image against one circle per spot.

The spots: a square grid of N bins at 8 um pitch (like Visium HD's 8 um bins; 1M bins is a 8 x 8 mm area) with
seven categorical domains in bands plus noise, over a 2000 x 2000 px RGB image. Each row is one call of
histoclip's spot drawing (``histoclip.pl._utils.draw_slide``, the function behind ``hc.pl.domains``,
``hc.pl.image_weight``, ``hc.pl.predicted_expression`` and ``hc.pl.domain_genes``'s spatial panels) followed by
``savefig`` to PNG at 100 dpi (matplotlib draws lazily, so the save is where the time goes); "raster" forces the
image path, "circles" the EllipseCollection path (one circle per spot, what histoclip draws below
``RASTER_ABOVE`` spots). Peak memory is the process's peak RSS after the row (it only grows).

    python benchmarks/plot_speed.py [--sizes 10000 100000 1000000] [--circles-max 100000]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from histoclip.io._image import ImageSource  # noqa: E402
from histoclip.io._slide import Slide  # noqa: E402
from histoclip.pl import _utils  # noqa: E402


def one(n: int, mode: str, out: Path, categorical: bool = True) -> dict:
    side = int(np.ceil(np.sqrt(n)))
    um_per_px = side * 8.0 / 2000  # the grid spans the 2000 px image
    xy = np.column_stack([np.arange(n) % side, np.arange(n) // side]).astype(np.float64) * 8.0 / um_per_px
    xy += 4.0 / um_per_px
    rng = np.random.default_rng(0)
    band = np.minimum((xy[:, 0] / xy[:, 0].max() * 7).astype(int), 6)
    band = np.where(rng.random(n) < 0.1, rng.integers(0, 7, n), band)
    values = band.astype(str) if categorical else rng.random(n)
    img = np.full((2000, 2000, 3), 230, dtype=np.uint8)
    slide = Slide("bench", np.arange(n), xy, um_per_px, "hires", ImageSource(img, layout="yxc", name="bench"))
    colors = _utils.palette([str(i) for i in range(7)])
    saved = _utils.RASTER_ABOVE
    _utils.RASTER_ABOVE = -1 if mode == "raster" else 10**12
    try:
        t0 = time.perf_counter()
        fig, ax = plt.subplots(figsize=(6, 6))
        _utils.draw_slide(ax, slide, values, spot_diameter_um=8.0, categorical=categorical, colors=colors)
        t_draw = time.perf_counter() - t0
        fig.savefig(out, dpi=100)
        t_total = time.perf_counter() - t0
        plt.close(fig)
    finally:
        _utils.RASTER_ABOVE = saved
    return {"n": n, "mode": mode, "values": "categorical" if categorical else "continuous",
            "draw_s": round(t_draw, 3), "draw_and_save_s": round(t_total, 3),
            "png_kb": round(out.stat().st_size / 1024),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--circles-max", type=int, default=100_000, help="largest N drawn as circles too (slow)")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            for mode in ("raster", "circles"):
                if mode == "circles" and n > args.circles_max:
                    continue
                rows.append(one(n, mode, Path(tmp) / f"{mode}_{n}.png"))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            rows.append(one(n, "raster", Path(tmp) / f"cont_{n}.png", categorical=False))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"rows": rows, "raster_above": _utils.RASTER_ABOVE}, indent=1))


if __name__ == "__main__":
    main()
