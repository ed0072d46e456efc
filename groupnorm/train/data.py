"""Datasets for training: Fashion-MNIST, CIFAR-10/100 (in memory) and ImageNet-style folders (streamed).

The small datasets live in memory as uint8 tensors (M, C, H, W) -- on the training device when it is a
GPU -- and are augmented a whole batch at a time with tensor ops, so the CPU is spent on the model,
not on a per-image loader:
  * random crop with zero padding (2 pixels for 28x28 Fashion-MNIST, 4 for 32x32 CIFAR, as is usual);
  * horizontal flip with probability 1/2. Flips are also used for Fashion-MNIST: a mirrored shirt,
    bag or sneaker is still the same class (the ten classes are mirror-symmetric in meaning).
Images are then normalized per channel with the dataset's mean and std (computed on its train set).

Data order is a pure function of (seed, epoch): every epoch draws its permutation, crop offsets and
flips from its own generator. So a resumed run sees exactly the batches an uninterrupted run would,
and worker r of W (simulated or torchrun) takes images [r*N, (r+1)*N) of the same global batch of W*N.
The last incomplete global batch of an epoch is dropped, so every worker always has exactly N images.
"""
from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from groupnorm.errors import ConfigError, DataError, DatasetNotFoundError

from . import safe_pickle

FASHION_DIR = "/usr/share/datasets/fashion-mnist"

# Per-channel mean and std of each train set (pixel values in [0, 1]); ImageNet's for image folders.
STATS = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
PADDING = {"fashion-mnist": 2, "cifar10": 4, "cifar100": 4}


