"""Datasets as in-memory tensors in [0, 1] plus metadata.

Every dataset is a small class with `available(root)` and `load(root, download) -> DataBundle`; the YAML in
conf/dataset/ names the class (`_target_`) and its metadata. Data stay on the CPU; batches move to the device.
"""
from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from robust_cli.errors import UserError


@dataclass(frozen=True)
class DatasetMeta:
    name: str
    shape: tuple
    num_classes: int
    class_names: list = field(default_factory=list)
    mean: tuple | None = None  # per-channel normalisation applied inside the model
    std: tuple | None = None


@dataclass
class DataBundle:
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    meta: DatasetMeta
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None


class Dataset:
    """Base: metadata from the YAML; subclasses implement `_load(root, download)`."""

    def __init__(self, name, shape, num_classes, class_names=None, mean=None, std=None, augment="none"):
        self.default_augment = str(augment)  # what data.augment=auto trains with
        names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.meta = DatasetMeta(
            name=name,
            shape=tuple(int(s) for s in shape),
            num_classes=int(num_classes),
            class_names=names,
            mean=tuple(mean) if mean is not None else None,
            std=tuple(std) if std is not None else None,
        )

    def check_available(self, root: str, download: bool) -> None:
        """Raise UserError before any work when the data cannot be had offline."""

    def _load(self, root: str, download: bool):
        raise NotImplementedError

    def load(self, root: str, download: bool) -> DataBundle:
        self.check_available(root, download)
        train_x, train_y, test_x, test_y = self._load(root, download)
        return DataBundle(train_x.float().contiguous(), train_y.long(), test_x.float().contiguous(), test_y.long(), self.meta)


class Digits(Dataset):
    """scikit-learn's bundled 8x8 digits (1797 images), a fixed stratified 75/25 split (split seed 0).

    The split does not depend on the run's seed, so runs with different seeds are scored on the same test set.
    """

    def _load(self, root, download):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
        y = torch.tensor(digits.target, dtype=torch.int64)
        idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=0.25, stratify=digits.target, random_state=0)
        return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


class Gaussians2D(Dataset):
    """Bell's 2-D set (section 15): one isotropic Gaussian per class; points are not confined to [0, 1]."""

    def __init__(self, means, sigma=1.0, n_train_per_class=2000, n_test_per_class=500, **meta):
        super().__init__(**meta)
        self.means = torch.tensor(means, dtype=torch.float32)
        self.sigma = float(sigma)
        self.n_train = int(n_train_per_class)
        self.n_test = int(n_test_per_class)

    def _sample(self, n, gen):
        k = len(self.means)
        y = torch.arange(k).repeat_interleave(n)
        x = self.means[y] + self.sigma * torch.randn(len(y), self.means.shape[1], generator=gen)
        return x, y

    def _load(self, root, download):
        gen = torch.Generator().manual_seed(0)  # the dataset is fixed; the run's seed picks subsets only
        return (*self._sample(self.n_train, gen), *self._sample(self.n_test, gen))


def _read_idx(path: Path) -> np.ndarray:
    """One IDX file (gzipped or not); a truncated or foreign file is a one-line error naming it."""
    fix = "delete it and copy (or download) the file again"
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            data = f.read()
    except (EOFError, OSError, gzip.BadGzipFile) as exc:
        raise UserError(f"'{path}' cannot be read ({exc}); it is truncated or not gzip: {fix}") from None
    if len(data) < 4:
        raise UserError(f"'{path}' has {len(data)} bytes, not an IDX file: {fix}")
    _, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim]) if len(data) >= 4 + 4 * ndim else None
    if dtype_code != 0x08 or dims is None or len(data) - 4 - 4 * ndim != int(np.prod(dims)):
        raise UserError(f"'{path}' is not a complete IDX file of bytes (header says {dims}, {len(data)} bytes found): {fix}")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


class IdxImages(Dataset):
    """MNIST and Fashion-MNIST from the four standard IDX files.

    Looked for directly in `root`, or in torchvision's layout `root/<Folder>/raw/`, gzipped or not.
    With `download=true` and no files, torchvision downloads them into its layout.
    """

    FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

    def __init__(self, torchvision_class, folder, **meta):
        super().__init__(**meta)
        self.torchvision_class = torchvision_class
        self.folder = folder

    def _find(self, root):
        for base in (Path(root), Path(root) / self.folder / "raw"):
            found = []
            for name in self.FILES:
                hits = [base / (name + ext) for ext in (".gz", "") if (base / (name + ext)).is_file()]
                if not hits:
                    break
                found.append(hits[0])
            else:
                return found
        return None

    def check_available(self, root, download):
        if self._find(root) is None and not download:
            raise UserError(
                f"{self.meta.name}: files not found in '{root}' (expected {', '.join(f + '.gz' for f in self.FILES)} "
                f"there or under {self.folder}/raw/); set data.root to that folder or data.download=true"
            )

    def _load(self, root, download):
        files = self._find(root)
        if files is None:
            import torchvision

            try:
                getattr(torchvision.datasets, self.torchvision_class)(root, train=True, download=True)
            except Exception as exc:  # no network on a compute node is a user situation, not a bug
                raise UserError(f"{self.meta.name}: download into '{root}' failed ({exc}); copy the 4 IDX files there and set data.download=false") from None
            files = self._find(root)
        arrays = [_read_idx(p) for p in files]
        to_x = lambda a: torch.from_numpy(a.copy()).float().div_(255.0).unsqueeze(1)
        to_y = lambda a: torch.from_numpy(a.astype(np.int64))
        return to_x(arrays[0]), to_y(arrays[1]), to_x(arrays[2]), to_y(arrays[3])


