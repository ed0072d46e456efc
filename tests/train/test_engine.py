"""The engine: recipe schedule, per-worker BN, simulated == torchrun, exact resume, checkpoints, probe."""
import importlib.util
import json
import os
import random

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import groupnorm.train.engine as engine
from groupnorm.train import CheckpointError, Config, ConfigError, RunDirError, TrainingError, evaluate, run
from groupnorm.train.checkpoint import (atomic_write, load_checkpoint, rng_state, save_checkpoint,
                                        set_rng_state)
from groupnorm.train.data import FASHION_DIR
from groupnorm.train.distributed import Context
from groupnorm.train.launch import spawn
from groupnorm.train.rundir import RunLock
from groupnorm.train.probe import percentiles
from helpers import fake_fashion, tiny_config

TIMING = ("seconds", "images_per_s")


@pytest.fixture(scope="module")
def fake_dir(tmp_path_factory):
    return fake_fashion(tmp_path_factory.mktemp("fashion"), 96, 40)


def tiny(out, data_dir, **kw):
    """A run of a few steps of a 4-channel ResNet-8 (32 fake images an epoch, 2 workers x 8), BN."""
    return tiny_config(out, data_dir, **kw)


def strip(history):
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


# ---- recipe -----------------------------------------------------------------------------------------
def test_step_schedule_at_30_60_90_percent():
    cfg = Config(epochs=100, images_per_worker=32)
    assert engine.milestones(cfg) == [30, 60, 90]
    expect = {0: 0.1, 29: 0.1, 30: 0.01, 59: 0.01, 60: 0.001, 89: 0.001, 90: 1e-4, 99: 1e-4}
    for epoch, lr in expect.items():
        assert engine.lr_at(cfg, epoch) == pytest.approx(lr)
    assert engine.milestones(Config(epochs=10)) == [3, 6, 9]


@pytest.mark.parametrize("n", [32, 16, 8, 4, 2])
def test_lr_scales_with_images_per_worker(n):
    cfg = Config(epochs=10, images_per_worker=n)
    assert engine.lr_at(cfg, 0) == pytest.approx(0.1 * n / 32)
    assert engine.lr_at(cfg, 9) == pytest.approx(0.1 * n / 32 * 1e-3)


def test_linear_warmup_per_iteration():
    cfg = Config(epochs=10, images_per_worker=32, warmup_epochs=2)
    lrs = [engine.lr_at(cfg, e, s, 5) for e in range(3) for s in range(5)]
    assert lrs[:10] == pytest.approx([0.1 * (i + 1) / 10 for i in range(10)])
    assert lrs[10:] == pytest.approx([0.1] * 5)


def test_reported_error_is_the_median_of_the_last_five_epochs():
    history = [{"val_error": v} for v in (90, 50, 30, 31, 29, 35, 28)]
    assert engine.reported_error(history) == 30
    assert engine.reported_error(history[:2]) == 70


def test_bn_statistics_per_worker():
    sim, ddp = Context(0, 1, 0, 1, torch.device("cpu"), False), Context(0, 2, 0, 2, torch.device("cpu"), True)
    cfg = Config(norm="bn", images_per_worker=4, workers=2)
    assert engine.norm_spec(cfg, sim) == "bn@4" and engine.norm_spec(cfg, ddp) == "bn"
    assert engine.norm_spec(Config(norm="brn", images_per_worker=2), sim) == "brn@2"
    assert engine.norm_spec(Config(norm="bn", sync_bn=True), sim) == "bn"
    assert engine.norm_spec(Config(norm="bn", sync_bn=True), ddp) == "syncbn"
    assert engine.norm_spec(Config(norm="gn:8"), sim) == "gn:8"
    with pytest.raises(ConfigError, match="over 4 images but images_per_worker=8"):
        engine.norm_spec(Config(norm="bn@4", images_per_worker=8), sim)
    model = engine.build(Config(norm="bn", images_per_worker=4, model="small_resnet",
                                model_args={"width": 4, "depth": 8}), 10, 1, sim)
    bns = [m for m in model.modules() if hasattr(m, "images_per_worker")]
    assert bns and all(m.images_per_worker == 4 for m in bns)