# ---- deterministic randomness and subsets -----------------------------------------------------------
def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, epoch, stream): data order survives a restart."""
    words = np.random.SeedSequence([seed, epoch, stream]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed((int(words[0]) << 31) ^ int(words[1]))


def subset_indices(labels: torch.Tensor, n: int | None, seed: int) -> torch.Tensor:
    """``n`` indices (sorted) spread as evenly as possible over the classes, chosen at random with ``seed``.

    Shuffle, then rank each image within its class (0 for the first image of its class in shuffled
    order, 1 for the second, ...), then keep the ``n`` smallest ranks: a round robin over classes,
    which also copes with classes that run out of images.
    """
    m = len(labels)
    if n is None or n >= m:
        return torch.arange(m)
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(seed))
    shuffled = labels[perm]
    rank = torch.empty(m, dtype=torch.long)
    for c in torch.unique(shuffled):
        where = (shuffled == c).nonzero().flatten()
        rank[where] = torch.arange(len(where))
    order = torch.sort(rank * (int(labels.max()) + 1) + shuffled, stable=True).indices
    return torch.sort(perm[order[:n]]).values


def shard(n: int, rank: int, world: int) -> range:
    """Contiguous part ``rank`` of ``world`` near-equal parts of range(n) (for evaluation)."""
    bounds = [n * r // world for r in range(world + 1)]
    return range(bounds[rank], bounds[rank + 1])


def crop_flip(images: torch.Tensor, pad: int, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor
              ) -> torch.Tensor:
    """Batch augmentation: image b is zero-padded by ``pad``, cropped back to (H, W) at offset
    (dy[b], dx[b]) in [0, 2*pad], and mirrored left-right where flip[b]. images: (B, C, H, W)."""
    B, C, H, W = images.shape
    dev = images.device
    padded = F.pad(images, (pad, pad, pad, pad)) if pad else images
    rows = dy.to(dev)[:, None] + torch.arange(H, device=dev)
    cols = dx.to(dev)[:, None] + torch.arange(W, device=dev)
    cols = torch.where(flip.to(dev)[:, None], cols.flip(1), cols)
    b = torch.arange(B, device=dev)[:, None, None, None]
    c = torch.arange(C, device=dev)[None, :, None, None]
    return padded[b, c, rows[:, None, :, None], cols[:, None, None, :]]


# ---- in-memory datasets ---------------------------------------------------------------------------
class TensorData:
    """A dataset held as uint8 images (M, C, H, W) and int64 labels (M,), batched with tensor ops."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std, pad: int, num_classes: int):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (M, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels.long()
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)
        self.pad, self.num_classes = pad, num_classes

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def subset(self, n: int | None, seed: int) -> "TensorData":
        idx = subset_indices(self.labels.cpu(), n, seed).to(self.labels.device)
        return TensorData(self.images[idx], self.labels[idx], self.mean.tolist(), self.std.tolist(),
                          self.pad, self.num_classes)

    def to(self, device) -> "TensorData":
        self.images, self.labels = self.images.to(device), self.labels.to(device)
        return self

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float32 (x / 255 - mean) / std."""
        scale = (1.0 / (255.0 * self.std)).to(images.device)[:, None, None]
        shift = (self.mean / self.std).to(images.device)[:, None, None]
        return images.float().mul_(scale).sub_(shift)

    def steps(self, global_batch: int) -> int:
        return len(self) // global_batch

    def train_batches(self, epoch: int, seed: int, global_batch: int, rank: int = 0, world: int = 1,
                      augment: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's part (global_batch // world images) of each global batch of the epoch."""
        g = epoch_generator(seed, epoch)
        perm = torch.randperm(len(self), generator=g)
        steps, per = self.steps(global_batch), global_batch // world
        # Drawn for every position of the epoch's order, whatever the batch: every rank sees the images
        # simulated workers would, and runs of one seed get the same crops and flips at any batch size.
        shape = (len(self),)
        dy = torch.randint(0, 2 * self.pad + 1, shape, generator=g)
        dx = torch.randint(0, 2 * self.pad + 1, shape, generator=g)
        flip = torch.rand(shape, generator=g) < 0.5
        for s in range(steps):
            part = slice(s * global_batch + rank * per, s * global_batch + (rank + 1) * per)
            idx = perm[part].to(self.labels.device)
            images = self.images[idx]
            if augment:
                images = crop_flip(images, self.pad, dy[part], dx[part], flip[part])
            yield self.normalize(images), self.labels[idx]

    def eval_batches(self, batch_size: int, rank: int = 0, world: int = 1):
        part = shard(len(self), rank, world)
        for start in range(part.start, part.stop, batch_size):
            stop = min(start + batch_size, part.stop)
            yield self.normalize(self.images[start:stop]), self.labels[start:stop]


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (the MNIST format, gzipped or not) as a uint8 array of its stated shape; DataError
    naming the file when it is not one (bad gzip stream, wrong magic, wrong length)."""
    path = Path(path)
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            data = f.read()
    except (OSError, EOFError, ValueError) as exc:  # gzip.BadGzipFile, a cut stream, zlib.error
        raise DataError(f"{path} cannot be read ({type(exc).__name__}: {exc}); the file is corrupt: "
                        f"download it again") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes (magic {data[:4].hex()})")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    body = data[4 + 4 * ndim:]
    if len(data) < 4 + 4 * ndim or len(body) != int(np.prod(dims)):
        raise DataError(f"{path} is truncated or corrupt: header says {dims} = {int(np.prod(dims))} bytes, "
                        f"found {len(body)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims).copy()


def check_labels(labels: np.ndarray, classes: int, where) -> np.ndarray:
    """labels as int64 (M,), all in [0, classes); DataError naming ``where`` otherwise (found now,
    not as an index error in the middle of training)."""
    if labels.ndim != 1:
        raise DataError(f"{where}: expected labels of shape (M,), got shape {labels.shape}")
    labels = labels.astype(np.int64)
    bad = (labels < 0) | (labels >= classes)
    if bad.any():
        raise DataError(f"{where}: {int(bad.sum())} labels out of range [0, {classes}), e.g. "
                        f"{int(labels[bad][0])} at index {int(np.flatnonzero(bad)[0])}")
    return labels


def _find(names: list[str], dirs: list[Path]) -> Path | None:
    for d in dirs:
        for name in names:
            if (d / name).is_file():
                return d / name
    return None


@functools.lru_cache(maxsize=4)
def _fashion_arrays(root: str):
    dirs = [Path(root), Path(root) / "fashion-mnist", Path(root) / "FashionMNIST" / "raw"]
    out = {}
    for split, prefix in (("train", "train"), ("val", "t10k")):
        paths = []
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
            stem = f"{prefix}-{kind}"
            path = _find([stem + ".gz", stem], dirs)
            if path is None:
                return None
            paths.append(path)
        images, labels = read_idx(paths[0]), check_labels(read_idx(paths[1]), 10, paths[1])
        if images.ndim != 3:
            raise DataError(f"{paths[0]}: expected images of shape (M, H, W), got shape {images.shape}")
        if len(images) != len(labels):
            raise DataError(f"{paths[0]} has {len(images)} images but {paths[1]} has {len(labels)} labels")
        out[split] = (images[:, None], labels)
    return out


def load_fashion_mnist(data_dir: str | None) -> tuple[TensorData, TensorData]:
    """Fashion-MNIST (60000 train / 10000 test images, 1x28x28, 10 classes) from its four IDX files."""
    root = data_dir or FASHION_DIR
    arrays = _fashion_arrays(str(root))
    if arrays is None:
        raise DatasetNotFoundError(
            f"Fashion-MNIST not found in {root} (looked for train-images-idx3-ubyte.gz, "
            f"train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz, gzipped or "
            f"not, there and in its fashion-mnist/ and FashionMNIST/raw/ subfolders). Install it with "
            f"`sudo apt-get install dataset-fashion-mnist` (files go to {FASHION_DIR}), or point to a folder "
            f"holding the IDX files with --data-dir DIR (data_dir=DIR).")
    mean, std = STATS["fashion-mnist"]
    return tuple(TensorData(torch.from_numpy(x), torch.from_numpy(y), mean, std,
                            PADDING["fashion-mnist"], 10) for x, y in (arrays["train"], arrays["val"]))


@functools.lru_cache(maxsize=2)
def _cifar_arrays(root: str, name: str):
    sub, train_files, test_files, key = (
        ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels")
        if name == "cifar10" else ("cifar-100-python", ["train"], ["test"], b"fine_labels"))
    base = next((d for d in (Path(root), Path(root) / sub)
                 if all((d / f).is_file() for f in train_files + test_files)), None)
    if base is None:
        return None
    classes = 10 if name == "cifar10" else 100
    out = {}
    for split, files in (("train", train_files), ("val", test_files)):
        xs, ys = [], []
        for f in files:
            x, y = read_cifar_batch(base / f, key, classes)
            xs.append(x)
            ys.append(y)
        out[split] = (np.concatenate(xs), np.concatenate(ys))
    return out


def read_cifar_batch(path: Path, key: bytes, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch: images uint8 (M, 3, 32, 32) and labels int64 (M,) in [0, classes).
    Read with ``safe_pickle`` (no code in the file runs); DataError naming the file when it is not
    a batch of the format."""
    try:
        batch = safe_pickle.load(path.read_bytes())
    except Exception as exc:  # whatever a malformed or hostile pickle makes the reader raise
        lines = str(exc).strip().splitlines()
        raise DataError(f"{path} cannot be read as a CIFAR batch ({type(exc).__name__}: "
                        f"{lines[0][:300] if lines else 'no message'})") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path} is not a CIFAR batch (a pickled dict), got {type(batch).__name__}")
    for k in (b"data", key):
        if k not in batch:
            raise DataError(f"{path} has no {k!r} entry; is it a CIFAR-{classes} batch?")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: {b'data'!r} must be a uint8 array of shape (M, 3072), got "
                        f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
    try:
        labels = np.asarray(batch[key])
    except (TypeError, ValueError):
        labels = np.asarray([])
    if labels.dtype.kind not in "iu":
        raise DataError(f"{path}: {key!r} must be a list of integers")
    labels = check_labels(labels, classes, path)
    if len(labels) != len(data):
        raise DataError(f"{path} has {len(data)} images but {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar(name: str, data_dir: str | None) -> tuple[TensorData, TensorData]:
    """CIFAR-10 or CIFAR-100 (50000 train / 10000 test, 3x32x32) from torchvision's python pickles."""
    sub, archive = (("cifar-10-batches-py", "cifar-10-python.tar.gz") if name == "cifar10"
                    else ("cifar-100-python", "cifar-100-python.tar.gz"))
    arrays = _cifar_arrays(str(data_dir), name) if data_dir else None
    if arrays is None:
        where = f"in {data_dir} or {data_dir}/{sub}" if data_dir else "(no data_dir given)"
        raise DatasetNotFoundError(
            f"{name} not found {where}. Download {archive} from https://www.cs.toronto.edu/~kriz/cifar.html "
            f"(or let torchvision.datasets.{'CIFAR10' if name == 'cifar10' else 'CIFAR100'}(root, "
            f"download=True) fetch it), extract it, and pass --data-dir DIR (data_dir=DIR) with DIR the "
            f"folder that holds {sub}/.")
    mean, std = STATS[name]
    classes = 10 if name == "cifar10" else 100
    return tuple(TensorData(torch.from_numpy(x), torch.from_numpy(y), mean, std, PADDING[name], classes)
                 for x, y in (arrays["train"], arrays["val"]))


# ---- image folders (streamed) -----------------------------------------------------------------------
class FolderData:
    """An ImageNet-style folder (one subfolder per class) read by torchvision's ImageFolder and streamed
    through a DataLoader: random-resized crops + flips for training, resize + center crop for validation.
    The order of images is still a pure function of (seed, epoch); exact resume is guaranteed only for
    the in-memory datasets (the crops come from the loader processes' generators)."""

    def __init__(self, root: Path, train: bool, image_size: int, augment: bool, loader_workers: int):
        try:
            from torchvision import datasets, transforms
        except ModuleNotFoundError:
            raise ConfigError("dataset=imagefolder needs torchvision: pip install torchvision "
                              "(or pip install 'groupnorm[vision]')") from None
        mean, std = STATS["imagefolder"]
        if train and augment:
            steps = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
        else:
            steps = [transforms.Resize(round(image_size * 256 / 224)), transforms.CenterCrop(image_size)]
        tf = transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(mean, std)])
        self.dataset = datasets.ImageFolder(str(root), transform=tf)
        self.indices = torch.arange(len(self.dataset))
        self.labels = torch.tensor(self.dataset.targets)
        self.num_classes, self.channels = len(self.dataset.classes), 3
        self.loader_workers = loader_workers

    def __len__(self) -> int:
        return len(self.indices)

    def subset(self, n: int | None, seed: int) -> "FolderData":
        keep = subset_indices(self.labels[self.indices], n, seed)
        self.indices = self.indices[keep]
        return self

    def to(self, device) -> "FolderData":
        return self  # batches are moved by the engine

    def steps(self, global_batch: int) -> int:
        return len(self) // global_batch

    def _loader(self, batches: list[list[int]], seed: int):
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, num_workers=self.loader_workers,
                                           generator=torch.Generator().manual_seed(seed),
                                           pin_memory=torch.cuda.is_available())

    def train_batches(self, epoch, seed, global_batch, rank=0, world=1, augment=True):
        g = epoch_generator(seed, epoch)
        perm = self.indices[torch.randperm(len(self), generator=g)]
        per = global_batch // world
        batches = [perm[s * global_batch + rank * per:s * global_batch + (rank + 1) * per].tolist()
                   for s in range(self.steps(global_batch))]
        loader_seed = int(epoch_generator(seed, epoch, stream=1 + rank).initial_seed())
        return iter(self._loader(batches, loader_seed))

    def eval_batches(self, batch_size, rank=0, world=1):
        part = shard(len(self), rank, world)
        part = self.indices[part.start:part.stop].tolist()
        return iter(self._loader([part[i:i + batch_size] for i in range(0, len(part), batch_size)], 0))


