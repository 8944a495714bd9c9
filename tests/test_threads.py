"""hc.settings.n_jobs: a default that does not oversubscribe, scoped to each call, shown in the progress bar."""

from __future__ import annotations

import pytest
import torch

import histoclip as hc
from histoclip import _settings


@pytest.fixture
def restore_n_jobs():
    before = hc.settings._n_jobs
    yield
    hc.settings._n_jobs = before


def test_available_cpus_follows_affinity_and_cgroup_quota(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(_settings, "OMP_PASSIVE", False)  # waiting OpenMP threads spin: half the CPUs
    monkeypatch.setattr(_settings.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7}, raising=False)
    monkeypatch.setattr(_settings, "_cgroup_cpu_limit", lambda: None)
    assert _settings.available_cpus() == 8
    assert _settings.default_n_jobs() == 4
    monkeypatch.setattr(_settings, "_cgroup_cpu_limit", lambda: 2.5)  # e.g. docker --cpus 2.5
    assert _settings.available_cpus() == 3
    assert _settings.default_n_jobs() == 1
    monkeypatch.setattr(_settings, "OMP_PASSIVE", True)  # they sleep: every usable CPU
    assert _settings.default_n_jobs() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's own cap wins
    assert _settings.default_n_jobs() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "64")
    assert _settings.default_n_jobs() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(_settings.os, "sched_getaffinity", lambda pid: {3}, raising=False)  # taskset -c 3
    assert _settings.available_cpus() == 1
    assert _settings.default_n_jobs() == 1


@pytest.mark.parametrize(("first", "env", "policy", "passive"), [
    ("import histoclip", None, "PASSIVE", True),  # histoclip first: waiting threads sleep
    ("import torch; import histoclip", None, None, False),  # too late to change OpenMP: left alone
    ("import histoclip", "ACTIVE", "ACTIVE", False),  # the user's choice is kept
])
def test_openmp_wait_policy_is_set_only_before_torch(first, env, policy, passive):
    import json
    import os
    import subprocess
    import sys

    environ = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if env is not None:
        environ["OMP_WAIT_POLICY"] = env
    code = (f"{first}\nimport os, json\nfrom histoclip import _settings\n"
            "print(json.dumps([os.environ.get('OMP_WAIT_POLICY'), _settings.OMP_PASSIVE, _settings.default_n_jobs(),"
            " _settings.available_cpus()]))")
    proc = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got_policy, got_passive, n_jobs, cpus = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (got_policy, got_passive) == (policy, passive)
    assert n_jobs == (cpus if passive else max(1, cpus // 2))


def test_cgroup_quota_files_are_read(monkeypatch, tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    real_path = _settings.Path

    def fake(p, *a):
        p = str(p)
        if p == "/proc/self/cgroup":
            return real_path(tmp_path / "cgroup")
        if p.startswith("/sys/fs/cgroup"):
            return real_path(str(v2) + p[len("/sys/fs/cgroup"):])
        return real_path(p, *a)

    (tmp_path / "cgroup").write_text("0::/\n")
    monkeypatch.setattr(_settings, "Path", fake)
    assert _settings._cgroup_cpu_limit() == pytest.approx(1.5)
    (v2 / "cpu.max").write_text("max 100000\n")
    assert _settings._cgroup_cpu_limit() is None


def test_n_jobs_setting_validates(restore_n_jobs):
    hc.settings.n_jobs = 3
    assert hc.settings.n_jobs == 3
    hc.settings.n_jobs = -1
    assert hc.settings.n_jobs == _settings.available_cpus()
    hc.settings.n_jobs = None
    assert hc.settings.n_jobs == _settings.default_n_jobs()
    with pytest.raises(ValueError, match="positive int, -1 .* or None"):
        hc.settings.n_jobs = 0
    with pytest.raises(TypeError, match="positive int"):
        hc.settings.n_jobs = 2.5
    with pytest.raises(TypeError, match="positive int"):
        hc.settings.n_jobs = True
    assert "n_jobs=" in repr(hc.settings)


def test_default_never_oversubscribes():
    assert 1 <= _settings.default_n_jobs() <= _settings.available_cpus()


def test_training_runs_on_n_jobs_threads_and_restores_torch(toy_patched, restore_n_jobs, monkeypatch, capsys):
    seen = []
    from histoclip.train import _loop

    real = _loop._fit

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(_loop, "_fit", spy)
    before = torch.get_num_threads()
    target = 3 if before != 3 else 2
    hc.settings.n_jobs = target
    monkeypatch.setattr(hc.settings, "progress", True)
    model = hc.tl.train(toy_patched, max_epochs=1, n_genes=20, batch_size=128, rng=0, accelerator="cpu")
    assert seen == [target]
    assert torch.get_num_threads() == before  # restored
    err = capsys.readouterr().err
    assert f"histoclip training ({target} CPU threads)" in err
    # DataLoader workers count against n_jobs
    assert _loop.cpu_threads(num_workers=1) == target - 1
    assert _loop.cpu_threads(num_workers=10) == 1
    # embedding runs on n_jobs threads too, and restores
    calls = []
    real_embed = type(model)._embeddings

    def embed_spy(self, *a, **k):
        calls.append(torch.get_num_threads())
        return real_embed(self, *a, **k)

    monkeypatch.setattr(type(model), "_embeddings", embed_spy)
    hc.tl.embed(toy_patched, model)
    assert calls and set(calls) == {target}
    assert torch.get_num_threads() == before


def test_threads_restored_when_training_fails(toy_patched, restore_n_jobs, monkeypatch):
    from histoclip.train import _loop

    before = torch.get_num_threads()
    target = 2 if before != 2 else 1

    def boom(*args, **kwargs):
        assert torch.get_num_threads() == target
        raise RuntimeError("boom")

    monkeypatch.setattr(_loop, "_fit", boom)
    hc.settings.n_jobs = target
    with pytest.raises(RuntimeError, match="boom"):
        hc.tl.train(toy_patched, max_epochs=1, n_genes=20, rng=0, accelerator="cpu")
    assert torch.get_num_threads() == before


def test_image_features_run_on_n_jobs_threads(toy_patched, restore_n_jobs, monkeypatch):
    pytest.importorskip("efficientnet_lite_pytorch")
    from histoclip.module import _pretrained

    seen = []
    real = _pretrained.FrozenBackbone.forward

    def spy(self, x):
        seen.append(torch.get_num_threads())
        return real(self, x)

    monkeypatch.setattr(_pretrained.FrozenBackbone, "forward", spy)
    before = torch.get_num_threads()
    target = 2 if before != 2 else 1
    hc.settings.n_jobs = target
    hc.tl.image_features(toy_patched, patch_px=32, tta=False, batch_size=256, accelerator="cpu")
    assert seen and set(seen) == {target}
    assert torch.get_num_threads() == before


def test_distributed_processes_share_the_default(restore_n_jobs, monkeypatch):
    from histoclip.train import _loop

    monkeypatch.setattr(_loop, "rank_and_world", lambda: (0, 2))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    hc.settings.n_jobs = None
    assert _loop.cpu_threads() == max(1, hc.settings.n_jobs // 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one process per node: all of the node's threads
    assert _loop.cpu_threads() == hc.settings.n_jobs
    hc.settings.n_jobs = 4  # an explicit choice is per process
    assert _loop.cpu_threads() == 4
