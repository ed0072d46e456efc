"""Config: the paper's defaults, YAML/JSON round trips, key=value coercion, clear errors."""
import json

import pytest

from groupnorm.train import Config, ConfigError
from groupnorm.train.config import coerce, field_docs


def test_defaults_are_the_papers_recipe():
    cfg = Config()
    assert (cfg.workers, cfg.images_per_worker) == (8, 32)
    assert cfg.base_lr == 0.1 and cfg.lr == pytest.approx(0.1)
    assert cfg.lr_steps == [0.3, 0.6, 0.9] and cfg.lr_decay == 0.1
    assert cfg.momentum == 0.9 and cfg.weight_decay == 1e-4
    assert cfg.norm_weight_decay is None  # gamma and beta decayed like every weight
    assert cfg.launcher == "simulated" and cfg.sync_bn is False
    assert cfg.dataset == "fashion-mnist" and cfg.zero_init_residual is True


def test_linear_scaling_rule():
    for n in (32, 16, 8, 4, 2):
        cfg = Config(images_per_worker=n)
        assert cfg.lr == pytest.approx(0.1 * n / 32)
        assert cfg.global_batch == 8 * n


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_round_trip(tmp_path, suffix):
    cfg = Config(norm="gn/4", model_args={"width": 8, "shortcut": "conv"}, lr_steps=[0.5, 0.75],
                 norm_weight_decay=0.0, train_subset=100, probe="layer3", progress=False)
    path = tmp_path / f"c{suffix}"
    cfg.dump(path)
    if suffix == ".json":
        assert json.loads(path.read_text())["norm"] == "gn/4"
    assert Config.load(path) == cfg


def test_yaml_numbers_in_exponent_form_are_floats(tmp_path):
    # YAML 1.1 reads "1e-4" as a string; the config still gets a float.
    path = tmp_path / "c.yaml"
    path.write_text("weight_decay: 1e-4\nbase_lr: 2e-1\nepochs: 3\n")
    cfg = Config.load(path)
    assert cfg.weight_decay == 1e-4 and cfg.base_lr == 0.2 and cfg.epochs == 3


def test_overrides_coerce_types():
    cfg = Config().override("weight_decay=1e-5", "epochs=7", "lr_steps=[0.5,0.75]", "model_args={width: 8}",
                            "norm_weight_decay=none", "sync_bn=yes", "augment=false", "threads=2",
                            "warmup_epochs=1", "norm=gn:16", "out=runs/a=b", "model_args.depth=14")
    assert cfg.weight_decay == 1e-5 and isinstance(cfg.weight_decay, float)
    assert cfg.epochs == 7 and cfg.lr_steps == [0.5, 0.75]
    assert cfg.model_args == {"width": 8, "depth": 14}
    assert cfg.norm_weight_decay is None and cfg.sync_bn is True and cfg.augment is False
    assert cfg.threads == 2 and cfg.warmup_epochs == 1.0 and cfg.norm == "gn:16"
    assert cfg.out == "runs/a=b"  # only the first '=' splits
    assert Config().override("lr_steps=0.5,0.8").lr_steps == [0.5, 0.8]
    assert Config().override("progress=none").progress is None
    assert Config().override("progress=true").progress is True


def test_typo_lists_valid_keys_and_close_match(tmp_path):
    with pytest.raises(ConfigError) as info:
        Config().override("imags_per_worker=4")
    msg = str(info.value)
    assert "imags_per_worker" in msg and "did you mean 'images_per_worker'" in msg
    assert all(name in msg for name in field_docs())
    path = tmp_path / "bad.yaml"
    path.write_text("epochs: 3\nwieght_decay: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*wieght_decay.*did you mean 'weight_decay'"):
        Config.load(path)
    with pytest.raises(ConfigError, match="model_arg"):
        Config.from_dict({"model_arg": {}})


