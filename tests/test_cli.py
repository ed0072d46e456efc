"""`groupnorm train|eval` (and the study/report hook): options, errors, a real torchrun run."""
import dataclasses
import importlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from groupnorm import cli
from groupnorm.train import Config
from helpers import fake_fashion


TINY = ["--workers", "2", "--images-per-worker", "8", "--train-subset", "16", "--epochs", "1",
        "--model", "small_resnet", "--model-args", "{width: 4, depth: 8}", "--norm", "bn", "--threads", "1",
        "--no-progress"]


@pytest.fixture(scope="module")
def fake_dir(tmp_path_factory):
    return fake_fashion(tmp_path_factory.mktemp("fashion"), 48, 20)


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(Config):
        assert "--" + field.name.replace("_", "-") in text
        assert " ".join(field.metadata["help"].split())[:40] in text, field.name
    assert "key=value" in text


def test_dry_run_resolves_file_then_pairs_then_flags(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    Config(epochs=5, workers=4, norm="gn:4").dump(path)
    code = cli.main(["train", "--config", str(path), "--dry-run", "workers=2", "lr_steps=[0.5]",
                     "--norm", "bn", "--sync-bn", "model_args.width=32", "--images-per-worker", "2"])
    assert code == 0
    got = yaml.safe_load(capsys.readouterr().out)
    assert got["epochs"] == 5 and got["workers"] == 2 and got["norm"] == "bn" and got["sync_bn"] is True
    assert got["lr_steps"] == [0.5] and got["model_args"] == {"width": 32} and got["images_per_worker"] == 2


def test_bad_key_is_reported_with_the_valid_ones(capsys):
    assert cli.main(["train", "--dry-run", "imags_per_worker=4"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'imags_per_worker'" in err and "did you mean 'images_per_worker'" in err
    assert "valid keys:" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        cli.main(["train", "--wrokers", "2"])


def test_missing_dataset_message(tmp_path, capsys):
    assert cli.main(["train", "--data-dir", str(tmp_path), "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "apt-get install dataset-fashion-mnist" in err and "--data-dir" in err


def test_train_then_eval(tmp_path, fake_dir, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", *TINY, "--data-dir", fake_dir, "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["epochs"] == 1 and "history" not in result
    assert cli.main(["eval", str(out), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["error"] == pytest.approx(result["val_error"]) and evaluated["split"] == "val"
    assert cli.main(["eval", str(out), "--split", "train"]) == 0
    assert "train error" in capsys.readouterr().out
    assert cli.main(["eval", str(tmp_path)]) == 1  # not a run directory
    # A second train into the same directory needs --resume.
    assert cli.main(["train", *TINY, "--data-dir", fake_dir, "--out", str(out)]) == 1
    assert "resume" in capsys.readouterr().err


def test_studies_register_when_present(monkeypatch):
    real = importlib.import_module

    def missing(name, *args):
        if name == "groupnorm.studies.cli":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *args)

    def broken(name, *args):
        if name == "groupnorm.studies.cli":
            raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")
        return real(name, *args)

    monkeypatch.setattr(cli.importlib, "import_module", missing)
    assert "study" not in cli.build_parser().format_help().split("COMMAND")[-1].split()
    monkeypatch.setattr(cli.importlib, "import_module", broken)
    with pytest.raises(ModuleNotFoundError, match="matplotlib"):
        cli.build_parser()


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_torchrun_matches_simulated(tmp_path, fake_dir):
    """`torchrun --nproc_per_node 2 -m groupnorm train --launcher torchrun` gives what the simulated
    workers give (same loss and validation error, same parameters)."""
    if shutil.which("torchrun") is None and importlib.util.find_spec("torch.distributed.run") is None:
        pytest.skip("torchrun not available")
    from groupnorm.train import run
    from groupnorm.train.checkpoint import load_checkpoint
    import torch
    args = [*TINY, "--data-dir", fake_dir]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "groupnorm", "train", *args, "--launcher", "torchrun", "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "result.json").read_text())
    cfg = cli.resolve_config(cli.build_parser().parse_args(["train", *args, "--out", str(tmp_path / "sim")]))
    sim = run(cfg)
    assert ddp["history"][0]["train_loss"] == pytest.approx(sim["history"][0]["train_loss"], rel=1e-6)
    assert ddp["val_error"] == sim["val_error"]
    a = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "sim" / "checkpoint.pt")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


# ---- one line, no traceback, non-zero exit (issue 15, items 4, 5 and 12) -------------------------------
def error_line(capsys, command="train"):
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"groupnorm {command}: error: "), err
    return last


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, fake_dir):
    out = tmp_path_factory.mktemp("runs") / "done"
    assert cli.main(["train", *TINY, "--data-dir", fake_dir, "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("size", ["-5", "0"])
def test_eval_refuses_a_batch_size_below_one(finished_run, capsys, size):
    capsys.readouterr()
    assert cli.main(["eval", str(finished_run), "--batch-size", size]) == 2
    assert f"batch size must be >= 1, got {size}" in error_line(capsys, "eval")


@pytest.mark.parametrize("content", [b"", b"this is a text file, not a checkpoint\n"])
def test_unusable_checkpoints_are_one_line(tmp_path, finished_run, fake_dir, capsys, content):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (out / "checkpoint.pt").write_bytes(content)
    capsys.readouterr()
    assert cli.main(["eval", str(out)]) == 1
    assert f"checkpoint {out / 'checkpoint.pt'} is truncated or corrupt" in error_line(capsys, "eval")
    assert cli.main(["train", *TINY, "--data-dir", fake_dir, "--out", str(out), "--resume"]) == 1
    assert str(out / "checkpoint.pt") in error_line(capsys)


@pytest.mark.parametrize("args, message", [
    (["--model", "resnet7"], "model='resnet7' is not one of"),
    (["--norm", "batchnorm"], "norm='batchnorm'"),
    (["--norm", "gn:0"], "num_groups must be >= 1"),
    (["--model-args", "{width: -4}"], "width must be positive"),
    (["--seed", "-1"], "seed must be in [0, 2**32)"),
    (["--base-lr", ".nan"], "base_lr must be a finite number, got nan"),
    (["momentum=5"], "momentum must be in [0, 1)"),
    (["--resume", "--overwrite"], "set one of them"),
])
def test_bad_settings_are_one_line(tmp_path, fake_dir, capsys, args, message):
    assert cli.main(["train", *TINY, "--data-dir", fake_dir, "--out", str(tmp_path / "r"), *args]) == 2
    assert message in error_line(capsys)
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_cuda_without_a_gpu_is_one_line(tmp_path, fake_dir, capsys, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["train", *TINY, "--data-dir", fake_dir, "--out", str(tmp_path / "r"), "--device", "cuda"]) == 2
    assert "CUDA is not available" in error_line(capsys)
    monkeypatch.undo()
    assert cli.main(["eval", str(tmp_path / "missing"), "--device", "cuda:99"]) == 1  # not a run directory
    assert "is not a run directory" in error_line(capsys, "eval")


def test_triton_backend_without_triton_is_one_line(tmp_path, fake_dir):
    """A fresh process in which Triton cannot be imported: the registry's reason, one line, exit 2."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "from groupnorm.cli import main\n"
            f"sys.exit(main(['train', *{TINY!r}, '--data-dir', {fake_dir!r}, '--out', {str(tmp_path / 'r')!r}, "
            "'--backend', 'triton']))\n")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("groupnorm train: error: backend=triton") and "triton" in last[30:], last


def _broken_fashion(root, **files):
    from helpers import write_idx
    root.mkdir()
    fake_fashion(root, 48, 20)
    for name, content in files.items():
        path = root / f"{name}-ubyte.gz"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            write_idx(path, content)
    return str(root)


@pytest.mark.parametrize("files, message", [
    ({"train-images-idx3": b"garbage, not gzip"}, "train-images-idx3-ubyte.gz cannot be read"),
    ({"t10k-labels-idx1": [3] * 19 + [12]}, "t10k-labels-idx1-ubyte.gz: 1 labels out of range [0, 10)"),
    ({"train-labels-idx1": [1] * 47}, "has 48 images but"),
])
def test_bad_data_files_are_one_line(tmp_path, capsys, files, message):
    from groupnorm.train.data import _fashion_arrays
    _fashion_arrays.cache_clear()
    data = _broken_fashion(tmp_path / "data", **files)
    assert cli.main(["train", *TINY, "--data-dir", data, "--out", str(tmp_path / "r")]) == 1
    line = error_line(capsys)
    assert message in line and str(tmp_path / "data") in line


def test_a_busy_or_finished_run_directory_is_one_line(tmp_path, finished_run, fake_dir, capsys):
    from groupnorm.train.rundir import RunLock
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    with RunLock(out):
        assert cli.main(["train", *TINY, "--data-dir", fake_dir, "--out", str(out), "--resume"]) == 1
        assert "another training" in error_line(capsys)
    (out / "checkpoint.pt").unlink()
    assert cli.main(["train", *TINY, "--data-dir", fake_dir, "--out", str(out)]) == 1
    assert "--overwrite" in error_line(capsys)
    assert cli.main(["train", *TINY, "--data-dir", fake_dir, "--out", str(out), "--overwrite"]) == 0


def test_a_diverging_run_exits_non_zero(tmp_path, fake_dir, capsys, monkeypatch):
    import torch
    from groupnorm.train import engine
    real_build = engine.build

    def poisoned(*args, **kwargs):
        model = real_build(*args, **kwargs)
        with torch.no_grad():
            next(model.parameters()).fill_(float("inf"))
        return model

    monkeypatch.setattr(engine, "build", poisoned)
    assert cli.main(["train", *TINY, "--data-dir", fake_dir, "--out", str(tmp_path / "r")]) == 1
    assert "training diverged: the loss is nan" in error_line(capsys)
