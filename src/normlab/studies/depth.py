"""The depth study: eight norm placements at 4 and 12 blocks, five at 24, and what the deep blocks still do.

Shakespeare, char-level; a GPT of width 64 (4 heads), windows of 32 characters, 16 windows a
step, 400 AdamW steps (0.9, 0.98), lr 1e-3 with a linear warm-up over the first 10% of the steps
then a cosine decay to 0.1x (the Curse-of-Depth recipe, Sun et al. 2025, arXiv:2502.05795,
scaled down), no clipping, 2 seeds (up to 4 while a claim is inconclusive). Eight architectures
(the param ``arch``), at 4 and at 12 blocks (the groups ``L4`` and ``L12``), and five of them
(Pre-LN, LNS, Post-LN, DeepNorm, B2T) at 24 blocks (``L24``):

- ``pre``: Pre-LN (Xiong et al. 2020, arXiv:2002.04745); ``lns``: Pre-LN + LayerNorm Scaling
  (Sun et al. 2025, arXiv:2502.05795); ``post``: Post-LN (Vaswani et al. 2017);
- ``deepnorm``: DeepNorm (Wang et al. 2022, arXiv:2203.00555); ``mixln``: Mix-LN, Post-LN in
  the first quarter of the blocks (Li et al. 2025, arXiv:2412.13795); ``subln``: Sub-LN
  (Wang et al. 2022, arXiv:2210.06423); ``b2t``: B2T connection (Takase et al. 2022,
  arXiv:2206.00330); ``dyt``: Pre-LN placement with DyT instead of LayerNorm (Zhu et al.
  2025, arXiv:2503.10622). All others use LayerNorm.

Measured per run: the validation loss, divergence, loss spikes (:func:`loss_spikes`), and at
the end of training on the first validation batch the residual variance and angular distance
per block (the ``"residual"`` probe) and the layer-removal sensitivity (the ``"depth_removal"``
probe below, :func:`removal_deep_share`).

Pilot, to choose the learning rate and the steps for the budget, before any rule was
evaluated. ``--scale 0.25 --seeds 1`` at lr 2e-3 (150 steps): at 12 blocks Post-LN, DeepNorm, B2T
and Mix-LN were all still on the unigram plateau (val loss 3.31), Pre-LN 2.66, LNS 2.60, Sub-LN
2.91, DyT 3.34; about 7 ms of CPU per block and step. Then 400 steps at lr 1e-3 (the lr of the
papers' small models: LNS at 130M, B2T on WMT En-De), one seed, 12 blocks:
Pre-LN 2.45, Post-LN 2.56, both off the plateau. So lr 1e-3 and 400 steps: 2 x 8 x (4 + 12)
block-runs x 400 steps x 7 ms is about 12 CPU-minutes. The rules below were fixed before the
full run; the verdicts are what they are.

The 24-block group, and the claims that read it, were added after that run, from the papers,
because four of its six claims were inconclusive at 12 blocks for a reason the papers give:

- Sun et al.'s own argument is that the curse grows with depth: in their Table 1 the LNS gain
  is 0.037 nats at 12 blocks (130M) and 0.073-0.081 at 24 (250M-1B). So LNS is tested at 12 and
  24 blocks against the smallest gain they report, 0.04 nats (``min_effect``, as in the quick
  study), and the growth of the gain from 4 to 24 blocks (a contrast of contrasts, per seed)
  against the same 0.04, about the growth they report from 12 to 24 blocks; the layer-removal
  share is read at 24 blocks, where the deep blocks should matter least.
- DeepNorm and B2T answer Post-LN's failure, which both papers find from 18 layers (DeepNet
  Table 1: on par with Post-LN at 6L-6L; B2T: Post-LN fails at 18L-18L), not at 12; they are
  compared with Post-LN at 24 blocks.
- Every claim's two sides are one seed's runs (the same data order), so the paired interval
  over seeds decides it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from normlab.diagnostics import lm_inputs, removal_sensitivity
from normlab.models import GPT
from normlab.studies.framework import (
    BASE_GPT,
    Better,
    Claim,
    PlotSpec,
    RunSpec,
    Side,
    Size,
    Study,
    StudyOptions,
    grid,
    register_study,
)
from normlab.studies.metrics import loss_spikes, resid_var_growth
from normlab.train.config import LMTask, RunConfig, TrainConfig
from normlab.train.probes import register_probe

DEPTHS = (4, 12)
DEEP = 24  # the depth of Sun et al.'s 250M-1B models, past the 18 where Post-LN fails
DEEP_ARCHS = ("pre", "lns", "post", "deepnorm", "b2t")
STEPS = 400
LR = 1e-3
LOG_EVERY = 5

# arch -> (placement, norm)
ARCHS: dict[str, tuple[str, str]] = {
    "pre": ("pre", "layernorm"),
    "lns": ("lns", "layernorm"),
    "post": ("post", "layernorm"),
    "deepnorm": ("deepnorm", "layernorm"),
    "mixln": ("mixln", "layernorm"),
    "subln": ("subln", "layernorm"),
    "b2t": ("b2t", "layernorm"),
    "dyt": ("pre", "dyt"),
}


# --------------------------------------------------------------------------------------------
# Metrics and the removal probe


@register_probe("depth_removal")
def probe_removal(model: nn.Module, idx: Tensor) -> dict[str, Any]:
    """``removal_delta[l] = L(without block l) - L`` on the batch ``idx`` (next-token loss of
    ``idx[:, 1:]`` given ``idx[:, :-1]``), the loss form of the layer-pruning drop of Sun et al.
    2025 (arXiv:2502.05795), via :func:`normlab.diagnostics.removal_sensitivity`: the block is
    deleted and the later ones move down, each keeping its own depth constants.

    One no-grad forward per block plus one: cheap next to training.
    """
    if not isinstance(model, GPT):
        raise ValueError(f"probe 'depth_removal' needs a normlab GPT, got {type(model).__name__}")
    removal = removal_sensitivity(model, lm_inputs(model, idx), train=False)
    return {"removal_base": removal.base_loss, "removal_delta": list(removal.delta)}


def removal_deep_share(records: list[dict[str, Any]], summary: Mapping[str, Any]) -> float | None:
    """The share of the removal sensitivity carried by the second half of the blocks:
    ``sum(max(dL_l, 0) for l >= L/2) / sum(max(dL_l, 0) for all l)``, ``dL_l`` the loss change
    when block ``l`` is removed. Small: the deep blocks barely matter (the Curse of Depth, Sun
    et al. 2025, arXiv:2502.05795). ``None`` without the probe or if no removal hurts."""
    del records
    delta = summary.get("probe", {}).get("removal_delta")
    if not delta or any(not isinstance(d, (int, float)) or not math.isfinite(d) for d in delta):
        return None
    pos = [max(float(d), 0.0) for d in delta]
    total = sum(pos)
    if total <= 0:
        return None
    return sum(pos[len(pos) // 2 :]) / total


def deep_angular(records: list[dict[str, Any]], summary: Mapping[str, Any]) -> float | None:
    """Mean angular distance ``d(l, l + 1)`` (last token) over the second half of the blocks:
    how much each deep block still turns the residual stream (Sun et al. 2025, arXiv:2502.05795,
    after Gromov et al. 2024, arXiv:2403.17887). ``None`` without the ``"residual"`` probe."""
    del records
    ang = summary.get("probe", {}).get("angular")
    if not ang or len(ang) < 3:
        return None
    n_blocks = len(ang) - 1
    values = [float(ang[i][i + 1]) for i in range(n_blocks // 2, n_blocks)]
    return sum(values) / len(values) if all(math.isfinite(v) for v in values) else None


# --------------------------------------------------------------------------------------------
# The grid


def _lm(options: StudyOptions, n_layer: int) -> Any:
    def make(*, seed: int, arch: str) -> RunConfig:
        if arch not in ARCHS:
            raise ValueError(f"depth study: arch must be one of {sorted(ARCHS)}, got {arch!r}")
        placement, norm = ARCHS[arch]
        steps = options.steps(STEPS)
        task = LMTask(
            **options.corpus_fields(),
            level="char",
            block_size=32,
            gpt={"n_layer": n_layer, "n_embd": 64, "n_head": 4, "placement": placement, "norm": norm},
            eval_batches=4,
            eval_batch_size=32,
            probes=("residual", "depth_removal"),
        )
        train = TrainConfig(
            steps=steps,
            batch_size=16,
            lr=LR,
            optimizer="adamw",
            betas=(0.9, 0.98),
            schedule="cosine",
            warmup=max(1, steps // 10),
            min_lr_ratio=0.1,
            seed=seed,
            log_every=LOG_EVERY,
            eval_every=max(1, steps // 4),
            ckpt_every=200,
        )
        return RunConfig(task=task, train=train)

    return make


def _grid(options: StudyOptions) -> list[RunSpec]:
    specs: list[RunSpec] = []
    for n_layer in DEPTHS:
        specs += grid(f"L{n_layer}", _lm(options, n_layer), seeds=options.seed_list, arch=list(ARCHS))
    specs += grid(f"L{DEEP}", _lm(options, DEEP), seeds=options.seed_list, arch=list(DEEP_ARCHS))
    return specs


def _side(label: str, arch: str, n_layer: int = 12) -> Side:
    return Side(label=label, group=f"L{n_layer}", where={"arch": arch})


def _lns_gain(n_layer: int) -> Side:
    """Per seed, Pre-LN's validation loss minus LNS's at ``n_layer`` blocks: LNS's gain."""
    return Side(
        label=f"LNS gain L{n_layer}",
        group=f"L{n_layer}",
        where={"arch": "pre"},
        minus=_side(f"Pre-LN+LNS L{n_layer}", "lns", n_layer),
    )