@pytest.mark.parametrize("item, pattern", [
    ("epochs=three", "epochs='three' is not a valid int"),
    ("epochs=2.5", "epochs='2.5' is not a valid int"),
    ("sync_bn=maybe", "sync_bn='maybe' is not a valid bool"),
    ("launcher=mpi", "launcher='mpi' is not one of simulated, torchrun"),
    ("dataset=mnist", "dataset='mnist' is not one of"),
    ("workers=0", "workers must be >= 1, got 0"),
    ("lr_steps=[0.6,0.3]", "lr_steps must be increasing"),
    ("lr_steps=[1.5]", "lr_steps must be increasing fractions"),
    ("weight_decay=-1", "weight_decay must be >= 0"),
    ("model_args=[1,2]", "model_args=.* is not a valid dict"),
    ("device=tpu", "device='tpu' is not one of"),
    ("epochs", "not of the form key=value"),
    ("epochs.x=3", "epochs is not a mapping"),
])
def test_bad_values_name_the_field_and_value(item, pattern):
    with pytest.raises(ConfigError, match=pattern):
        Config().override(item)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        Config.load(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        Config.load(tmp_path / "list.yaml")
    (tmp_path / "broken.json").write_text("{epochs: ")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Config.load(tmp_path / "broken.json")
    (tmp_path / "empty.yaml").write_text("")
    assert Config.load(tmp_path / "empty.yaml") == Config()


def test_coerce_keeps_python_values():
    assert coerce("x", 3, int) == 3 and coerce("x", 3, float) == 3.0 and coerce("x", 4.0, int) == 4
    with pytest.raises(ConfigError):
        coerce("x", True, int)


def test_every_field_is_documented():
    for name, doc in field_docs().items():
        assert len(doc["help"]) > 10, name


# ---- non-finite and out-of-range values (issue 15, items 5 and 12) ---------------------------------
@pytest.mark.parametrize("item, pattern", [
    ("base_lr=.nan", r"base_lr must be a finite number, got nan"),
    ("base_lr=nan", r"base_lr='nan' is not a valid float"),
    ("base_lr=1e999", r"base_lr must be a finite number, got inf"),
    ("base_lr=.inf", r"base_lr must be a finite number, got inf"),
    ("weight_decay=.inf", r"weight_decay must be a finite number"),
    ("norm_weight_decay=-.inf", r"norm_weight_decay must be a finite number"),
    ("warmup_epochs=.nan", r"warmup_epochs must be a finite number"),
    ("lr_decay=.nan", r"lr_decay must be a finite number"),
    ("momentum=.nan", r"momentum must be a finite number"),
    ("momentum=5", r"momentum must be in \[0, 1\), got 5.0"),
    ("momentum=1", r"momentum must be in \[0, 1\), got 1.0"),
    ("momentum=-0.1", r"momentum must be in \[0, 1\)"),
    ("lr_steps=[.nan]", r"lr_steps must be increasing fractions"),
    ("seed=-1", r"seed must be in \[0, 2\*\*32\), got -1"),
    ("seed=4294967296", r"seed must be in \[0, 2\*\*32\)"),
    ("subset_seed=-3", r"subset_seed must be in \[0, 2\*\*32\)"),
    ("loader_workers=-1", r"loader_workers must be >= 0"),
    ("model=resnet7", r"model='resnet7' is not one of .*resnet20"),
    ("norm=batchnorm", r"norm='batchnorm'.*unknown normalization kind"),
    ("norm=gn:0", r"norm='gn:0'.*num_groups must be >= 1"),
    ("norm=bn@0", r"norm='bn@0'.*images_per_worker must be >= 1"),
])
def test_non_finite_and_out_of_range_values_are_refused(item, pattern):
    with pytest.raises(ConfigError, match=pattern):
        Config().override(item)


def test_non_finite_values_from_a_yaml_file_name_the_file_and_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("base_lr: .nan\n")
    with pytest.raises(ConfigError, match=r"c.yaml: base_lr must be a finite number, got nan"):
        Config.load(path)
    path.write_text("weight_decay: .inf\n")
    with pytest.raises(ConfigError, match=r"weight_decay must be a finite number, got inf"):
        Config.load(path)
    with pytest.raises(ConfigError, match="momentum must be in"):
        Config(momentum=5)


def test_norm_specs_are_checked_by_the_factory_parser():
    # "bn @ 32" is what NormSpec reads as bn@32: accepted here, and the engine reads it the same way.
    assert Config(norm="bn @ 32").norm == "bn @ 32"
    with pytest.raises(ConfigError, match="norm="):
        Config(norm="gn:")


# ---- keys that do not change results (issue 15, item 16) --------------------------------------------
def test_result_neutral_keys_are_marked_once_in_the_fields():
    from groupnorm.studies import runner
    from groupnorm.train import engine
    from groupnorm.train.config import result_neutral_keys
    keys = result_neutral_keys()
    assert {"out", "resume", "overwrite", "threads", "progress", "device", "backend", "probe",
            "probe_every", "launcher", "eval_batch_size", "data_dir", "tensorboard", "loader_workers"} == keys
    assert engine.RESUMABLE_CHANGES == keys and runner._FREE_KEYS == keys
    for name, doc in field_docs().items():
        assert doc["same_results"] == (name in keys)
    assert not keys & {"norm", "seed", "base_lr", "workers", "images_per_worker", "model", "epochs"}
