"""The studies as data: which runs each study and preset expands to, and that every run is a valid Config."""
import dataclasses

import pytest

from groupnorm.studies import specs
from groupnorm.studies.runner import unique_runs
from groupnorm.studies.specs import FULL, QUICK, Preset, expand, group_choices, model_channels, run_name
from groupnorm.train import Config


def _key(r):
    return (r.norm, r.images_per_worker, r.groups, r.group_size)


def test_quick_batch_is_bn_and_gn_at_32_and_2_with_8_workers():
    runs = expand("batch", "quick")
    assert {_key(r)[:2] for r in runs} == {("bn", 32), ("bn", 2), ("gn", 32), ("gn", 2)}
    assert QUICK.seeds >= 2 and len(runs) == 4 * QUICK.seeds
    assert {r.seed for r in runs} == set(range(QUICK.seeds))
    assert all(r.workers == 8 and r.config["workers"] == 8 for r in runs)
    # the paper's recipe: same epochs for every batch size, lr from Config's linear rule (not overridden)
    assert len({r.config["epochs"] for r in runs}) == 1
    assert all("base_lr" not in r.config or r.config["base_lr"] == 0.1 for r in runs)
    assert len({r.name for r in runs}) == len(runs)


def test_full_batch_has_the_paper_sizes_and_batch_renorm_at_4():
    runs = expand("batch", "full")
    per_seed = [r for r in runs if r.seed == 0]
    assert sorted({r.images_per_worker for r in per_seed if r.norm == "bn"}) == [2, 4, 8, 16, 32]
    assert [r.images_per_worker for r in per_seed if r.norm == "brn"] == [4]
    assert FULL.seeds >= 3 and len(runs) == FULL.seeds * 11


def test_presets_follow_the_papers_protocol():
    """Projection shortcuts, BN statistics per worker with worker 0's running statistics, lr from the
    linear rule, the same epochs for every batch size of a study, and at least 3 seeds for the
    paired statistics of the batch study."""
    for preset in (QUICK, FULL):
        assert preset.for_study("batch").seeds >= 3
        for run in expand("all", preset):
            cfg = run.config
            if cfg["model"] == "small_resnet":
                assert cfg["model_args"]["shortcut"] == "conv", run.name
            assert cfg["bn_running_stats"] == "worker0" and not cfg.get("sync_bn", False)
            assert cfg.get("warmup_epochs", 0) == 0 and "lr_decay" not in cfg
        for study in ("batch", "depth"):
            runs = expand(study, preset)
            assert len({(r.config["epochs"], r.config["train_subset"]) for r in runs}) == 1, study


def test_every_run_is_a_valid_config(tmp_path):
    for run in expand("all", "full") + expand("all", "quick"):
        cfg = Config(**run.config, out=str(tmp_path / run.name))
        assert cfg.images_per_worker == run.images_per_worker
        assert cfg.lr == pytest.approx(run.config.get("base_lr", 0.1) * run.images_per_worker / 32)


def test_norms_study_norm_specs():
    runs = {r.norm: r for r in expand("norms", "full", seeds=1)}
    assert set(runs) == {"bn", "ln", "in", "gn", "gn+ws"}
    assert runs["gn+ws"].config["ws"] is True and runs["gn"].config["ws"] is False
    assert runs["gn"].config["norm"] == f"gn/{FULL.gn_group_size}" and runs["ln"].config["norm"] == "ln"
    assert runs["gn+ws"].config["norm"] == runs["gn"].config["norm"]
    assert all(r.images_per_worker == 32 for r in runs.values())


