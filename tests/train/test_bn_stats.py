"""BN's running statistics from worker 0 (or the workers' average) in both launchers, the evaluation
diagnostics of result.json, and the seed pairing the studies' paired statistics rely on."""
import json

import pytest
import torch
import torch.multiprocessing as mp

import groupnorm.nn as gnn
from groupnorm.train import Config, run
from groupnorm.train import diagnostics as diag
from groupnorm.train.checkpoint import load_checkpoint
from groupnorm.train.data import TensorData, epoch_generator
from groupnorm.train.launch import spawn
from helpers import fake_fashion, rand


@pytest.fixture(scope="module")
def fake_dir(tmp_path_factory):
    return fake_fashion(tmp_path_factory.mktemp("fashion"), 96, 40)


def tiny(out, data_dir, **kw):
    """A few steps of a 4-channel ResNet-8 with projection shortcuts: 2 workers x 8 images."""
    values = dict(data_dir=data_dir, workers=2, images_per_worker=8, train_subset=32, epochs=2,
                  model="small_resnet", model_args={"width": 4, "depth": 8, "shortcut": "conv"}, norm="bn",
                  threads=1, progress=False, out=str(out), eval_batch_size=16, backend="native")
    values.update(kw)
    return Config(**values)


def _running(state):
    return {k: v for k, v in state.items() if k.endswith(("running_mean", "running_var"))}


