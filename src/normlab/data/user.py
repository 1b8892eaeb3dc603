"""The user's own data: text files, token files, a Hugging Face ``datasets`` folder, image folders.

A source is a plain dict (it travels in a run's config, so every process and every resume
reads the same data), with ``kind`` one of :data:`SOURCE_KINDS`:

- ``{"kind": "text", "path": P}``: a UTF-8 text file, or a folder of them (every regular,
  non-hidden file under it, in sorted path order, concatenated); tokens are characters or
  bytes (the task's ``level``); the last ``val_fraction`` (default 0.1) validates.
- ``{"kind": "tokens", "path": D}``: nanoGPT's layout, ``D/train.bin`` and ``D/val.bin`` of
  ``uint16`` token ids (``dtype`` may say ``"uint32"``); the vocabulary size is ``vocab_size``
  if given, else ``vocab_size`` of nanoGPT's ``D/meta.pkl``, else the largest id + 1.
- ``{"kind": "hf_dataset", "path": D, "column": "text"}``: a folder written by
  ``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``: its ``train`` split trains and its
  ``validation``/``val``/``test`` split validates, else the last ``val_fraction`` of the tokens).
  A column of strings is tokenized like text; a column of integer lists is token ids.
- ``{"kind": "images", "path": D}``: an ImageFolder layout, ``D/<class>/<image>`` (PNG, JPEG,
  BMP, GIF, WebP), split by a fixed permutation (``test_fraction``, default 0.2), or
  ``D/train/<class>/...`` with ``D/test/`` (or ``D/val/``). Images are greyscale when every file
  is, else RGB; they must share one size unless ``size = [H, W]`` resizes them.

Every problem (a missing path, an empty or binary file, a token id beyond the vocabulary, an
unreadable image) is a ``ValueError`` that names the file and what was expected, raised when
the data are loaded: before any training, since the study runner loads every data set first.
"""

from __future__ import annotations

import functools
import io
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from normlab.data.images import ImageSet
from normlab.data.text import TextCorpus, tokenize

__all__ = [
    "IMAGE_SUFFIXES",
    "SOURCE_KINDS",
    "SOURCE_OPTIONS",
    "check_source",
    "check_text_file",
    "load_user_images",
    "load_user_text",
    "source_fingerprint",
    "source_label",
]

TEXT_KINDS = ("text", "tokens", "hf_dataset")
SOURCE_KINDS = (*TEXT_KINDS, "images")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
VAL_SPLITS = ("validation", "val", "test")
# the options each kind takes besides kind and path
SOURCE_OPTIONS: dict[str, tuple[str, ...]] = {
    "text": ("val_fraction",),
    "tokens": ("vocab_size", "dtype"),
    "hf_dataset": ("column", "val_fraction", "vocab_size"),
    "images": ("size", "test_fraction"),
}


def check_source(source: Mapping[str, Any], *, owner: str = "data") -> None:
    """Refuse a malformed source dict (its kind, its options and their types); the files are
    read later, by the loaders."""
    kind = source.get("kind")
    if kind not in SOURCE_KINDS:
        raise ValueError(f"{owner}: kind must be one of {SOURCE_KINDS}, got {kind!r}")
    if not isinstance(source.get("path"), str) or not source["path"]:
        raise ValueError(f"{owner}: a {kind} source needs a path, got {source.get('path')!r}")
    unknown = sorted(set(source) - {"kind", "path", *SOURCE_OPTIONS[kind]})
    if unknown:
        raise ValueError(f"{owner}: a {kind} source takes {list(SOURCE_OPTIONS[kind])}, not {unknown}")
    for name in ("val_fraction", "test_fraction"):
        if name in source and not (isinstance(source[name], float) and 0.0 < source[name] < 1.0):
            raise ValueError(f"{owner}: {name} must be a number in (0, 1), got {source[name]!r}")
    vocab = source.get("vocab_size")
    if vocab is not None and (isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1):
        raise ValueError(f"{owner}: vocab_size must be a positive int, got {vocab!r}")
    if "dtype" in source and source["dtype"] not in TOKEN_DTYPES:
        raise ValueError(f"{owner}: dtype must be one of {tuple(TOKEN_DTYPES)}, got {source['dtype']!r}")
    if "column" in source and not isinstance(source["column"], str):
        raise ValueError(f"{owner}: column must be a column name, got {source['column']!r}")
    size = source.get("size")
    if size is not None and not (
        isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)
    ):
        raise ValueError(f"{owner}: size must be [height, width] in pixels, got {size!r}")


def source_label(source: Mapping[str, Any]) -> str:
    """How reports name the data: ``"text /path/to/file.txt"``."""
    return f"{source['kind']} {source['path']}"


