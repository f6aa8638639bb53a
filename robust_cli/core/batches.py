"""From a loaded dataset to the batches a loop sees: stratified subsets and the validation split, augmentation,
placement on the device, seeded batch order."""

import torch

from robust_cli.core.data import DataBundle, Dataset, ImageFiles
from robust_cli.core.errors import UserError


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


def load_data(
    dataset: Dataset,
    root: str,
    download: bool,
    seed: int,
    n_train: int | None = None,
    n_test: int | None = None,
    val_fraction: float = 0.0,
    memory_gb: float = 8.0,
) -> DataBundle:
    """The dataset's train/test split with the stratified, seeded subsets `n_train`, `n_test` and the held-out
    validation split `val_fraction` of the training set applied (seeds seed, seed + 1, seed + 2)."""
    bundle = dataset.load(str(root), bool(download))
    if n_train is not None and len(bundle.train_y):
        idx = stratified_subset(bundle.train_y, int(n_train), seed)
        bundle.train_x, bundle.train_y = _take(bundle.train_x, idx), bundle.train_y[idx]
    bundle.test_index = torch.arange(len(bundle.test_y))
    if n_test is not None:
        idx = stratified_subset(bundle.test_y, int(n_test), seed + 1)
        bundle.test_x, bundle.test_y, bundle.test_index = _take(bundle.test_x, idx), bundle.test_y[idx], idx
    fraction = float(val_fraction or 0.0)
    if fraction > 0:
        n_val = max(1, int(round(fraction * len(bundle.train_y))))
        val = stratified_subset(bundle.train_y, n_val, seed + 2)
        keep = torch.ones(len(bundle.train_y), dtype=torch.bool)
        keep[val] = False
        bundle.val_x, bundle.val_y = _take(bundle.train_x, val), bundle.train_y[val]
        bundle.train_x, bundle.train_y = _take(bundle.train_x, keep.nonzero().squeeze(1)), bundle.train_y[keep]
    return _decode(bundle, float(memory_gb))


def _take(x, idx):
    return x.subset(idx) if isinstance(x, ImageFiles) else x[idx]


def _decode(bundle: DataBundle, memory_gb: float) -> DataBundle:
    """Image files become tensors: always the test and validation sets (attacks need them in memory), the training
    set when it fits in data.memory_gb; a larger one stays on disk and streams through a DataLoader."""
    if isinstance(bundle.test_x, ImageFiles):
        bundle.test_x = bundle.test_x.decode()
    if isinstance(bundle.val_x, ImageFiles):
        bundle.val_x = bundle.val_x.decode()
    if isinstance(bundle.train_x, ImageFiles) and bundle.train_x.nbytes() <= memory_gb * 2**30:
        bundle.train_x = bundle.train_x.decode()
    return bundle


AUGMENTS = ("none", "crop_flip")


def resolve_augment(value: str, dataset_default=None) -> str:
    """data.augment, with auto = the dataset's default (crop_flip for CIFAR, none elsewhere). `dataset_default` is
    that default, or a function returning it (building a dataset is only worth it for auto)."""
    value = str(value)
    if value == "auto":
        value = dataset_default() if callable(dataset_default) else dataset_default
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
    tensors = [t for t in (bundle.train_x, bundle.train_y, bundle.test_x, bundle.test_y, bundle.val_x, bundle.val_y) if isinstance(t, torch.Tensor)]
    free, _ = torch.cuda.mem_get_info(device)
    if sum(t.numel() * t.element_size() for t in tensors) > fraction * free:
        return False
    for name in ("train_x", "train_y", "test_x", "test_y", "val_x", "val_y"):
        value = getattr(bundle, name)
        if isinstance(value, torch.Tensor):
            setattr(bundle, name, value.to(device))
    return True


def iterate_batches(x, y, batch_size, device=None, generator=None):
    """Yield (xb, yb) on `device`; shuffled when a generator is given (epoch order is then seeded, drawn on the CPU
    whatever the device, so that it is the same everywhere)."""
    n = len(y)
    if isinstance(x, ImageFiles):  # too large for memory: decoded by DataLoader workers, in the same seeded order
        order = torch.randperm(n, generator=generator) if generator is not None else None
        cuda = device is not None and torch.device(device).type == "cuda"
        labels = y[order] if order is not None else y
        for b, xb in enumerate(x.loader(batch_size, order, pin_memory=cuda)):
            yb = labels[b * batch_size : (b + 1) * batch_size]
            yield (xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)) if device is not None else (xb, yb)
        return
    order = torch.randperm(n, generator=generator).to(x.device) if generator is not None else None
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size] if order is not None else slice(start, start + batch_size)
        xb, yb = x[idx], y[idx]
        if device is not None:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        yield xb, yb