# ---- worker 0 vs average, simulated vs torchrun -----------------------------------------------------
@pytest.mark.dist
@pytest.mark.timeout(300)
@pytest.mark.parametrize("norm, running_stats", [("bn", "worker0"), ("bn", "average"), ("brn", "worker0")])
def test_launchers_agree_on_the_running_statistics(tmp_path, fake_dir, norm, running_stats):
    """Two steps per epoch, two epochs: the simulated workers (BN per chunk, running statistics from
    chunk 0 or the chunks' average) and two gloo ranks (rank 0's buffers broadcast, or averaged, after
    every step) give the same losses, parameters and running statistics. The validation loss, which
    each rank computes on its shard with its own buffers, checks that every rank holds rank 0's."""
    results, states = {}, {}
    for launcher in ("simulated", "torchrun"):
        cfg = tiny(tmp_path / launcher, fake_dir, launcher=launcher, norm=norm, bn_running_stats=running_stats)
        if launcher == "simulated":
            results[launcher] = run(cfg)
        else:
            spawn(cfg, start_method="fork" if "fork" in mp.get_all_start_methods() else "spawn")
            results[launcher] = json.loads((tmp_path / launcher / "result.json").read_text())
        states[launcher] = load_checkpoint(tmp_path / launcher / "checkpoint.pt")["model"]
    sim, ddp = results["simulated"], results["torchrun"]
    assert len(sim["history"]) == 2
    for a, b in zip(sim["history"], ddp["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        # every rank evaluates its shard with its own buffers: equal only when they are rank 0's
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-6)
        assert a["val_error"] == b["val_error"]
    for key, value in states["simulated"].items():
        torch.testing.assert_close(states["torchrun"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    untimed = [{k: v for k, v in r["diagnostics"].items() if k != "seconds"} for r in (sim, ddp)]
    assert untimed[0] == pytest.approx(untimed[1]) and "val_error_precise" in untimed[0]


def test_worker0_and_average_differ(tmp_path, fake_dir):
    """The option changes results (so it is not a free key): other running statistics, same weights."""
    states = {}
    for how in ("worker0", "average"):
        run(tiny(tmp_path / how, fake_dir, bn_running_stats=how, epochs=1))
        states[how] = load_checkpoint(tmp_path / how / "checkpoint.pt")["model"]
    a, b = _running(states["worker0"]), _running(states["average"])
    assert a and any(not torch.equal(a[k], b[k]) for k in a)
    for k, v in states["worker0"].items():
        if k not in a and v.is_floating_point():
            torch.testing.assert_close(states["average"][k], v, msg=k)


def test_running_stats_option_is_checked():
    from groupnorm.train import ConfigError
    with pytest.raises(ConfigError, match="bn_running_stats='mean' is not one of worker0, average"):
        Config(bn_running_stats="mean")
    from groupnorm.functional import RUNNING_STATS
    from groupnorm.train.config import RUNNING_STATS as CONFIG_CHOICES
    assert CONFIG_CHOICES == RUNNING_STATS


# ---- diagnostics ----------------------------------------------------------------------------------
def test_result_has_the_diagnostics(tmp_path, fake_dir):
    bn = run(tiny(tmp_path / "bn", fake_dir, epochs=1))["diagnostics"]
    assert set(bn) >= {"train_error", "val_error_running", "val_error_precise", "val_error_batch",
                       "train_error_precise", "group", "val_images", "precise_images", "train_images"}
    assert bn["group"] == 8 and bn["val_images"] == 40 and bn["precise_images"] == bn["train_images"] == 32
    history = json.loads((tmp_path / "bn" / "result.json").read_text())["history"]
    # the model as trained, on all 40 validation images (40 is a multiple of 8): the epoch's own number
    assert bn["val_error_running"] == pytest.approx(history[-1]["val_error"])
    for key in ("train_error", "val_error_running", "val_error_precise", "val_error_batch", "train_error_precise"):
        assert 0 <= bn[key] <= 100
    gn = run(tiny(tmp_path / "gn", fake_dir, epochs=1, norm="gn:2"))["diagnostics"]
    assert set(gn) == {"train_error", "train_images", "seconds"}


class _Net(torch.nn.Module):
    """conv -> BN@2 -> relu -> conv -> BN@2 -> pool -> linear: two BN layers in a row."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.b1 = torch.nn.Conv2d(1, 3, 3), gnn.BatchNorm(3, images_per_worker=2)
        self.c2, self.b2 = torch.nn.Conv2d(3, 4, 3), gnn.BatchNorm(4, images_per_worker=2)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        x = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        return self.fc(x.mean((2, 3)))


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    return TensorData(images, torch.arange(n) % 3, (0.5,), (0.25,), 0, 3)


def test_population_statistics_are_those_of_the_training_forward():
    """Precise BN: each layer's mean and unbiased variance of its input over all training images,
    with the earlier layers normalizing each group of 2 by its own statistics (as in training)."""
    net, data = _Net(), _data(12, 1)
    with torch.no_grad():   # trained-looking running statistics, far from the population ones
        for b in (net.b1, net.b2):
            b.running_mean.fill_(3.0)
            b.running_var.fill_(9.0)
    ref = _Net()   # worker by worker: plain BN over 2 images, in training mode
    ref.load_state_dict(net.state_dict())
    for b in (ref.b1, ref.b2):
        b.images_per_worker = None
    perm = torch.randperm(12, generator=epoch_generator(0, 0, diag.SEED_STREAM))   # the pass's groups
    x = data.normalize(data.images[perm])
    inputs = {}

    def grab(name):
        return lambda m, i: inputs.setdefault(name, []).append(i[0].detach())

    h1, h2 = ref.b1.register_forward_pre_hook(grab("b1")), ref.b2.register_forward_pre_hook(grab("b2"))
    with torch.no_grad():
        for start in range(0, 12, 2):
            ref(x[start:start + 2])
    h1.remove(), h2.remove()
    trained = _Net()
    trained.load_state_dict(net.state_dict())
    bns = [trained.b1, trained.b2]
    diag._per_group(trained, bns, 2)
    used = diag._population_stats(trained, bns, diag._batches(data, 0, None, 2, 4), "cpu")
    assert used == 12
    for name, b in (("b1", trained.b1), ("b2", trained.b2)):
        allx = torch.cat(inputs[name]).double()
        mean = allx.mean((0, 2, 3))
        var = allx.transpose(0, 1).reshape(allx.shape[1], -1).var(1)
        torch.testing.assert_close(b.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.running_var.double(), var, rtol=1e-5, atol=1e-6)


def test_batch_statistics_at_test_are_per_group():
    """val_error_batch's model: each group of N test images normalized by its own statistics, the
    running statistics untouched."""
    net = _Net()
    for b in (net.b1, net.b2):
        b.images_per_worker = 4
    x = rand((8, 1, 8, 8), torch.float32, seed=3)
    grouped = _Net()
    grouped.load_state_dict(net.state_dict())
    before = {k: v.clone() for k, v in grouped.state_dict().items()}
    diag._per_group(grouped, [grouped.b1, grouped.b2], 2)
    single = _Net()
    single.load_state_dict(net.state_dict())
    single.train()
    for b in (single.b1, single.b2):
        b.images_per_worker = None
    with torch.no_grad():
        got = grouped(x)
        expected = torch.cat([single(x[i:i + 2]) for i in range(0, 8, 2)])
    torch.testing.assert_close(got, expected)
    for k, v in grouped.state_dict().items():
        if "running" in k:
            assert torch.equal(v, before[k]), k


# ---- seed pairing ---------------------------------------------------------------------------------
def test_same_seed_same_initial_weights_for_every_norm_and_batch_size(tmp_path, fake_dir):
    """The studies pair runs by seed: BN and GN (and LN, IN, BR) at every batch size start from the
    same conv and linear weights. Checked through the engine itself: with a learning rate of 1e-30 one
    epoch leaves the weights bit-identical to their initialization, so the checkpoint holds it."""
    weights = {}
    for norm, n in (("bn", 8), ("bn", 2), ("gn:2", 8), ("gn/2", 2), ("ln", 4), ("in", 4), ("brn", 4)):
        name = f"{norm.replace(':', '').replace('/', '-')}-{n}"
        run(tiny(tmp_path / name, fake_dir, norm=norm, images_per_worker=n, epochs=1, base_lr=1e-30,
                 train_subset=16))
        state = load_checkpoint(tmp_path / name / "checkpoint.pt")["model"]
        weights[name] = {k: v for k, v in state.items() if v.dim() > 1}   # conv and linear weights
    first, *others = weights.values()
    assert len(first) == 10   # ResNet-8: conv1, 3 blocks x 2 convs, 2 projections, fc
    for name, w in weights.items():
        assert w.keys() == first.keys(), name
        for k in first:
            assert torch.equal(w[k], first[k]), (name, k)
    other_seed = tiny(tmp_path / "seed1", fake_dir, epochs=1, base_lr=1e-30, train_subset=16, seed=1)
    run(other_seed)
    state = load_checkpoint(tmp_path / "seed1" / "checkpoint.pt")["model"]
    assert not torch.equal(state["conv1.weight"], first["conv1.weight"])


@pytest.mark.parametrize("augment", [False, True])
def test_same_seed_same_data_order_for_every_batch_size(augment):
    """An epoch's images (and their crops and flips) come in the same order whatever the global
    batch and however it is split among ranks: one permutation per (seed, epoch)."""
    data = TensorData(torch.randint(0, 256, (40, 1, 6, 6), generator=torch.Generator().manual_seed(5),
                                    dtype=torch.uint8), torch.arange(40) % 10, (0.5,), (0.25,), 2, 10)

    def stream(global_batch, world=1):
        parts = [list(data.train_batches(3, 11, global_batch, r, world, augment)) for r in range(world)]
        xs = [torch.cat([p[s][0] for p in parts]) for s in range(len(parts[0]))]
        return torch.cat(xs)

    ref = stream(4)
    for gb, world in ((8, 1), (16, 2), (32, 4), (2, 1)):
        got = stream(gb, world)
        assert torch.equal(got, ref[:len(got)]), (gb, world)
    assert not torch.equal(stream(4), torch.cat([x for x, _ in data.train_batches(3, 12, 4)]))