def _files_of(path: Path, *, owner: str, suffixes: tuple[str, ...] | None = None) -> list[Path]:
    if not path.exists():
        raise ValueError(f"{owner}: {str(path)!r} does not exist")
    if path.is_file():
        return [path]
    found = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
        and (suffixes is None or p.suffix.lower() in suffixes)
    )
    seen: set[Path] = set()
    files = []
    for p in found:  # a link to a file already read is not read twice
        if p.resolve() not in seen:
            seen.add(p.resolve())
            files.append(p)
    if not files:
        kinds = f" ({', '.join(suffixes)})" if suffixes else ""
        raise ValueError(f"{owner}: the folder {str(path)!r} holds no files{kinds}")
    return files


def source_fingerprint(source: Mapping[str, Any]) -> dict[str, Any]:
    """The files of ``source`` with their sizes and modification times: written into a study's
    plan, so that a resumed study can tell that its data changed."""
    path = Path(source["path"])
    files = _files_of(path, owner=f"data {source['kind']}") if path.exists() else []
    return {
        "files": len(files),
        "bytes": sum(p.stat().st_size for p in files),
        "latest_mtime_ns": max((p.stat().st_mtime_ns for p in files), default=0),
    }


def _read_utf8(path: Path, *, owner: str) -> str:
    raw = path.read_bytes()
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise ValueError(f"{owner}: {str(path)!r} is not text: a NUL byte at offset {nul} (a binary file?)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{owner}: {str(path)!r} is not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start} "
            '(convert it with iconv, or use level = "byte" on a file that is text in another encoding)'
        ) from None


def check_text_file(path: str | Path, *, owner: str) -> None:
    """Refuse a text file that cannot be a corpus, naming it: one that does not exist, is not
    a regular file, is empty (or only whitespace), holds a NUL byte or is not UTF-8."""
    file = Path(path).expanduser()
    if not file.exists():
        raise ValueError(
            f"{owner}: {str(path)!r} is neither a built-in corpus nor an existing file "
            "(give a built-in name or the path of a UTF-8 text file)"
        )
    if not file.is_file():
        raise ValueError(f"{owner}: {str(path)!r} is not a regular file (give a UTF-8 text file)")
    if not _read_utf8(file, owner=owner).strip():
        raise ValueError(f"{owner}: {str(path)!r} holds no text (empty or only whitespace)")


def _text_corpus(text: str, *, name: str, level: str, val_fraction: float, owner: str) -> TextCorpus:
    if not text.strip():
        raise ValueError(f"{owner}: {name!r} holds no text (empty or only whitespace)")
    if level not in ("char", "byte"):
        raise ValueError(f"{owner}: level must be 'char' or 'byte' for text, got {level!r}")
    return TextCorpus.from_text(text, name=name, level=level, val_fraction=val_fraction)  # type: ignore[arg-type]


def _check_ids(tokens: np.ndarray, vocab_size: int, *, where: str, why: str, owner: str) -> None:
    if len(tokens) and int(tokens.max()) >= vocab_size:
        raise ValueError(
            f"{owner}: {where} holds token id {int(tokens.max())}, outside the vocabulary of "
            f"{vocab_size} ids ({why})"
        )


