"""Datasets as in-memory tensors in [0, 1] plus metadata.

Every dataset is a small class with `available(root)` and `load(root, download) -> DataBundle`; the YAML in
conf/dataset/ names the class (`_target_`) and its metadata. Data stay on the CPU; batches move to the device.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from robust_cli.core.errors import UserError


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
    test_index: torch.Tensor | None = None  # each test example's index in the dataset's test split (data.n_test subsets)


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
    except zlib.error as exc:  # the full length, but bytes changed inside the compressed stream
        raise UserError(f"'{path}' is corrupt (its compressed data does not decode: {exc}): {fix}") from None
    except (EOFError, OSError, gzip.BadGzipFile) as exc:  # BadGzipFile: also a failed CRC check
        raise UserError(f"'{path}' cannot be read ({exc}); it is truncated, corrupt or not gzip: {fix}") from None
    if len(data) < 4:
        raise UserError(f"'{path}' has {len(data)} bytes, not an IDX file: {fix}")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0:  # the IDX magic number starts with two zero bytes
        raise UserError(f"'{path}' does not start with an IDX magic number (0x0000{dtype_code:02x}{ndim:02x} expected, got 0x{data[:4].hex()}): {fix}")
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
            except Exception as exc:  # noqa: BLE001 - no network on a compute node is a user situation, not a bug
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
        except Exception as exc:  # noqa: BLE001 - torchvision's many failure types all mean: not loadable from this root
            raise UserError(f"{self.meta.name}: could not load from '{root}' ({exc}); set data.root/data.download") from None
        to_x = lambda d: torch.from_numpy(d.data).permute(0, 3, 1, 2).float().div_(255.0)
        return to_x(train), torch.tensor(train.targets), to_x(test), torch.tensor(test.targets)


# ----------------------------------------------------------------------------------------------- image folders
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


class _Decode(torch.utils.data.Dataset):
    """Decode, resize (shorter side to `resize`), centre-crop (`size`) and scale to [0, 1], one image per item: run
    in DataLoader workers, so decoding is parallel and overlaps the model's work."""

    def __init__(self, paths, resize, size):
        self.paths, self.resize, self.size = list(paths), int(resize), int(size)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image
        from torchvision.transforms import functional as TF

        with Image.open(self.paths[i]) as img:
            img = img.convert("RGB")
            img = TF.center_crop(TF.resize(img, self.resize, antialias=True), [self.size, self.size])
            return TF.pil_to_tensor(img).float().div_(255.0)


class ImageFiles:
    """Images on disk with their labels, decoded only when needed: `decode()` gives one in-memory tensor; training
    on a set too large for memory streams it (`iterate_batches`) through a DataLoader with workers."""

    def __init__(self, paths, labels, resize, size, workers=4):
        self.paths, self.labels = list(paths), torch.as_tensor(labels, dtype=torch.long)
        self.resize, self.size, self.workers = int(resize), int(size), int(workers)

    def __len__(self):
        return len(self.paths)

    @property
    def shape(self):
        return (len(self.paths), 3, self.size, self.size)

    def nbytes(self) -> int:
        return len(self.paths) * 3 * self.size * self.size * 4

    def subset(self, idx) -> ImageFiles:
        idx = [int(i) for i in (idx.tolist() if isinstance(idx, torch.Tensor) else idx)]
        return ImageFiles([self.paths[i] for i in idx], self.labels[idx], self.resize, self.size, self.workers)

    def loader(self, batch_size, order=None, pin_memory=False):
        return torch.utils.data.DataLoader(
            _Decode(self.paths, self.resize, self.size),
            batch_size=batch_size,
            sampler=order.tolist() if order is not None else None,
            num_workers=self.workers,
            pin_memory=pin_memory,
            prefetch_factor=4 if self.workers > 0 else None,
            persistent_workers=False,
        )

    def decode(self) -> torch.Tensor:
        if not self.paths:
            return torch.zeros(0, 3, self.size, self.size)
        try:
            return torch.cat(list(self.loader(64)))
        except (OSError, ValueError) as exc:  # PIL: not an image, truncated file
            raise UserError(f"an image cannot be decoded ({exc}); remove or replace it") from None


def _images_in(folder: Path):
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