# The smallest LNS gain Sun et al. report, in nats: -ln(25.76 / 26.73) at 130M (12 blocks),
# their Table 1; at 24 blocks (250M-1B) it is 0.073-0.081, so the gain grows by about 0.04
# from 12 to 24 blocks.
LNS_MIN_EFFECT = 0.04


CLAIMS = (
    Claim(
        id="lns-val-loss-deep",
        text="At 12 blocks, Pre-LN + LNS reaches a lower validation loss than Pre-LN",
        paper="Sun et al. 2025 (arXiv:2502.05795), Table 1: LNS / Pre-LN perplexity 0.964 at 130M "
        "(12 blocks)",
        metric="val_loss",
        a=_side("Pre-LN+LNS L12", "lns"),
        b=_side("Pre-LN L12", "pre"),
        rule=Better(lower_is_better=True, min_effect=LNS_MIN_EFFECT, paired=True),
    ),
    Claim(
        id="lns-val-loss-24",
        text=f"At {DEEP} blocks, Pre-LN + LNS reaches a lower validation loss than Pre-LN",
        paper="Sun et al. 2025 (arXiv:2502.05795), Table 1: LNS / Pre-LN perplexity 0.92-0.93 at "
        "250M-1B (24 blocks)",
        metric="val_loss",
        a=_side(f"Pre-LN+LNS L{DEEP}", "lns", DEEP),
        b=_side(f"Pre-LN L{DEEP}", "pre", DEEP),
        rule=Better(lower_is_better=True, min_effect=LNS_MIN_EFFECT, paired=True),
    ),
    Claim(
        id="lns-gain-grows",
        text=f"LNS's validation-loss gain over Pre-LN is larger at {DEEP} blocks than at 4",
        paper="Sun et al. 2025 (arXiv:2502.05795), Sec. 3 and Table 1: the curse grows with depth; "
        "the LNS gain is 0.037 nats at 12 blocks and 0.073-0.081 at 24",
        metric="val_loss",
        a=_lns_gain(DEEP),
        b=_lns_gain(4),
        rule=Better(lower_is_better=False, min_effect=LNS_MIN_EFFECT, paired=True),
    ),
    Claim(
        id="lns-variance-deep",
        text="At 12 blocks, the residual variance grows less from the first to the last block with "
        "LNS than with Pre-LN (log var(x_L)/var(x_1), lower is better)",
        paper="Sun et al. 2025 (arXiv:2502.05795), Sec. 3-4: Pre-LN output variance grows up to "
        "exponentially with depth, LNS bounds it polynomially",
        metric="resid_var_growth",
        a=_side("Pre-LN+LNS L12", "lns"),
        b=_side("Pre-LN L12", "pre"),
        rule=Better(lower_is_better=True, paired=True),
    ),
    Claim(
        id="lns-deep-blocks-matter",
        text=f"At {DEEP} blocks, the second half of the blocks carries a larger share of the "
        "layer-removal loss increase with LNS than with Pre-LN",
        paper="Sun et al. 2025 (arXiv:2502.05795), Sec. 2 and 5: removing a deep block of a Pre-LN "
        "LLM barely changes its performance; LNS makes the deep blocks contribute",
        metric="removal_deep_share",
        a=_side(f"Pre-LN+LNS L{DEEP}", "lns", DEEP),
        b=_side(f"Pre-LN L{DEEP}", "pre", DEEP),
        rule=Better(lower_is_better=False, min_effect=0.02, paired=True),
    ),
    Claim(
        id="deepnorm-beats-post-deep",
        text=f"At {DEEP} blocks, DeepNorm reaches a lower validation loss than Post-LN",
        paper="Wang et al. 2022 (arXiv:2203.00555), Table 1: DeepNorm on par with Post-LN at 6L-6L, "
        "trains where Post-LN fails from 18L-18L (100L-100L: DeepNet trains, Post-LN diverges)",
        metric="val_loss",
        a=_side(f"DeepNorm L{DEEP}", "deepnorm", DEEP),
        b=_side(f"Post-LN L{DEEP}", "post", DEEP),
        rule=Better(lower_is_better=True, min_effect=0.01, paired=True),
    ),
    Claim(
        id="b2t-beats-post-deep",
        text=f"At {DEEP} blocks, B2T reaches a lower validation loss than Post-LN",
        paper="Takase et al. 2022 (arXiv:2206.00330): Post-LN is unstable from about 10 layers "
        "(vanishing lower-layer gradients), B2T trains stably (18L-18L: Post-LN fails, B2T above "
        "Pre-LN in BLEU)",
        metric="val_loss",
        a=_side(f"B2T L{DEEP}", "b2t", DEEP),
        b=_side(f"Post-LN L{DEEP}", "post", DEEP),
        rule=Better(lower_is_better=True, min_effect=0.01, paired=True),
    ),
    Claim(
        id="mixln-vs-pre-deep",
        text="At 12 blocks, Mix-LN reaches a lower validation loss than Pre-LN",
        paper="Li et al. 2025 (arXiv:2412.13795), as tabulated by Sun et al. 2025 (arXiv:2502.05795) "
        "Table 1: Mix-LN / Pre-LN perplexity 0.975 (130M) and 0.976 (250M)",
        metric="val_loss",
        a=_side("Mix-LN L12", "mixln"),
        b=_side("Pre-LN L12", "pre"),
        rule=Better(lower_is_better=True, min_effect=0.01, paired=True),
    ),
)