class Cifar(Dataset):
    """CIFAR-10/100 through torchvision (python pickle batches in `root`)."""

    def __init__(self, torchvision_class, folder, **meta):
        super().__init__(**meta)
        self.torchvision_class = torchvision_class
        self.folder = folder

    def check_available(self, root, download):
        if not (Path(root) / self.folder).is_dir() and not download:
            raise UserError(
                f"{self.meta.name}: '{Path(root) / self.folder}' not found (torchvision's extracted python batches); "
                "set data.root to the folder that holds it or data.download=true"
            )

    def _load(self, root, download):
        import torchvision

        cls = getattr(torchvision.datasets, self.torchvision_class)
        try:
            train, test = cls(root, train=True, download=download), cls(root, train=False, download=download)
        except Exception as exc:
            raise UserError(f"{self.meta.name}: could not load from '{root}' ({exc}); set data.root/data.download") from None
        to_x = lambda d: torch.from_numpy(d.data).permute(0, 3, 1, 2).float().div_(255.0)
        return to_x(train), torch.tensor(train.targets), to_x(test), torch.tensor(test.targets)


def stratified_subset(y: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices of a seeded subset of size n whose class proportions match y's (largest remainder)."""
    if n >= len(y):
        return torch.arange(len(y))
    gen = torch.Generator().manual_seed(seed)
    classes, counts = torch.unique(y, return_counts=True)
    quota = counts.double() * n / len(y)
    take = quota.floor().long()
    take[torch.argsort(quota - take, descending=True)[: n - int(take.sum())]] += 1
    picked = []
    for c, k in zip(classes, take):
        members = torch.nonzero(y == c).flatten()
        picked.append(members[torch.randperm(len(members), generator=gen)[:k]])
    return torch.sort(torch.cat(picked)).values


def build_dataset(cfg) -> Dataset:
    from hydra.utils import instantiate

    return instantiate(cfg.dataset)


def load_data(cfg) -> DataBundle:
    """The dataset of a composed config, with the `data.n_train/n_test/val_fraction` subsets applied."""
    bundle = build_dataset(cfg).load(str(cfg.data.root), bool(cfg.data.download))
    seed = int(cfg.seed)
    if cfg.data.n_train is not None:
        idx = stratified_subset(bundle.train_y, int(cfg.data.n_train), seed)
        bundle.train_x, bundle.train_y = bundle.train_x[idx], bundle.train_y[idx]
    if cfg.data.n_test is not None:
        idx = stratified_subset(bundle.test_y, int(cfg.data.n_test), seed + 1)
        bundle.test_x, bundle.test_y = bundle.test_x[idx], bundle.test_y[idx]
    fraction = float(cfg.data.val_fraction)
    if fraction > 0:
        n_val = max(1, int(round(fraction * len(bundle.train_y))))
        val = stratified_subset(bundle.train_y, n_val, seed + 2)
        keep = torch.ones(len(bundle.train_y), dtype=torch.bool)
        keep[val] = False
        bundle.val_x, bundle.val_y = bundle.train_x[val], bundle.train_y[val]
        bundle.train_x, bundle.train_y = bundle.train_x[keep], bundle.train_y[keep]
    return bundle


AUGMENTS = ("none", "crop_flip")


def resolve_augment(cfg, dataset=None) -> str:
    """data.augment, with auto = the dataset's default (crop_flip for CIFAR, none elsewhere)."""
    value = str(cfg.data.get("augment", "none"))
    if value == "auto":
        value = (dataset or build_dataset(cfg)).default_augment
    if value not in AUGMENTS:
        raise UserError(f"data.augment must be auto, {' or '.join(AUGMENTS)}, got {value!r}")
    return value


def check_augment(augment: str, shape) -> None:
    if augment == "crop_flip" and len(shape) != 3:
        raise UserError(f"data.augment=crop_flip needs images (C, H, W); this dataset has shape {tuple(shape)}: set data.augment=none")


def crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop of the zero-padded image (torchvision's RandomCrop(size, padding)) and a horizontal flip with
    probability 1/2, per image, as one gather on x's device. The draws come from `generator` on the CPU, so the
    same seed gives the same batches on every device."""
    b, _, h, w = x.shape
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    rows = dy[:, None] + torch.arange(h, device=x.device)  # (B, H) rows of the padded image
    cols = torch.arange(w, device=x.device).expand(b, w)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + dx[:, None]  # a flip reads the crop's columns backwards
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def place_on_device(bundle: DataBundle, device: torch.device, fraction: float = 0.5) -> bool:
    """Move the bundle's tensors to a CUDA device once when they take less than `fraction` of its free memory
    (MNIST, CIFAR): batches are then index gathers there. Returns whether they moved."""
    if device.type != "cuda":
        return False
    tensors = [t for t in (bundle.train_x, bundle.train_y, bundle.test_x, bundle.test_y, bundle.val_x, bundle.val_y) if t is not None]
    free, _ = torch.cuda.mem_get_info(device)
    if sum(t.numel() * t.element_size() for t in tensors) > fraction * free:
        return False
    for name in ("train_x", "train_y", "test_x", "test_y", "val_x", "val_y"):
        value = getattr(bundle, name)
        if value is not None:
            setattr(bundle, name, value.to(device))
    return True


def iterate_batches(x, y, batch_size, device=None, generator=None):
    """Yield (xb, yb) on `device`; shuffled when a generator is given (epoch order is then seeded, drawn on the CPU
    whatever the device, so that it is the same everywhere)."""
    n = len(y)
    order = torch.randperm(n, generator=generator).to(x.device) if generator is not None else None
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size] if order is not None else slice(start, start + batch_size)
        xb, yb = x[idx], y[idx]
        if device is not None:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        yield xb, yb
