"""Datasets: readers (IDX, CIFAR pickles, image folders), subsets, batch augmentation, worker slices."""
import gzip
import os
import pickle

import numpy as np
import pytest
import torch

from groupnorm.train import Config
from groupnorm.train.data import (FASHION_DIR, STATS, DatasetNotFoundError, TensorData, crop_flip, load_cifar,
                                  load_data, load_fashion_mnist, read_idx, shard,
                                  subset_indices)

HAS_FASHION = os.path.isfile(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz"))
needs_fashion = pytest.mark.skipif(not HAS_FASHION, reason="apt-get install dataset-fashion-mnist")


def write_idx(path, array, compress=True):
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def fake_fashion(root, n_train=40, n_val=20, compress=True):
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_val)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n) % 10
        suffix = ".gz" if compress else ""
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress)
        arrays[prefix] = (images, labels)
    return arrays


def random_data(m=24, c=2, h=6, w=5, pad=2, classes=4):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (m, c, h, w), dtype=torch.uint8, generator=g)
    return TensorData(images, torch.arange(m) % classes, (0.5,) * c, (0.25,) * c, pad, classes)


# ---- readers --------------------------------------------------------------------------------------
@pytest.mark.parametrize("compress", [True, False])
def test_fashion_reader_on_written_idx_files(tmp_path, compress):
    arrays = fake_fashion(tmp_path, compress=compress)
    train, val = load_fashion_mnist(str(tmp_path))
    assert train.images.shape == (40, 1, 28, 28) and val.images.shape == (20, 1, 28, 28)
    assert torch.equal(train.images[:, 0], torch.from_numpy(arrays["train"][0]))
    assert torch.equal(val.labels, torch.from_numpy(arrays["t10k"][1]).long())
    assert train.num_classes == 10 and train.channels == 1


def test_truncated_idx_names_the_file(tmp_path):
    write_idx(tmp_path / "x.gz", np.zeros((4, 3, 3)))
    data = gzip.decompress((tmp_path / "x.gz").read_bytes())
    (tmp_path / "y").write_bytes(data[:-5])
    with pytest.raises(ValueError, match=r"y is truncated or corrupt"):
        read_idx(tmp_path / "y")
    (tmp_path / "z").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "z")


def test_missing_fashion_says_how_to_install_or_point(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_data(Config(data_dir=str(tmp_path)))
    msg = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "--data-dir" in msg and str(tmp_path) in msg
    assert isinstance(info.value, FileNotFoundError)


@needs_fashion
def test_real_fashion_mnist_and_its_normalization():
    train, val = load_fashion_mnist(None)
    assert train.images.shape == (60000, 1, 28, 28) and val.images.shape == (10000, 1, 28, 28)
    assert torch.equal(torch.bincount(train.labels), torch.full((10,), 6000))
    x = train.images.float() / 255
    mean, std = STATS["fashion-mnist"]
    assert x.mean().item() == pytest.approx(mean[0], abs=1e-3) and x.std().item() == pytest.approx(std[0], abs=1e-3)
    z = train.normalize(train.images[:5000])
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.05


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickles(tmp_path, name):
    rng = np.random.default_rng(0)
    sub, files, key = (("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels")
                       if name == "cifar10" else ("cifar-100-python", ["train", "test"], b"fine_labels"))
    (tmp_path / sub).mkdir()
    written = {}
    for f in files:
        data = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
        labels = list(rng.integers(0, 10, 3))
        with open(tmp_path / sub / f, "wb") as fh:
            pickle.dump({b"data": data, key: labels, b"coarse_labels": [0, 0, 0]}, fh)
        written[f] = (data, labels)
    train, val = load_cifar(name, str(tmp_path))
    assert train.images.shape == (3 * (len(files) - 1), 3, 32, 32) and val.images.shape == (3, 3, 32, 32)
    data, labels = written[files[-1]]
    # A row is 1024 red, then 1024 green, then 1024 blue values, each 32x32 row-major.
    assert val.images[1, 2, 3, 4].item() == data[1, 2 * 1024 + 3 * 32 + 4]
    assert val.labels.tolist() == [int(v) for v in labels]
    assert train.num_classes == (10 if name == "cifar10" else 100) and train.pad == 4


def test_missing_cifar_says_where_to_get_it(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"cs.toronto.edu/~kriz/cifar.html.*--data-dir"):
        load_data(Config(dataset="cifar10", data_dir=str(tmp_path)))
    with pytest.raises(DatasetNotFoundError, match="no data_dir given"):
        load_data(Config(dataset="cifar100"))
    with pytest.raises(DatasetNotFoundError, match="DIR/train/<class>"):
        load_data(Config(dataset="imagefolder", data_dir=str(tmp_path)))


def test_imagefolder(tmp_path):
    pytest.importorskip("torchvision")
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("val", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
                    tmp_path / split / cls / f"{i}.png")
    cfg = Config(dataset="imagefolder", data_dir=str(tmp_path), image_size=16, workers=2, images_per_worker=2,
                 loader_workers=0, train_subset=8)
    train, val = load_data(cfg)
    assert len(train) == 8 and len(val) == 4 and train.num_classes == 2
    assert torch.equal(torch.bincount(train.labels[train.indices]), torch.tensor([4, 4]))
    batches = list(train.train_batches(0, 0, 4, rank=1, world=2))
    assert len(batches) == 2 and batches[0][0].shape == (2, 3, 16, 16)
    x, y = next(iter(val.eval_batches(10)))
    assert x.shape == (4, 3, 16, 16) and y.tolist() == [0, 0, 1, 1]


# ---- subsets --------------------------------------------------------------------------------------
def test_subsets_are_balanced_sorted_and_seeded():
    labels = torch.arange(1000) % 10
    a = subset_indices(labels, 95, seed=0)
    assert len(a) == 95 and torch.equal(a, torch.sort(a).values) and len(set(a.tolist())) == 95
    counts = torch.bincount(labels[a], minlength=10)
    assert counts.max() - counts.min() <= 1
    assert torch.equal(a, subset_indices(labels, 95, seed=0))
    assert not torch.equal(a, subset_indices(labels, 95, seed=1))
    assert torch.equal(subset_indices(labels, None, 0), torch.arange(1000))
    # A class that runs out leaves its share to the others.
    skewed = torch.tensor([0] * 3 + [1] * 50 + [2] * 50)
    assert torch.bincount(skewed[subset_indices(skewed, 30, 0)]).tolist() == [3, 14, 13]


def test_shard_covers_everything_once():
    parts = [shard(10, r, 3) for r in range(3)]
    assert [list(p) for p in parts] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]


