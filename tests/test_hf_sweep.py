"""The Hugging Face sweep (tests/hf_sweep.py): every architecture of the installed transformers
that builds from a tiny config converts to its own family exactly, to DyT and back bit-exact,
gets LNS or a clear refusal, and is diagnosed, with no norm skipped silently.

The default run takes a fixed subset of families that cover the cases that went wrong before
(parameter-less, gated, weightless and 1 + w norms, q/k norms, encoder-decoders, state-space
models, MoE, vision); ``NORMLAB_HF_SWEEP=all`` runs every architecture (a few minutes).
"""

from __future__ import annotations

import os

import pytest

transformers = pytest.importorskip("transformers", reason="transformers is an optional dependency")
transformers.logging.set_verbosity_error()

import hf_sweep  # noqa: E402  (after the importorskip)

FAST = (
    "llama", "gpt2", "bert", "t5", "bart", "whisper", "mamba", "mamba2", "falcon_mamba", "olmo",
    "olmo2", "cohere", "nemotron", "nanochat", "gemma2", "qwen3", "mixtral", "stablelm", "opt",
    "deberta", "vit", "convnext", "funnel", "xlm",
)  # fmt: skip
ARCHS = hf_sweep.architectures()
CHOSEN = ARCHS if os.environ.get("NORMLAB_HF_SWEEP") == "all" else [a for a in ARCHS if a[0] in FAST]


def test_the_architectures_come_from_transformers_itself() -> None:
    tasks = {task for _, task, _ in ARCHS}
    assert {"causal-lm", "encoder", "encoder-decoder", "vision"} <= tasks
    assert len(ARCHS) > 150  # every auto mapping's model types, not a hand list
    missing = set(FAST) - {a[0] for a in ARCHS}
    assert not missing, f"the fast subset names architectures transformers does not have: {missing}"
    assert len(CHOSEN) >= 15


@pytest.mark.parametrize(("model_type", "task", "cls"), CHOSEN, ids=[a[0] for a in CHOSEN])
def test_architecture(model_type: str, task: str, cls: str) -> None:
    row = hf_sweep.check(model_type, task, cls)
    if model_type not in FAST and not row.built:
        pytest.skip(f"does not build from a tiny config: {row.why_not_built}")
    assert row.built, row.why_not_built
    assert not row.failures, row.failures
    assert row.norms > 0, "no norm read"
    assert row.same_exact > 0 and row.same_max_diff <= hf_sweep.EXACT_TOL
    assert row.dyt_revert_exact
    assert row.lns.startswith(("applied", "refused: apply_layernorm_scaling"))
    assert row.diagnose