class _MetaUnpickler(pickle.Unpickler):
    """nanoGPT's ``meta.pkl`` is a dict of ints, strings and dicts: nothing else is built."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"meta.pkl: refusing to load {module}.{name}")


def _meta_vocab(folder: Path, *, owner: str) -> int | None:
    meta = folder / "meta.pkl"
    if not meta.is_file():
        return None
    try:
        data = _MetaUnpickler(io.BytesIO(meta.read_bytes())).load()
    except Exception as e:
        raise ValueError(f"{owner}: {str(meta)!r} is not nanoGPT's meta.pkl ({e})") from None
    vocab = data.get("vocab_size") if isinstance(data, dict) else None
    return int(vocab) if isinstance(vocab, int) else None


def _token_files(source: Mapping[str, Any], *, owner: str) -> TextCorpus:
    folder = Path(source["path"])
    if not folder.is_dir():
        raise ValueError(f"{owner}: {str(folder)!r} is not a folder holding train.bin and val.bin")
    dtype = TOKEN_DTYPES[source.get("dtype", "uint16")]
    arrays = {}
    for split in ("train", "val"):
        path = folder / f"{split}.bin"
        if not path.is_file():
            raise ValueError(
                f"{owner}: {str(path)!r} does not exist (nanoGPT's layout: train.bin and val.bin)"
            )
        size = path.stat().st_size
        itemsize = np.dtype(dtype).itemsize
        if size == 0 or size % itemsize:
            raise ValueError(
                f"{owner}: {str(path)!r} has {size} bytes, not a whole number of {dtype.__name__} ids"
            )
        arrays[split] = np.memmap(path, dtype=dtype, mode="r")
    given, meta = source.get("vocab_size"), _meta_vocab(folder, owner=owner)
    if given is not None:
        vocab, why = int(given), "vocab_size of the data"
    elif meta is not None:
        vocab, why = meta, f"vocab_size of {folder / 'meta.pkl'}"
    else:
        vocab, why = max(int(a.max()) for a in arrays.values()) + 1, "the largest id + 1"
    for split, arr in arrays.items():
        _check_ids(arr, vocab, where=str(folder / f"{split}.bin"), why=why, owner=owner)
    return TextCorpus(str(folder), "tokens", (), arrays["train"], arrays["val"], token_vocab=vocab)


def _hf_dataset(source: Mapping[str, Any], *, level: str, owner: str) -> TextCorpus:
    folder = Path(source["path"])
    if not folder.is_dir():
        raise ValueError(f"{owner}: {str(folder)!r} is not a folder written by datasets' save_to_disk")
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"{owner}: reading {str(folder)!r} needs the 'datasets' package: pip install datasets"
        ) from None
    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as e:
        raise ValueError(f"{owner}: {str(folder)!r} is not a saved Hugging Face dataset ({e})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise ValueError(f"{owner}: {str(folder)!r} has splits {sorted(loaded)}, none named 'train'")
        val_name = next((s for s in VAL_SPLITS if s in loaded), None)
        parts = [loaded["train"]] + ([loaded[val_name]] if val_name else [])
    else:
        parts = [loaded]
    column = source.get("column", "text")
    if column not in parts[0].column_names:
        raise ValueError(
            f"{owner}: {str(folder)!r} has no column {column!r}; its columns: {parts[0].column_names}"
        )
    values = [list(p[column]) for p in parts]
    val_fraction = float(source.get("val_fraction", 0.1))
    first = next((v for part in values for v in part), None)
    if first is None:
        raise ValueError(f"{owner}: column {column!r} of {str(folder)!r} is empty")
    if isinstance(first, str):
        texts = ["\n".join(str(v) for v in part) + "\n" for part in values]
        if len(texts) == 1:
            return _text_corpus(
                texts[0], name=str(folder), level=level, val_fraction=val_fraction, owner=owner
            )
        if not "".join(texts).strip():
            raise ValueError(f"{owner}: column {column!r} of {str(folder)!r} holds no text")
        tokens, vocab = tokenize("".join(texts), level)  # type: ignore[arg-type]
        n_train = len(texts[0]) if level == "char" else len(texts[0].encode("utf-8"))
        return TextCorpus(str(folder), level, vocab, tokens[:n_train], tokens[n_train:])  # type: ignore[arg-type]
    if not isinstance(first, (list, tuple)):
        raise ValueError(
            f"{owner}: column {column!r} of {str(folder)!r} holds {type(first).__name__}; "
            "expected text or lists of token ids"
        )
    arrays = [np.asarray([t for row in part for t in row], dtype=np.int64) for part in values]
    if any(a.size and a.min() < 0 for a in arrays):
        raise ValueError(f"{owner}: column {column!r} of {str(folder)!r} holds negative token ids")
    given = source.get("vocab_size")
    vocab_size = int(given) if given is not None else max(int(a.max()) for a in arrays if a.size) + 1
    for a in arrays:
        _check_ids(
            a,
            vocab_size,
            where=f"column {column!r} of {str(folder)!r}",
            why="vocab_size of the data" if given is not None else "the largest id + 1",
            owner=owner,
        )
    dtype = np.uint16 if vocab_size <= 65536 else np.uint32
    if len(arrays) == 1:
        n_train = int(len(arrays[0]) * (1.0 - val_fraction))
        train, val = arrays[0][:n_train], arrays[0][n_train:]
    else:
        train, val = arrays
    return TextCorpus(
        str(folder), "tokens", (), train.astype(dtype), val.astype(dtype), token_vocab=vocab_size
    )


def load_user_text(source: Mapping[str, Any], *, level: str = "char") -> TextCorpus:
    """The tokens of a text, token-file or ``datasets`` source (see the module docstring)."""
    owner = f"data {source.get('kind')} {source.get('path')!r}"
    check_source(source, owner=owner)
    kind = source["kind"]
    if kind == "images":
        raise ValueError(f"{owner}: an image folder is data for an image model, not a language model")
    return _load_text_cached(tuple(sorted((k, _freeze(v)) for k, v in source.items())), level, _stamp(source))


def _freeze(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def _stamp(source: Mapping[str, Any]) -> tuple[Any, ...]:
    """What invalidates the in-process cache: the files' sizes and modification times."""
    path = Path(source["path"])
    if not path.exists():
        return ()
    return tuple(sorted(source_fingerprint(source).items()))