def test_subset_smaller_than_a_global_batch_is_an_error(tmp_path):
    fake_fashion(tmp_path)
    with pytest.raises(ValueError, match=r"fewer than one global batch.*8 \* 32 = 256"):
        load_data(Config(data_dir=str(tmp_path)))


# ---- augmentation and batches -------------------------------------------------------------------
def test_crop_flip_matches_a_per_image_loop():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (7, 3, 5, 6), dtype=torch.uint8, generator=g)
    pad = 2
    dy, dx = torch.randint(0, 5, (7,), generator=g), torch.randint(0, 5, (7,), generator=g)
    flip = torch.tensor([True, False, True, True, False, False, True])
    out = crop_flip(images, pad, dy, dx, flip)
    for b in range(7):
        padded = torch.zeros(3, 5 + 2 * pad, 6 + 2 * pad, dtype=torch.uint8)
        padded[:, pad:pad + 5, pad:pad + 6] = images[b]
        want = padded[:, dy[b]:dy[b] + 5, dx[b]:dx[b] + 6]
        if flip[b]:
            want = want.flip(-1)
        assert torch.equal(out[b], want)
    centre = torch.full((7,), pad)
    assert torch.equal(crop_flip(images, pad, centre, centre, torch.zeros(7, dtype=torch.bool)), images)


def test_workers_slice_the_same_global_batches():
    data = random_data()
    simulated = list(data.train_batches(3, seed=5, global_batch=8))
    ranks = [list(data.train_batches(3, seed=5, global_batch=8, rank=r, world=4)) for r in range(4)]
    assert len(simulated) == 3  # 24 images, global batch 8, the rest dropped
    for s, (x, y) in enumerate(simulated):
        assert torch.equal(torch.cat([ranks[r][s][0] for r in range(4)]), x)
        assert torch.equal(torch.cat([ranks[r][s][1] for r in range(4)]), y)


def test_data_order_is_a_function_of_seed_and_epoch():
    data = random_data()
    first = [x for x, _ in data.train_batches(1, seed=0, global_batch=8)]
    again = [x for x, _ in data.train_batches(1, seed=0, global_batch=8)]
    other = [x for x, _ in data.train_batches(2, seed=0, global_batch=8)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_batches_keep_images_with_their_labels():
    data = random_data(m=16, pad=0)
    data.labels = torch.arange(16)  # label = index, so each image can be found again
    for x, y in data.train_batches(0, seed=0, global_batch=8, augment=False):
        assert torch.equal(x, data.normalize(data.images[y]))
    x, y = next(data.train_batches(0, seed=0, global_batch=8, augment=True))
    flipped = data.normalize(data.images[y].flip(-1))
    plain = data.normalize(data.images[y])
    assert all(torch.equal(x[i], plain[i]) or torch.equal(x[i], flipped[i]) for i in range(8))
    z = data.normalize(torch.full((1, 2, 1, 1), 255, dtype=torch.uint8))
    assert torch.allclose(z, torch.full_like(z, (1 - 0.5) / 0.25))


def test_eval_batches_cover_the_set_in_order():
    data = random_data(m=10)
    ys = [y for r in range(3) for _, y in data.eval_batches(2, rank=r, world=3)]
    assert torch.equal(torch.cat(ys), data.labels)


# ---- safe and checked loading (issue 15, items 11 and 12) ---------------------------------------------
CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def write_cifar10(root, batches=None, protocol=pickle.DEFAULT_PROTOCOL, n=3):
    """A CIFAR-10 look-alike in root/cifar-10-batches-py; ``batches`` maps a file name to the object
    pickled there instead of a valid batch."""
    rng = np.random.default_rng(0)
    sub = root / "cifar-10-batches-py"
    sub.mkdir(exist_ok=True)
    for name in CIFAR10_FILES:
        batch = {b"batch_label": b"training batch", b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, n)], b"filenames": [b"a.png"] * n}
        obj = (batches or {}).get(name, batch)
        (sub / name).write_bytes(obj if isinstance(obj, bytes) else pickle.dumps(obj, protocol=protocol))
    return sub