def _plots() -> tuple[PlotSpec, ...]:
    plots: list[PlotSpec] = []
    for n_layer in (*DEPTHS, DEEP):
        g = f"L{n_layer}"
        plots += [
            PlotSpec(
                kind="layers",
                group=g,
                metric="resid_var",
                title=f"{g}: residual variance per layer",
                logy=True,
            ),
            PlotSpec(
                kind="heatmap", group=g, metric="angular", title=f"{g}: angular distance between layers"
            ),
            PlotSpec(
                kind="layers",
                group=g,
                metric="removal_delta",
                title=f"{g}: loss change when block x is removed",
            ),
        ]
    return tuple(plots)


STUDY = register_study(
    Study(
        name="depth",
        title="Norm placement and depth: Pre-LN, LNS, Post-LN, DeepNorm, Mix-LN, Sub-LN, B2T, DyT",
        question=(
            "At 4, 12 and 24 blocks, which placements train, which reach the lowest loss, and do "
            "the deep blocks of Pre-LN still matter (the Curse of Depth)? A CPU-sized echo of Sun et "
            "al. 2025, Wang et al. 2022 (DeepNet), Takase et al. 2022 (B2T) and Li et al. 2025 "
            "(Mix-LN), 2 to 4 seeds per cell."
        ),
        grid=_grid,
        claims=CLAIMS,
        plots=_plots(),
        metrics={
            "resid_var_growth": resid_var_growth,
            "removal_deep_share": removal_deep_share,
            "deep_angular": deep_angular,
            "loss_spikes": loss_spikes,
        },
        default_seeds=2,
        max_seeds=4,  # sequential seeding: a claim still inconclusive gets up to 4 seeds a cell
        sizes={
            "tiny": 0.005,  # the scale of its tests
            "small": 1.0,
            "base": Size(
                scale=12.5,
                sets=BASE_GPT,
                note="4, 12 and 24 blocks of width 256 over 128 characters, 5,000 steps; about 2 GPU-hours, "
                "estimated, not yet run",
            ),
        },
        budget="about 22 min on 2 cores with --jobs 2 (42-84 runs, 2 to 4 seeds a cell)",
    )
)
