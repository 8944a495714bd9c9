"""Contrastive loss implementations on CPU: histoclip.module.clip_loss against pml_clip_loss.

pml_clip_loss is pytorch-metric-learning's NTXentLoss in its cross-modal ``ref_emb`` form (same values, tested in
tests/test_module.py). Each (implementation, batch size) runs in a fresh subprocess: wall time of forward +
backward (median of repeats, after one warm-up) and the subprocess's peak RSS (``resource.getrusage``, including
the ~0.3-0.4 GB of importing torch). Prints JSON and writes benchmarks/results/loss.json.

    python benchmarks/loss.py [--batches 64 256 512] [--dim 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

_CHILD = """
import json, resource, statistics, sys, time
import torch
from histoclip.module import clip_loss, pml_clip_loss
torch.set_num_threads({threads})
fn = {{"clip": clip_loss, "pml": pml_clip_loss}}["{impl}"]
g = torch.Generator().manual_seed(0)
zi = torch.nn.functional.normalize(torch.randn({batch}, {dim}, generator=g), dim=-1)
ze = torch.nn.functional.normalize(zi + 0.5 * torch.randn({batch}, {dim}, generator=g), dim=-1)
times, value = [], None
for rep in range({reps} + 1):
    a, b = zi.clone().requires_grad_(True), ze.clone().requires_grad_(True)
    t = time.perf_counter()
    out = fn(a, b, 0.1)
    out.loss.backward()
    if rep:
        times.append(time.perf_counter() - t)
    value = out.loss.item()
print(json.dumps({{"seconds": statistics.median(times), "loss": value,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256, 512])
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    rows = []
    for batch in args.batches:
        for impl in ("clip", "pml"):
            reps = 20 if impl == "clip" else (5 if batch <= 256 else 3)
            code = _CHILD.format(impl=impl, batch=batch, dim=args.dim, reps=reps, threads=args.threads)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            rec = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({"impl": impl, "batch": batch, "dim": args.dim, "repeats": reps, **rec})
            print(f"{impl:5s} batch {batch:4d}: {rec['seconds'] * 1e3:9.2f} ms  loss {rec['loss']:.5f}  "
                  f"peak RSS {rec['peak_rss_mb']:.0f} MB", file=sys.stderr)
    speedup = {}
    for batch in args.batches:
        c = next(r for r in rows if r["impl"] == "clip" and r["batch"] == batch)
        p = next(r for r in rows if r["impl"] == "pml" and r["batch"] == batch)
        speedup[str(batch)] = round(p["seconds"] / c["seconds"], 1)
        if abs(c["loss"] - p["loss"]) > 1e-4 * abs(c["loss"]):
            raise SystemExit(f"The implementations disagree at batch {batch}: {c['loss']} vs {p['loss']}")
    result = {
        "what": "forward+backward of the symmetric InfoNCE loss on L2-normalised (batch, dim) float32 embeddings, CPU",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load average before the run "
                   f"{os.getloadavg()[0]:.2f}",
        "threads": args.threads,
        "memory": "peak RSS of a fresh subprocess per row (resource.getrusage), torch import included",
        "rows": rows,
        "pml_over_clip_time": speedup,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "loss.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