def test_norm_specs_are_read_by_the_factory_parser_only():
    """"bn @ 32" is bn@32 for the factory; the engine's per-worker check must read it the same way
    (it once let "bn @ 32" through with images_per_worker=2 and trained BN over 32 images)."""
    sim, ddp = Context(0, 1, 0, 1, torch.device("cpu"), False), Context(0, 2, 0, 2, torch.device("cpu"), True)
    with pytest.raises(ConfigError, match="over 32 images but images_per_worker=2"):
        engine.norm_spec(Config(norm="bn @ 32", images_per_worker=2), sim)
    with pytest.raises(ConfigError, match="over 32 images but images_per_worker=2"):
        engine.norm_spec(Config(norm=" BRN@ 32", images_per_worker=2), ddp)
    assert engine.norm_spec(Config(norm="BN @ 4", images_per_worker=4), sim) == "bn@4"
    assert engine.norm_spec(Config(norm=" bn ", images_per_worker=4), ddp) == "bn"
    assert engine.norm_spec(Config(norm="gn : 8"), sim) == "gn:8"
    assert engine.norm_spec(Config(norm="gn / 4"), sim) == "gn/4"
    model = engine.build(Config(norm="bn @ 2", images_per_worker=2, model="small_resnet",
                                model_args={"width": 4, "depth": 8}), 10, 1, sim)
    bns = [m for m in model.modules() if hasattr(m, "images_per_worker")]
    assert bns and all(m.images_per_worker == 2 for m in bns)


def test_weight_decay_includes_gamma_and_beta():
    model = engine.build(Config(model="small_resnet", model_args={"width": 4, "depth": 8}, norm="gn:2"), 10, 1,
                         Context(0, 1, 0, 1, torch.device("cpu"), False))
    groups = engine.make_optimizer(Config(), model).param_groups
    assert {g["name"]: g["weight_decay"] for g in groups} == {"weights": 1e-4, "norm": 1e-4}
    groups = engine.make_optimizer(Config(norm_weight_decay=0.0), model).param_groups
    assert {g["name"]: g["weight_decay"] for g in groups} == {"weights": 1e-4, "norm": 0.0}
    assert all(g["momentum"] == 0.9 for g in groups)


# ---- runs ---------------------------------------------------------------------------------------------
def test_run_directory_and_metrics(tmp_path, fake_dir):
    cfg = tiny(tmp_path / "run", fake_dir, epochs=3, lr_steps=[0.5], warmup_epochs=0)
    result = run(cfg)
    out = tmp_path / "run"
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "metrics.jsonl", "checkpoint.pt", "result.json"}
    assert Config.load(out / "config.yaml") == cfg
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    for m in lines:
        assert set(m) >= {"epoch", "train_loss", "train_error", "val_error", "lr", "seconds", "images_per_s"}
    # lr = 0.1 * 8 / 32, decayed x0.1 from 0-based epoch round(0.5 * 3) = 2 on
    assert [m["lr"] for m in lines] == pytest.approx([0.025, 0.025, 0.0025])
    saved = json.loads((out / "result.json").read_text())
    assert saved["val_error"] == pytest.approx(float(np.median([m["val_error"] for m in lines])))
    assert saved["epochs"] == 3 and result["val_error"] == saved["val_error"]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    again = evaluate(out)
    assert again["error"] == pytest.approx(lines[-1]["val_error"]) and again["images"] == 40