def _load_cifar10(root):
    from groupnorm.train.data import _cifar_arrays
    _cifar_arrays.cache_clear()
    return load_cifar("cifar10", str(root))


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_pickles_cannot_run_code(tmp_path):
    from groupnorm.errors import DataError
    marker = tmp_path / "pwned"
    sub = write_cifar10(tmp_path, {"data_batch_3": {b"data": _Exploit(marker), b"labels": [0]}})
    with pytest.raises(DataError, match=rf"{sub / 'data_batch_3'}.*refused.*(posix|os)\.system"):
        _load_cifar10(tmp_path)
    assert not marker.exists()
    # the same through builtins (eval), and a global hidden in a label list
    for name, obj in (("test_batch", pickle.dumps({b"data": 1, b"labels": [eval]})),
                      ("data_batch_1", b"cbuiltins\neval\n(S'1+1'\ntR.")):
        sub = write_cifar10(tmp_path, {name: obj})
        with pytest.raises(DataError, match=rf"{sub / name}.*refused.*builtins\.eval"):
            _load_cifar10(tmp_path)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_pickles_of_every_protocol_load(tmp_path, protocol):
    write_cifar10(tmp_path, protocol=protocol)
    train, val = _load_cifar10(tmp_path)
    assert train.images.shape == (15, 3, 32, 32) and val.images.shape == (3, 3, 32, 32)


def test_cifar_pickles_written_by_python2_numpy_1_load(tmp_path):
    """The files from cs.toronto.edu name numpy.core.multiarray._reconstruct (numpy < 2)."""
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    text = pickle.dumps({b"data": data, b"labels": [1, 2, 3]}, protocol=2)
    text = text.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert b"numpy.core.multiarray\n_reconstruct" in text
    write_cifar10(tmp_path, {"test_batch": text})
    _, val = _load_cifar10(tmp_path)
    assert torch.equal(val.images.reshape(3, -1), torch.from_numpy(data)) and val.labels.tolist() == [1, 2, 3]


@pytest.mark.parametrize("obj, match", [
    ({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1, 10]}, r"labels out of range.*\[0, 10\).*10"),
    ({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, -1, 2]}, r"labels out of range"),
    ({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1]}, r"3 images but 2 labels"),
    ({b"data": np.zeros((3, 100), np.uint8), b"labels": [0, 1, 2]}, r"3072"),
    ({b"labels": [0, 1, 2]}, r"no b'data'"),
    ([1, 2, 3], r"not a CIFAR batch"),
    (b"\x80\x04garbage", r"cannot be read"),
])
def test_bad_cifar_batches_name_the_file(tmp_path, obj, match):
    from groupnorm.errors import DataError
    sub = write_cifar10(tmp_path, {"data_batch_2": obj})
    with pytest.raises(DataError, match=rf"{sub / 'data_batch_2'}.*{match}"):
        _load_cifar10(tmp_path)


def _fashion_variant(root, **replace):
    from groupnorm.train.data import _fashion_arrays
    _fashion_arrays.cache_clear()
    fake_fashion(root)
    for name, content in replace.items():
        path = root / f"{name.replace('_', '-')}-ubyte.gz"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            write_idx(path, content)
    return root


@pytest.mark.parametrize("name, content, match", [
    ("train_labels_idx1", np.arange(40) % 11, r"train-labels-idx1-ubyte.gz.*labels out of range.*\[0, 10\).*10"),
    ("t10k_labels_idx1", np.arange(21) % 10, r"t10k-images-idx3-ubyte.gz has 20 images but "
                                             r".*t10k-labels-idx1-ubyte.gz has 21 labels"),
    ("train_images_idx3", b"this is not gzip data at all", r"train-images-idx3-ubyte.gz cannot be read"),
    ("train_images_idx3", gzip.compress(b"\0\0\x08\x03" + b"\0" * 40)[:-12],
     r"train-images-idx3-ubyte.gz cannot be read"),
    ("train_labels_idx1", np.zeros((40, 2)), r"train-labels-idx1-ubyte.gz.*expected labels of shape \(M,\)"),
])
def test_bad_fashion_files_are_found_at_load_time(tmp_path, name, content, match):
    from groupnorm.errors import DataError
    _fashion_variant(tmp_path, **{name: content})
    with pytest.raises(DataError, match=match):
        load_data(Config(data_dir=str(tmp_path), workers=1, images_per_worker=4))


def test_too_small_a_subset_is_a_config_error(tmp_path):
    from groupnorm.errors import ConfigError
    fake_fashion(tmp_path)
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        load_data(Config(data_dir=str(tmp_path), workers=8, images_per_worker=8))
