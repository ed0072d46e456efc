"""No run lost or mixed (issue 15): one training per run directory (a lock), no silent overwrite of a
finished run, leftovers of a killed checkpoint write cleaned up, checkpoints verified by checksum,
a diverging run stopped with a clear message, and result.json always standard JSON."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import groupnorm.train.engine as engine
from groupnorm.errors import CheckpointError, ConfigError, RunDirError, TrainingError
from groupnorm.train import Config, evaluate, run
from groupnorm.train.checkpoint import load_checkpoint, save_checkpoint
from groupnorm.train.rundir import LOCK_NAME, RunLock
from helpers import fake_fashion, tiny_config


@pytest.fixture(scope="module")
def fake_dir(tmp_path_factory):
    return fake_fashion(tmp_path_factory.mktemp("fashion"), 48, 20)


def tiny(out, data_dir, **kw):
    """One step per epoch of a 4-channel ResNet-8: 2 workers x 8 images of 16."""
    return tiny_config(out, data_dir, **{"train_subset": 16, "epochs": 1, "norm": "gn:2",
                                         "eval_batch_size": 20, **kw})


def strict_json(text):
    """json.loads that refuses NaN / Infinity (not JSON)."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


# ---- item 8: one training per run directory ---------------------------------------------------------
def test_a_second_training_into_a_busy_directory_is_refused(tmp_path, fake_dir):
    out = tmp_path / "r"
    out.mkdir()
    with RunLock(out):  # another training holds the directory
        with pytest.raises(RunDirError, match=rf"another training \(pid {os.getpid()}\) is using {out}"):
            run(tiny(out, fake_dir))
    assert not (out / "metrics.jsonl").exists() and not (out / "result.json").exists()
    run(tiny(out, fake_dir))  # released: now it trains
    assert (out / "result.json").exists()


def test_a_lock_dies_with_its_process(tmp_path, fake_dir):
    """flock is released by the OS when the holder dies: a killed training never blocks the directory,
    and the lock file it leaves behind is no obstacle."""
    out = tmp_path / "r"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"f = open({str(out / LOCK_NAME)!r}, 'a+')\n"
        "fcntl.flock(f, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match="another training"):
            run(tiny(out, fake_dir))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / LOCK_NAME).exists()
    run(tiny(out, fake_dir))


# ---- item 9: a finished run is not overwritten without asking -----------------------------------------
def test_a_finished_run_without_its_checkpoint_is_not_overwritten(tmp_path, fake_dir):
    out = tmp_path / "r"
    first = run(tiny(out, fake_dir))
    (out / "checkpoint.pt").unlink()
    before = {name: (out / name).read_text() for name in ("result.json", "metrics.jsonl")}
    for kw in ({}, {"resume": True}, {"norm": "gn:4"}):
        with pytest.raises(RunDirError, match=r"holds a finished run \(result.json\).*overwrite"):
            run(tiny(out, fake_dir, **kw))
        assert {name: (out / name).read_text() for name in before} == before
    second = run(tiny(out, fake_dir, overwrite=True, norm="gn:4"))
    assert second["config"]["norm"] == "gn:4" and json.loads((out / "result.json").read_text())["config"]["norm"] == "gn:4"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1 and first["epochs"] == 1


def test_overwrite_deletes_the_old_checkpoint_first(tmp_path, fake_dir, monkeypatch):
    """A fresh run that dies in its first epoch must not leave the old run's checkpoint to be resumed."""
    out = tmp_path / "r"
    run(tiny(out, fake_dir, epochs=2))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(engine, "train_epoch", killed)
    with pytest.raises(KeyboardInterrupt):
        run(tiny(out, fake_dir, epochs=2, overwrite=True, norm="gn:4"))
    assert not (out / "checkpoint.pt").exists() and not (out / "result.json").exists()


def test_a_run_that_died_before_its_first_epoch_restarts_without_asking(tmp_path, fake_dir):
    out = tmp_path / "r"
    out.mkdir()
    (out / "config.yaml").write_text("epochs: 1\n")
    (out / "metrics.jsonl").write_text("")
    (out / "log.txt").write_text("started\n")  # the study runner's log
    assert run(tiny(out, fake_dir, resume=True))["epochs"] == 1


def test_resume_and_overwrite_together_are_refused():
    with pytest.raises(ConfigError, match="set one of them"):
        Config(resume=True, overwrite=True)


# ---- item 10: leftovers of a killed checkpoint write ------------------------------------------------
def test_leftover_temporary_files_are_removed_at_the_next_start(tmp_path, fake_dir):
    out = tmp_path / "r"
    run(tiny(out, fake_dir, epochs=1))
    leftovers = [out / ".checkpoint.pt.k2j4h1x9.tmp", out / ".result.json.abc.tmp", out / ".metrics.jsonl.q.tmp"]
    for path in leftovers:
        path.write_bytes(b"\0" * 4096)  # what SIGKILL during atomic_write leaves behind
    mine = [out / "notes.tmp", out / ".other.file.tmp"]  # not ours: kept
    for path in mine:
        path.write_text("keep")
    run(tiny(out, fake_dir, epochs=1, resume=True))  # a finished run: trains nothing, cleans up
    assert not any(p.exists() for p in leftovers) and all(p.exists() for p in mine)


