"""Data-parallel training on this CPU: two processes, gloo backend, 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch.utils.data import ConcatDataset

import histoclip as hc
from histoclip.data import PatchDataset
from histoclip.module import clip_loss
from histoclip.train._distributed import fit_spawned, fit_with_strategy, free_port

# Run under torchrun: each rank computes the loss on its half of a fixed batch with global negatives (gather_global),
# back-propagates it, then trains a toy model for one epoch through HistoCLIP.train (the torchrun path).
_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np, torch
    import histoclip as hc
    from histoclip.module import clip_loss

    out = sys.argv[1]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.distributed.init_process_group("gloo", init_method="env://")
    g = torch.Generator().manual_seed(0)
    zi = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)
    ze = torch.nn.functional.normalize(zi + 0.5 * torch.randn(8, 16, generator=g), dim=-1)
    half = slice(4 * rank, 4 * rank + 4)
    a = zi[half].clone().requires_grad_(True)
    b = ze[half].clone().requires_grad_(True)
    res = clip_loss(a, b, 0.1)
    res.loss.backward()
    rec = {"loss": res.loss.item(), "grad_img": a.grad.tolist(), "grad_expr": b.grad.tolist()}

    hc.settings.progress = False
    adata = hc.datasets.toy(rng=0)
    hc.pp.extract_patches(adata, size_um=110)
    model = hc.model.HistoCLIP(adata, n_genes=40)
    model.train(1, batch_size=32, accelerator="cpu", rng=0)
    rec["history_loss"] = model.history["loss"].tolist()
    rec["weights"] = float(sum(p.double().sum() for p in model.module.state_dict().values()))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(rec, fh)
    torch.distributed.destroy_process_group()
    """
)


@pytest.fixture(scope="module")
def torchrun_records(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("torchrun")
    script = tmp / "worker.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script), str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]


def test_global_negatives_equal_single_process_loss(torchrun_records):
    g = torch.Generator().manual_seed(0)
    zi = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1).requires_grad_(True)
    ze = torch.nn.functional.normalize(zi.detach() + 0.5 * torch.randn(8, 16, generator=g), dim=-1)
    ze.requires_grad_(True)
    full = clip_loss(zi, ze, 0.1)
    full.loss.backward()
    # each rank's loss is the mean over its rows of the whole-batch loss; the two together give the full loss
    mean_rank_loss = np.mean([r["loss"] for r in torchrun_records])
    assert mean_rank_loss == pytest.approx(full.loss.item(), rel=1e-5)
    assert torchrun_records[0]["loss"] != pytest.approx(torchrun_records[1]["loss"], rel=1e-3)
    # gradients flow through the all-gather: every rank's loss reaches every row, so the sum over ranks (what the
    # gather's backward delivers to each row's owner) is world_size times the gradient of the mean loss
    for r, rec in enumerate(torchrun_records):
        rows = slice(4 * r, 4 * r + 4)
        np.testing.assert_allclose(np.array(rec["grad_img"]) / 2, zi.grad[rows].numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.array(rec["grad_expr"]) / 2, ze.grad[rows].numpy(), rtol=1e-4, atol=1e-6)


def test_torchrun_training_is_finite_and_identical_across_ranks(torchrun_records):
    a, b = torchrun_records
    assert len(a["history_loss"]) == 1 and np.isfinite(a["history_loss"][0])
    assert a["history_loss"] == b["history_loss"]  # all-rank means
    assert a["weights"] == b["weights"]


def _toy_model():
    adata = hc.datasets.toy(rng=0)
    hc.pp.extract_patches(adata, size_um=110)
    return hc.model.HistoCLIP(adata, n_genes=40)


def test_spawned_two_process_training(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    model = _toy_model()
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    dataset = ConcatDataset([PatchDataset(s.reader, x.expression, s.features, context=s.graph)
                             for s, x in zip(model._sections, model._train_inputs, strict=True)])
    result = fit_spawned(model.module, dataset, devices=2, device=torch.device("cpu"), max_epochs=2, batch_size=32,
                         lr=1e-3, weight_decay=1e-4, seed=0, augment=True, precision="32", num_workers=0)
    assert result.epochs_completed == 2
    assert np.isfinite(result.history["loss"]).all()
    s0, s1 = result.extras["rank_states"]
    assert set(s0) == set(s1)
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    assert any(not torch.equal(before[k], s0[k]) for k in s0)  # training moved the weights
    for k, v in model.module.state_dict().items():
        assert torch.equal(v, s0[k])


def test_train_with_ddp_strategy_through_the_model(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    model = _toy_model()
    model.train(1, batch_size=32, accelerator="cpu", devices=2, strategy="ddp", rng=0)
    assert model.is_trained and len(model.history) == 1
    assert np.isfinite(model.history["loss"]).all()
    assert model.train_params["devices"] == 2 and model.train_params["strategy"] == "ddp"
    emb = model.get_latent_representation()
    width = model.init_params["embedding_dim"] + model.init_params["skip_components"]  # [expression skip, fused]
    assert emb.shape == (256, width) and np.isfinite(emb).all()


def test_bad_strategy_and_devices():
    model = _toy_model()
    with pytest.raises(ValueError, match="strategy must be"):
        model.train(1, accelerator="cpu", strategy="fsdp")
    with pytest.raises(ValueError, match="devices must be"):
        fit_with_strategy(model.module, None, device=torch.device("cpu"), devices=0)


def test_patch_cache_is_not_shipped_to_workers():
    import pickle

    model = _toy_model()
    reader = model._sections[0].reader
    first = [reader(i) for i in range(len(reader))]
    assert reader.cache and reader._filled.all()
    clone = pickle.loads(pickle.dumps(reader))  # what spawned DDP workers and DataLoader workers receive
    assert not clone._filled.any()
    assert len(pickle.dumps(reader)) < len(first) * first[0].nbytes  # the cached patches are not in the pickle
    for i in (0, 7, len(reader) - 1):
        np.testing.assert_array_equal(clone(i), first[i])
        np.testing.assert_array_equal(reader(i), first[i])  # served from the cache, identical