class ImageFolder(Dataset):
    """Class folders as torchvision's ImageFolder reads them: `root/<split>/<class>/<image>`, classes in sorted
    folder order (their index is the label). Images are resized (shorter side to `resize`) and centre-cropped to
    `image_size`. `classes`: keep only these classes' images (names or indices); labels keep their indices."""

    def __init__(
        self,
        root,
        train_folder="train",
        test_folder="val",
        image_size=224,
        resize=256,
        classes=None,
        workers=4,
        name="imagefolder",
        num_classes=None,
        class_names=None,
        shape=None,
        **meta,
    ):
        self.root, self.train_folder, self.test_folder = Path(str(root)), str(train_folder), str(test_folder)
        self.image_size, self.resize, self.workers = int(image_size), int(resize), int(workers)
        if self.resize < self.image_size:
            raise UserError(f"dataset.resize ({self.resize}) must be at least dataset.image_size ({self.image_size}): the crop is taken from the resized image")
        names = list(class_names) if class_names else self._class_names()
        self.keep = classes
        super().__init__(name=name, shape=(3, self.image_size, self.image_size), num_classes=int(num_classes or len(names) or 1), class_names=names, **meta)

    def _split_dir(self, split):
        return self.root / (self.train_folder if split == "train" else self.test_folder)

    def _class_names(self):
        for split in ("test", "train"):
            folder = self._split_dir(split)
            if folder.is_dir():
                dirs = sorted(p.name for p in folder.iterdir() if p.is_dir())
                if dirs:
                    return dirs
        return []

    def check_available(self, root, download):
        test = self._split_dir("test")
        if not test.is_dir():
            raise UserError(
                f"{self.meta.name}: '{test}' not found; data.root must hold {self.test_folder}/<class>/<image> "
                f"(and {self.train_folder}/ to train), or set dataset.test_folder / dataset.train_folder"
            )

    def _keep_indices(self):
        if self.keep is None:
            return None
        out = set()
        for c in self.keep:
            if isinstance(c, int) or (isinstance(c, str) and c.isdigit()):
                out.add(int(c))
            elif c in self.meta.class_names:
                out.add(self.meta.class_names.index(c))
            else:
                raise UserError(f"dataset.classes: no class {c!r} (the classes are the folder names or their indices 0..{self.meta.num_classes - 1})")
        return out

    def _files(self, split):
        folder = self._split_dir(split)
        if not folder.is_dir():
            return [], []
        index = {n: i for i, n in enumerate(self.meta.class_names)}
        paths, labels = [], []
        for d in sorted(p for p in folder.iterdir() if p.is_dir()):
            if d.name not in index:
                raise UserError(f"'{d}' is a class folder that {self.test_folder}/ does not have: both splits need the same classes")
            for f in _images_in(d):
                paths.append(f)
                labels.append(index[d.name])
        return paths, labels

    def _restricted(self, paths, labels):
        keep = self._keep_indices()
        if keep is None:
            return paths, labels
        chosen = [(path, label) for path, label in zip(paths, labels) if label in keep]
        return [path for path, _ in chosen], [label for _, label in chosen]

    def load(self, root, download) -> DataBundle:
        self.check_available(root, download)
        test = self._restricted(*self._files("test"))
        if not test[0]:
            raise UserError(
                f"{self.meta.name}: no images ({', '.join(IMAGE_EXTENSIONS)}) in '{self._split_dir('test')}'" + (" of the chosen classes" if self.keep else "")
            )
        train = ImageFiles(*self._restricted(*self._files("train")), self.resize, self.image_size, self.workers)
        test = ImageFiles(*test, self.resize, self.image_size, self.workers)
        return DataBundle(train, train.labels, test, test.labels, self.meta)


class ImageNetVal(ImageFolder):
    """ImageNet (ILSVRC 2012 classes, 1000, in sorted-wnid order as torchvision's pretrained models number them).

    The validation images may be in class folders (`val/<wnid>/...`) or flat (`val/ILSVRC2012_val_*.JPEG`) with
    Kaggle's `LOC_val_solution.csv`, or a `val_labels.txt` of `<file> <index>` lines, in data.root. The wnid order
    comes from `LOC_synset_mapping.txt` in data.root, or from the folders when all 1000 are there."""

    def __init__(self, root, **kwargs):
        self._root = Path(str(root))
        super().__init__(root, **kwargs)

    def _wnids(self):
        mapping = self._root / "LOC_synset_mapping.txt"
        if mapping.is_file():
            return [line.split()[0] for line in mapping.read_text().splitlines() if line.strip()]
        folders = super()._class_names()
        return folders if len(folders) == 1000 else None

    def _class_names(self):
        wnids = self._wnids()
        if wnids is not None:
            return wnids
        try:  # the human names torchvision ships with its ImageNet weights, in the same order
            import torchvision

            return list(torchvision.models.AlexNet_Weights.IMAGENET1K_V1.meta["categories"])
        except Exception:  # noqa: BLE001
            return [str(i) for i in range(1000)]

    def _files(self, split):
        folder = self._split_dir(split)
        if not folder.is_dir():
            return [], []
        subdirs = [p for p in folder.iterdir() if p.is_dir()]
        if subdirs:  # class folders named by wnid
            wnids = self._wnids()
            if wnids is None:
                raise UserError(
                    f"{folder}: class folders, but no LOC_synset_mapping.txt in '{self._root}' and not all 1000 folders: "
                    "the wnid order (which index each class has) is unknown; copy LOC_synset_mapping.txt there"
                )
            index = {w: i for i, w in enumerate(wnids)}
            unknown = [d.name for d in subdirs if d.name not in index]
            if unknown:
                raise UserError(f"{folder}: folder {unknown[0]!r} is not an ImageNet wnid of LOC_synset_mapping.txt")
            pairs = [(f, index[d.name]) for d in sorted(subdirs) for f in _images_in(d)]
            return [path for path, _ in pairs], [label for _, label in pairs]
        images = _images_in(folder)
        labels = self._flat_labels(folder)
        missing = [f.name for f in images if f.stem not in labels and f.name not in labels]
        if missing:
            raise UserError(f"{folder}: no label for {missing[0]} (and {len(missing) - 1} more) in the labels file")
        return images, [labels.get(f.stem, labels.get(f.name)) for f in images]

    def _flat_labels(self, folder):
        solution = self._root / "LOC_val_solution.csv"
        if solution.is_file():
            wnids = self._wnids()
            if wnids is None:
                raise UserError(f"'{solution}' names wnids: LOC_synset_mapping.txt must be in '{self._root}' too")
            index = {w: i for i, w in enumerate(wnids)}
            out = {}
            for line in solution.read_text().splitlines()[1:]:
                if line.strip():
                    image, prediction = line.split(",", 1)
                    out[image.strip()] = index[prediction.split()[0]]
            return out
        for name in ("val_labels.txt", "val.txt"):
            path = self._root / name
            if path.is_file():
                out = {}
                for line in path.read_text().splitlines():
                    parts = line.split()
                    if len(parts) >= 2:
                        out[parts[0]] = int(parts[1])
                return out
        raise UserError(
            f"{folder}: flat validation images need labels: LOC_val_solution.csv (+ LOC_synset_mapping.txt) or val_labels.txt "
            f"('<file> <class index>' lines) in '{self._root}'"
        )