@pytest.mark.dist
@pytest.mark.timeout(240)
@pytest.mark.parametrize("norm, sync_bn", [("bn", False), ("bn", True), ("brn", False), ("gn:2", False)])
def test_simulated_and_torchrun_give_the_same_steps(tmp_path, fake_dir, norm, sync_bn):
    """W=2 on CPU: the simulated workers (one process, BN per chunk of 8) and two gloo processes running
    the engine's per-rank code (DDP, BN per rank or synchronized) give the same losses, parameters and
    running statistics (both average the workers')."""
    results, states = {}, {}
    for launcher in ("simulated", "torchrun"):
        # One thread and torch's own GN: nothing in the forked ranks depends on thread pools of the parent.
        cfg = tiny(tmp_path / launcher, fake_dir, launcher=launcher, train_subset=16, epochs=2, norm=norm,
                   sync_bn=sync_bn, backend="native")
        if launcher == "simulated":
            results[launcher] = run(cfg)
        else:  # what run(cfg) does outside torchrun, but forked: no torch re-import in each rank
            spawn(cfg, start_method="fork" if "fork" in mp.get_all_start_methods() else "spawn")
            results[launcher] = json.loads((tmp_path / launcher / "result.json").read_text())
        states[launcher] = load_checkpoint(tmp_path / launcher / "checkpoint.pt")["model"]
    sim, ddp = results["simulated"]["history"], results["torchrun"]["history"]
    assert len(sim) == len(ddp) == 2  # one step per epoch
    for a, b in zip(sim, ddp):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["val_error"] == b["val_error"] and a["lr"] == b["lr"]
    for key, value in states["simulated"].items():
        torch.testing.assert_close(states["torchrun"][key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_a_spawned_rank_stopping_on_a_user_error_is_a_clear_error(tmp_path, fake_dir, capfd):
    """A busy run directory under launcher=torchrun: every rank stops (none waits for rank 0 forever)
    and the caller gets a GroupnormError, not a child's traceback."""
    out = tmp_path / "busy"
    out.mkdir()
    cfg = tiny(out, fake_dir, launcher="torchrun", train_subset=16, epochs=1, backend="native")
    with RunLock(out):
        with pytest.raises(TrainingError, match=rf"training in {out} stopped on rank"):
            spawn(cfg, start_method="fork" if "fork" in mp.get_all_start_methods() else "spawn")
    err = capfd.readouterr().err
    assert "another training" in err and "Traceback" not in err


def test_resume_continues_exactly(tmp_path, fake_dir, monkeypatch):
    whole = run(tiny(tmp_path / "whole", fake_dir, epochs=3))

    real_epoch = engine.train_epoch

    def crash_in_second_epoch(cfg, ctx, model, optimizer, data, epoch, *args):
        if epoch == 1:
            raise KeyboardInterrupt("killed")
        return real_epoch(cfg, ctx, model, optimizer, data, epoch, *args)

    cut = tiny(tmp_path / "cut", fake_dir, epochs=3)
    monkeypatch.setattr(engine, "train_epoch", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        run(cut)
    # The crash lost only the epoch it was in.
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["epoch"] == 1
    assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == 1
    monkeypatch.setattr(engine, "train_epoch", real_epoch)
    random.seed(123), np.random.seed(123), torch.manual_seed(123)  # a new process: other RNG states
    resumed = run(tiny(tmp_path / "cut", fake_dir, epochs=3, resume=True))
    assert strip(resumed["history"]) == strip(whole["history"])
    a = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    lines = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert strip(lines) == strip(whole["history"])
    # Resuming a finished run trains nothing more and gives the same result.
    assert run(tiny(tmp_path / "cut", fake_dir, epochs=3, resume=True))["val_error"] == whole["val_error"]


def test_existing_run_is_never_overwritten_or_mixed(tmp_path, fake_dir):
    run(tiny(tmp_path / "r", fake_dir, epochs=1))
    with pytest.raises(RunDirError, match="resume=True"):
        run(tiny(tmp_path / "r", fake_dir, epochs=1))
    with pytest.raises(ConfigError, match=r"differs in.*norm \('bn' -> 'gn:2'\)"):
        run(tiny(tmp_path / "r", fake_dir, epochs=1, norm="gn:2", resume=True))


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, fake_dir):
    cfg = tiny(tmp_path / "r", fake_dir, epochs=1)
    run(cfg)
    path = tmp_path / "r" / "checkpoint.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"checkpoint {path} is truncated or corrupt"):
        run(tiny(tmp_path / "r", fake_dir, epochs=2, resume=True))
    path.write_bytes(b"\0" * 100)
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a groupnorm training checkpoint"):
        load_checkpoint(path)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 1, "model": {}, "optimizer": {}, "config": {}, "history": []})

    def fail(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_rng_states_survive_a_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"epoch": 0, "model": {}, "optimizer": {}, "config": {}, "history": [],
                           "rng": rng_state()})
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(load_checkpoint(path)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


def test_probe_records_percentiles(tmp_path, fake_dir, capsys):
    x = torch.randn(3, 4, 5, 5) * 3 + 1
    assert percentiles(x) == pytest.approx(np.percentile(x.numpy(), [1, 20, 80, 99]), rel=1e-5)
    run(tiny(tmp_path / "p", fake_dir, epochs=2, probe="layer3.0.conv2", probe_every=1, tensorboard=True))
    records = [json.loads(x) for x in (tmp_path / "p" / "probe.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1, 2, 3]  # 2 steps per epoch
    assert all(r["p1"] <= r["p20"] <= r["p80"] <= r["p99"] for r in records)
    with pytest.raises(ConfigError, match="not a module of the model.*layer3.0.conv2"):
        run(tiny(tmp_path / "q", fake_dir, probe="layer3.0.conv9"))
    if importlib.util.find_spec("tensorboard") is None:
        assert "TensorBoard is not installed" in capsys.readouterr().err
    else:
        assert (tmp_path / "p" / "tensorboard").is_dir()


@pytest.mark.skipif(not os.path.isfile(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz")),
                    reason="apt-get install dataset-fashion-mnist")
def test_short_run_learns_fashion_mnist(tmp_path):
    cfg = Config(model="small_resnet", model_args={"width": 8, "depth": 8}, norm="gn:4", workers=2,
                 images_per_worker=8, base_lr=0.4, epochs=3, lr_steps=[1.0], train_subset=1500, val_subset=500,
                 augment=False, threads=1, progress=False, out=str(tmp_path / "f"))
    result = run(cfg)
    assert result["history"][-1]["val_error"] < 65, result["history"]  # chance: 90%; about 49% here
