"""Training speed against the number of torch threads, on an idle machine and beside other multi-threaded work.

Question: does ``hc.settings.n_jobs``'s default (no setting) train within 20% of the best thread count, both when
the machine is idle and when another multi-threaded process shares its cores?

Data: the bundled DLPFC 151673 slide (hc.datasets.dlpfc(), 3639 spots), hc.pp.extract_patches with its defaults,
hc.tl.train's defaults (2000 Moran's I genes, small CNN, patch_px 16, batch 256) on the CPU, ``--epochs`` epochs.
Each measurement runs in a fresh Python process (so thread pools and OpenMP's environment start clean); its number
is the median of the per-epoch wall times in ``model.history["seconds"]`` after the first epoch (the first one
warms up allocators and oneDNN's kernels). Setup (imports, reading, gene selection) is not timed.

Settings, each in a process that imports histoclip before torch (so OpenMP's waiting threads sleep:
``import histoclip`` sets ``OMP_WAIT_POLICY=PASSIVE`` when torch is not loaded yet): ``default`` (nothing set: what a
user gets), ``k`` (``hc.settings.n_jobs = k``) for k = 1 .. usable CPUs; and ``spin``: torch imported before histoclip,
so OpenMP keeps its default policy (waiting threads spin), with a thread per CPU: what torch did before histoclip set
threads (torch's own default).

Conditions: ``idle`` (nothing else started by this script; the 1-minute load average before and after each run is
recorded, since the machine may be shared) and ``load``: a background process doing float64 numpy matmuls
(1000 x 1000) with ``--load-threads`` BLAS threads (default 2) for the length of the run, killed after it (and in any
case after ``--load-seconds``). Settings and conditions are interleaved in ``--repeats`` rounds; the table reports the
median over rounds.

    python benchmarks/threads.py [--epochs 3] [--repeats 2] [--load-threads 2]

Prints JSON and writes benchmarks/results/threads.json and threads.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
GOAL = 1.2  # default within 20% of the best setting


def _loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


def worker(setting: str, epochs: int) -> dict:
    """One timed training run (called in a fresh process); prints one JSON line."""
    if setting == "spin":
        import torch  # noqa: F401  (before histoclip: OpenMP keeps its default wait policy)
    import histoclip as hc

    hc.settings.progress = False
    if setting == "spin":
        hc.settings.n_jobs = -1
    elif setting != "default":
        hc.settings.n_jobs = int(setting)
    import torch
    adata = hc.datasets.dlpfc()
    hc.pp.extract_patches(adata)
    model = hc.HistoCLIP(adata)
    t0 = time.perf_counter()
    model.train(max_epochs=epochs, accelerator="cpu", rng=0)
    wall = time.perf_counter() - t0
    secs = [float(s) for s in model.history["seconds"]]
    return {"n_threads": hc.settings.n_jobs, "torch_threads_after": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default (spin)"),
            "epoch_seconds": secs, "sec_per_epoch": statistics.median(secs[1:] if len(secs) > 1 else secs),
            "train_wall": wall}


def load(threads: int, seconds: float) -> None:
    """Busy multi-threaded BLAS work for at most ``seconds`` (run in a background process)."""
    import numpy as np

    a = np.random.default_rng(0).standard_normal((1000, 1000))
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        a = a @ a
        a /= np.abs(a).max()


def run_one(setting: str, condition: str, args) -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_WAIT_POLICY"):
        env.pop(var, None)  # the settings under test decide
    bg = None
    if condition == "load":
        benv = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}  # the load keeps its own defaults
        benv.update(OMP_NUM_THREADS=str(args.load_threads), OPENBLAS_NUM_THREADS=str(args.load_threads),
                    MKL_NUM_THREADS=str(args.load_threads))
        bg = subprocess.Popen([sys.executable, __file__, "--load-worker", "--load-seconds", str(args.load_seconds)],
                              env=benv)
        time.sleep(2.0)  # let it reach full speed
    before = _loadavg()
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", setting, "--epochs", str(args.epochs)],
                              env=env, capture_output=True, text=True, timeout=args.load_seconds)
    finally:
        if bg is not None:
            bg.kill()
            bg.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"worker {setting} under {condition} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out.update({"setting": setting, "condition": condition, "load_before": before, "load_after": _loadavg()})
    print(json.dumps(out), file=sys.stderr, flush=True)
    return out


def write_md(result: dict, path: Path) -> None:
    """The table of ``result`` as markdown."""
    runs, table = result["runs"], result["results"]
    m = result["machine"]
    lines = [f"# Training speed against torch threads ({m['cpus_usable']} usable CPUs, default n_jobs = "
             f"{m['default_n_jobs']})",
             "",
             f"DLPFC 151673, hc.tl.train defaults on the CPU, median s/epoch after the first of {result['epochs']} "
             f"epochs, {result['repeats']} round(s). idle: nothing started by this script (the load average shows "
             f"what else ran on the machine); load: a background numpy matmul process with {result['load_threads']} "
             "BLAS threads. `default` and `k` = all CPUs are the same configuration when the default is all CPUs: "
             "their difference is run-to-run noise.",
             "", "| condition | setting | threads | OpenMP waiting threads | s/epoch | / best | runs (s/epoch) | "
             "load avg before, after |", "|---|---|---|---|---|---|---|---|"]
    for condition, t in table.items():
        best = t["settings"][t["best"]]["sec_per_epoch"]
        for s, row in t["settings"].items():
            la = [f"{r['load_before']:.2f}, {r['load_after']:.2f}" for r in runs
                  if r["setting"] == s and r["condition"] == condition]
            lines.append(f"| {condition} | {s} | {row['n_threads']} | {'spin' if s == 'spin' else 'sleep'} | "
                         f"{row['sec_per_epoch']:.2f} | {row['sec_per_epoch'] / best:.2f} | {row['runs']} | "
                         f"{'; '.join(la)} |")
    lines += ["", *[f"- {c}: default / best = {t['default_over_best']:.2f} (best: {t['best']}); goal (<= {GOAL}) "
                    f"{'met' if t['goal_met'] else 'NOT met'}" for c, t in table.items()]]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--load-threads", type=int, default=2)
    p.add_argument("--load-seconds", type=float, default=900.0)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--load-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(RESULTS / "threads"))
    p.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the existing .json")
    args = p.parse_args()
    if args.markdown_only:
        out = Path(args.out)
        write_md(json.loads(out.with_suffix(".json").read_text()), out.with_suffix(".md"))
        return
    if args.load_worker:
        load(args.load_threads, args.load_seconds)
        return
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.epochs)))
        return
    from histoclip._settings import available_cpus, default_n_jobs

    args.cpus = available_cpus()
    settings = ["default", *[str(k) for k in range(1, args.cpus + 1)], "spin"]
    runs = []
    for _ in range(args.repeats):
        for condition in ("idle", "load"):
            for s in settings:
                runs.append(run_one(s, condition, args))
    table = {}
    for condition in ("idle", "load"):
        rows = {}
        for s in settings:
            vals = [r["sec_per_epoch"] for r in runs if r["setting"] == s and r["condition"] == condition]
            rows[s] = {"sec_per_epoch": round(statistics.median(vals), 3), "runs": [round(v, 3) for v in vals],
                       "n_threads": next(r["n_threads"] for r in runs if r["setting"] == s)}
        best = min(rows, key=lambda k: rows[k]["sec_per_epoch"])
        ratio = rows["default"]["sec_per_epoch"] / rows[best]["sec_per_epoch"]
        table[condition] = {"settings": rows, "best": best, "default_over_best": round(ratio, 3),
                            "goal_met": ratio <= GOAL}
    result = {
        "question": "default n_jobs within 20% of the best thread count, idle and under a concurrent CPU load",
        "machine": {"cpus_usable": args.cpus, "default_n_jobs": default_n_jobs(), "python": platform.python_version(),
                    "processor": platform.processor() or platform.machine()},
        "epochs": args.epochs, "repeats": args.repeats, "load_threads": args.load_threads,
        "results": table, "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    write_md(result, out.with_suffix(".md"))
    print(json.dumps(result["results"], indent=2))


if __name__ == "__main__":
    main()