def load_imagefolder(data_dir: str | None, image_size: int, augment: bool, loader_workers: int):
    root = Path(data_dir) if data_dir else None
    if root is None or not (root / "train").is_dir() or not (root / "val").is_dir():
        raise DatasetNotFoundError(
            f"dataset=imagefolder needs --data-dir DIR (data_dir=DIR) with DIR/train/<class>/*.jpeg and "
            f"DIR/val/<class>/*.jpeg (the ImageNet layout); got {data_dir!r}")
    return (FolderData(root / "train", True, image_size, augment, loader_workers),
            FolderData(root / "val", False, image_size, augment, loader_workers))


def load_data(cfg, device="cpu"):
    """(train, val) for a Config: the dataset, its subsets, on ``device`` when held in memory."""
    if cfg.dataset == "fashion-mnist":
        train, val = load_fashion_mnist(cfg.data_dir)
    elif cfg.dataset in ("cifar10", "cifar100"):
        train, val = load_cifar(cfg.dataset, cfg.data_dir)
    elif cfg.dataset == "imagefolder":
        train, val = load_imagefolder(cfg.data_dir, cfg.image_size, cfg.augment, cfg.loader_workers)
    else:
        raise ConfigError(f"unknown dataset {cfg.dataset!r}")
    train = train.subset(cfg.train_subset, cfg.subset_seed)
    val = val.subset(cfg.val_subset, cfg.subset_seed)
    if len(train) < cfg.global_batch:
        raise ConfigError(f"the training set has {len(train)} images, fewer than one global batch of "
                         f"workers * images_per_worker = {cfg.workers} * {cfg.images_per_worker} = "
                         f"{cfg.global_batch}; raise train_subset or lower the batch")
    return train.to(device), val.to(device)