def test_groups_are_clipped_to_what_the_widths_allow():
    p = dataclasses.replace(QUICK, model="small_resnet", model_args={"depth": 8, "width": 8}, per_study={})
    assert model_channels(p.model, p.model_args) == (8, 16, 32)
    valid_g, valid_s, notes = group_choices(p)
    assert valid_g == [8, 4, 2, 1] and valid_s == [8, 4, 2, 1]
    assert "G = 64, 32, 16 left out" in notes[0] and "64, 32, 16 channels per group left out" in notes[1]
    runs = expand("groups", p, seeds=1)
    assert sorted(r.groups for r in runs if r.group_size is None) == [1, 2, 4, 8]
    assert {r.config["norm"] for r in runs if r.groups is None} == {"gn/8", "gn/4", "gn/2", "gn/1"}


def test_full_groups_keep_the_papers_g32_and_16_channels_per_group():
    valid_g, valid_s, notes = group_choices(FULL.for_study("groups"))
    assert 32 in valid_g and 16 in valid_s and 64 not in valid_g and 64 not in valid_s
    assert len(notes) == 2


def test_features_probe_is_a_module_of_the_vgg():
    from groupnorm.models import build_model

    runs = expand("features", "full", seeds=1)
    assert {r.norm for r in runs} == {"none", "bn", "gn"}
    for r in runs:
        net = build_model(r.config["model"], num_classes=10, in_channels=1, norm="none", **r.config["model_args"])
        assert r.config["probe"] in dict(net.named_modules())


def test_depth_study_uses_a_deeper_resnet_at_32_and_2():
    runs = expand("depth", "full", seeds=1)
    assert {(r.norm, r.images_per_worker) for r in runs} == {("bn", 32), ("bn", 2), ("gn", 32), ("gn", 2)}
    base = expand("batch", "full", seeds=1)[0].config["model_args"]
    assert runs[0].config["model_args"]["depth"] > base["depth"]


def test_studies_share_runs_by_name():
    runs = expand("all", "full")
    unique = unique_runs(runs)
    assert len(unique) < len(runs)  # GN and BN at 32 are in batch and norms
    base = specs.model_label(FULL.model, FULL.model_args)
    gn32 = [r for r in runs if r.name == run_name(base, "gn", None, FULL.gn_group_size, 8, 32, 0)]
    assert {r.study for r in gn32} == {"batch", "norms"}


def test_gn_is_g_groups_or_a_fixed_group_size():
    by_size = {r.norm: r for r in expand("batch", "quick", seeds=1)}
    assert by_size["gn"].config["norm"] == "gn/4" and by_size["gn"].group_size == 4
    assert by_size["gn"].groups is None and by_size["bn"].config["norm"] == "bn"
    p = dataclasses.replace(QUICK, gn_group_size=None, gn_groups=2)
    by_g = {r.norm: r for r in expand("batch", p, seeds=1)}
    assert by_g["gn"].config["norm"] == "gn:2" and by_g["gn"].groups == 2
    features = [r for r in expand("features", p, seeds=1) if r.norm == "gn"]
    assert features[0].config["norm"] == "gn:2"


def test_overrides_and_errors():
    runs = expand("batch", "quick", seeds=1, dataset="cifar10", data_dir="/data")
    assert len(runs) == 4 and runs[0].config["dataset"] == "cifar10" and runs[0].config["data_dir"] == "/data"
    with pytest.raises(ValueError, match="unknown study 'batchh'"):
        expand("batchh")
    with pytest.raises(ValueError, match="unknown preset 'slow'"):
        expand("batch", "slow")
    with pytest.raises(ValueError, match="seeds must be >= 1"):
        expand("batch", "quick", seeds=0)


def test_run_names_say_what_is_trained():
    assert run_name("resnet20", "gn", 32, None, 8, 2, 1) == "resnet20-gn32-8x2-s1"
    assert run_name("resnet20", "gn", None, 16, 8, 32, 0) == "resnet20-gn-c16-8x32-s0"
    assert run_name("resnet20", "gn+ws", 32, None, 8, 32, 0) == "resnet20-gn32-ws-8x32-s0"
    assert specs.model_label("small_resnet", {"width": 8, "depth": 8}) == "small_resnet-depth8-width8"
    assert isinstance(Preset("x").for_study("batch"), Preset)