@functools.lru_cache(maxsize=4)
def _load_text_cached(items: tuple[tuple[str, Any], ...], level: str, stamp: tuple[Any, ...]) -> TextCorpus:
    source = dict(items)
    owner = f"data {source['kind']} {source['path']!r}"
    kind = source["kind"]
    if kind == "tokens":
        return _token_files(source, owner=owner)
    if kind == "hf_dataset":
        return _hf_dataset(source, level=level, owner=owner)
    path = Path(source["path"])
    files = _files_of(path, owner=owner)
    texts = []
    for f in files:
        text = _read_utf8(f, owner=owner)
        texts.append(text if text.endswith("\n") or not text else text + "\n")
    return _text_corpus(
        "".join(texts),
        name=str(path),
        level=level,
        val_fraction=float(source.get("val_fraction", 0.1)),
        owner=owner,
    )


def _class_folders(root: Path, *, owner: str) -> list[tuple[str, list[Path]]]:
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise ValueError(
            f"{owner}: {str(root)!r} needs one sub-folder per class (at least 2), found {len(classes)}"
        )
    out = []
    for c in classes:
        files = sorted(p for p in c.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(
                f"{owner}: class folder {str(c)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})"
            )
        out.append((c.name, files))
    return out


def _read_images(files: list[Path], *, size: tuple[int, int] | None, owner: str) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:
        raise ValueError(f"{owner}: image folders need Pillow: pip install pillow") from None
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                images.append(im.copy())
        except Exception as e:
            raise ValueError(f"{owner}: {str(f)!r} is not a readable image ({e})") from None
    grey = all(im.mode in ("1", "L", "LA", "I", "I;16", "F") for im in images)
    mode = "L" if grey else "RGB"
    arrays = []
    for f, im in zip(files, images, strict=True):
        im = im.convert(mode)
        if size is not None:
            im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        elif im.size != images[0].size:
            raise ValueError(
                f"{owner}: {str(f)!r} is {im.size[0]}x{im.size[1]} but {str(files[0])!r} is "
                f"{images[0].size[0]}x{images[0].size[1]}; set size = [height, width] to resize them all"
            )
        arrays.append(np.asarray(im, dtype=np.uint8))
    return np.stack(arrays)


def load_user_images(source: Mapping[str, Any]) -> ImageSet:
    """The images of an ImageFolder source (see the module docstring)."""
    owner = f"data images {source.get('path')!r}"
    check_source(source, owner=owner)
    if source["kind"] != "images":
        raise ValueError(
            f"{owner}: a {source['kind']} source is data for a language model, not an image model"
        )
    return _load_images_cached(tuple(sorted((k, _freeze(v)) for k, v in source.items())), _stamp(source))


@functools.lru_cache(maxsize=2)
def _load_images_cached(items: tuple[tuple[str, Any], ...], stamp: tuple[Any, ...]) -> ImageSet:
    source = dict(items)
    root = Path(source["path"])
    owner = f"data images {str(root)!r}"
    if not root.is_dir():
        raise ValueError(f"{owner}: not a folder" if root.exists() else f"{owner}: does not exist")
    size = tuple(source["size"]) if source.get("size") is not None else None
    test_dir = next((root / s for s in ("test", "val") if (root / s).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        train_classes = _class_folders(root / "train", owner=owner)
        test_classes = dict(_class_folders(test_dir, owner=owner))
        names = [c for c, _ in train_classes]
        extra = sorted(set(test_classes) - set(names))
        if extra:
            raise ValueError(f"{owner}: {str(test_dir)!r} has classes {extra} that train/ does not")
        train_files = [(f, i) for i, (_, fs) in enumerate(train_classes) for f in fs]
        test_files = [(f, names.index(c)) for c, fs in test_classes.items() for f in fs]
    else:
        classes = _class_folders(root, owner=owner)
        names = [c for c, _ in classes]
        labelled = [(f, i) for i, (_, fs) in enumerate(classes) for f in fs]
        order = np.random.default_rng(0).permutation(len(labelled))
        n_test = max(1, round(len(labelled) * float(source.get("test_fraction", 0.2))))
        if n_test >= len(labelled):
            raise ValueError(f"{owner}: {len(labelled)} images are too few to split into train and test")
        test_files = [labelled[i] for i in sorted(order[:n_test])]
        train_files = [labelled[i] for i in sorted(order[n_test:])]
    x = _read_images([f for f, _ in train_files + test_files], size=size, owner=owner)
    y = np.asarray([label for _, label in train_files + test_files], dtype=np.int64)
    n = len(train_files)
    return ImageSet.from_arrays(
        x[:n], y[:n], x[n:], y[n:], name=str(root), classes=tuple(names), source=str(root)
    )