# ---- item 6: checkpoints are verified --------------------------------------------------------------
def _flip_inside(path, marker: bytes):
    data = bytearray(path.read_bytes())
    at = data.find(marker)
    assert at > 0 and data.find(marker, at + 1) < 0
    data[at + len(marker) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_tensor_data_is_detected(tmp_path):
    path = tmp_path / "checkpoint.pt"
    weight = torch.arange(1000, dtype=torch.float32) * 0.37 + 5.0
    save_checkpoint(path, {"epoch": 1, "model": {"w": weight}, "optimizer": {}, "config": {}, "history": []})
    assert torch.equal(load_checkpoint(path)["model"]["w"], weight)
    _flip_inside(path, weight[400:420].numpy().tobytes())
    with pytest.raises(CheckpointError, match=rf"checkpoint {path} .*checksum"):
        load_checkpoint(path)


def test_a_flipped_byte_in_a_run_checkpoint_stops_the_resume(tmp_path, fake_dir):
    out = tmp_path / "r"
    run(tiny(out, fake_dir, epochs=1))
    path = out / "checkpoint.pt"
    w = load_checkpoint(path)["model"]["fc.weight"]
    _flip_inside(path, w.flatten()[:8].numpy().tobytes())
    with pytest.raises(CheckpointError, match=str(path)):
        run(tiny(out, fake_dir, epochs=2, resume=True))
    with pytest.raises(CheckpointError, match=str(path)):
        evaluate(out)


@pytest.mark.parametrize("content", [b"", b"epoch: 3\nmodel: weights\n", b"\x80\x04K\x03.", b"PK\x05\x06" + b"\0" * 18])
def test_unreadable_checkpoints_are_checkpoint_errors(tmp_path, content):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"checkpoint {path} is truncated or corrupt"):
        load_checkpoint(path)


def test_a_missing_checkpoint_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "checkpoint.pt")


# ---- item 5: a diverging run stops; result.json is standard JSON ------------------------------------
def test_a_non_finite_loss_stops_the_run(tmp_path, fake_dir, monkeypatch):
    real_build = engine.build

    def poisoned(*args, **kwargs):
        model = real_build(*args, **kwargs)
        with torch.no_grad():
            model.fc.weight[0, 0] = float("nan")
        return model

    monkeypatch.setattr(engine, "build", poisoned)
    out = tmp_path / "r"
    with pytest.raises(TrainingError, match=r"loss is nan in epoch 1.*base_lr"):
        run(tiny(out, fake_dir, epochs=2))
    assert not (out / "result.json").exists() and not (out / "checkpoint.pt").exists()
    assert (out / "metrics.jsonl").read_text() == ""


def test_result_json_never_holds_nan(tmp_path, fake_dir):
    cfg = tiny(tmp_path / "r", fake_dir)
    history = [{"epoch": 1, "train_loss": 1.0, "train_error": 50.0, "val_error": 40.0, "val_loss": math.inf,
                "lr": 0.1, "seconds": 1.0, "images_per_s": 16.0}]
    for h in ([], history):
        text = engine.result_json(engine.summarize(cfg, h))
        data = strict_json(text)
        assert data["epochs"] == len(h)
    assert strict_json(engine.result_json(engine.summarize(cfg, [])))["val_error"] is None
    assert strict_json(engine.result_json(engine.summarize(cfg, history)))["history"][0]["val_loss"] is None
    result = run(cfg)
    strict_json((tmp_path / "r" / "result.json").read_text())
    for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines():
        strict_json(line)
    assert result["epochs"] == 1


# ---- item 12: settings found wrong only when training starts -----------------------------------------
def test_bad_model_arguments_are_config_errors(tmp_path, fake_dir):
    with pytest.raises(ConfigError, match=r"model_args=\{'width': -4, 'depth': 8\}: width must be positive"):
        run(tiny(tmp_path / "a", fake_dir, model_args={"width": -4, "depth": 8}))
    with pytest.raises(ConfigError, match=r"model_args=.*unexpected keyword argument 'colour'"):
        run(tiny(tmp_path / "b", fake_dir, model_args={"colour": 1}))


def test_cuda_without_a_gpu_is_a_config_error(tmp_path, fake_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device=cuda.*CUDA is not available"):
        run(tiny(tmp_path / "r", fake_dir, device="cuda"))
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


@pytest.mark.parametrize("size", [0, -5])
def test_evaluate_refuses_a_batch_size_below_one(tmp_path, fake_dir, size):
    out = tmp_path / "r"
    run(tiny(out, fake_dir))
    with pytest.raises(ConfigError, match=rf"batch size must be >= 1, got {size}"):
        evaluate(out, batch_size=size)
    assert evaluate(out, batch_size=7)["images"] == 20
