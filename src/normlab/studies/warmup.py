"""The warm-up study: does Post-LN need a learning-rate warm-up, and does Pre-LN not?

Xiong et al. 2020 (arXiv:2002.04745): with Adam, Post-LN Transformers need a warm-up (BLEU 8.45
without vs about 34 with 4,000 steps on IWSLT14), and the shorter it is the lower the lr must be
(500 steps: BLEU 31.16 at lr 5e-4, 2.77 at 1e-3); Pre-LN trains without one, because at init
Post-LN's gradients of the last layers are large (``O(d sqrt(ln d))``, independent of depth)
while Pre-LN's shrink as ``1/sqrt(L)``.

Shakespeare, char-level; a 6-block GPT of width 64 (4 heads), windows of 32 characters, 16
windows a step, 500 AdamW steps with Xiong et al.'s betas (0.9, 0.98), no clipping; grid
{Post-LN, Pre-LN} x lr {1e-3, 3e-3} x warm-up {0, 25, 125} steps (0, 5% and 25% of the run,
Xiong et al.'s 1 / 500 / 4,000 scaled down), 2 seeds (up to 4 while a claim is inconclusive): 24
to 48 runs. The schedule is a linear
warm-up then a cosine decay to 0.1x for every cell (Xiong et al. decay with ``1/sqrt(t)``
after the warm-up; with no warm-up that decay would shrink the lr tenfold within 100 steps, so
it would confound the two), so the warm-up length is the only difference between cells.

The ``"warmup_init_grads"`` probe below measures ``||dL/dW||`` of each block's second FFN
matrix (``mlp.fc2``, Xiong et al.'s ``W^{2,l}``) at initialization.

Pilot (``--scale 0.25 --seeds 1``: 125 steps, warm-ups 0 / 6 / 31), for the budget, before any
rule was evaluated: 75 CPU-s in all, so the full study is about 10 CPU-minutes. At lr 1e-3 Pre-LN
reached val loss 2.78-2.82 whatever the warm-up and Post-LN stayed on the unigram plateau
(3.22-3.32); at 3e-3 Post-LN stayed on the plateau (3.31) at every warm-up, Pre-LN reached 3.14 /
2.96 / 2.60 without / with the short / with the long warm-up. The full runs are 4x longer; the
grid and the rules were not changed after the pilot. The rules below are fixed in code; the
verdicts are what they are.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from normlab.diagnostics import lm_inputs, model_loss
from normlab.models import GPT
from normlab.studies.framework import (
    BASE_GPT,
    Better,
    Claim,
    PlotSpec,
    RunSpec,
    Side,
    Similar,
    Size,
    Study,
    StudyOptions,
    grid,
    register_study,
)
from normlab.studies.metrics import loss_spikes
from normlab.train.config import LMTask, RunConfig, TrainConfig
from normlab.train.probes import register_probe

N_LAYER = 6
STEPS = 500
LR_LOW, LR_HIGH = 1e-3, 3e-3
WARMUP_SHORT, WARMUP_LONG = 25, 125


@register_probe("warmup_init_grads")
def probe_init_grads(model: nn.Module, idx: Tensor) -> dict[str, Any]:
    """``init_fc2_grad[l] = ||dL/dW||_F`` of block ``l``'s ``mlp.fc2`` weight in a freshly
    initialized copy of ``model``'s architecture, on the batch ``idx`` (next-token loss of
    ``idx[:, 1:]``), as in Xiong et al. 2020 (arXiv:2002.04745, Sec. 3.3 and Fig. 3: at init
    Post-LN's last-layer gradient is large, Pre-LN's small).

    The fresh init is seeded from a CRC32 of ``model``'s trained embedding, so the runs of a
    cell (different training seeds) measure different inits, and a run always the same one;
    the global random state is left as it was.
    """
    if not isinstance(model, GPT):
        raise ValueError(f"probe 'warmup_init_grads' needs a normlab GPT, got {type(model).__name__}")
    weight = model.wte.weight.detach().float().cpu().contiguous()
    seed = zlib.crc32(weight.numpy().tobytes())
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(seed)
        fresh = GPT(model.config).to(idx.device)
        fresh.train()
        loss, _ = model_loss(fresh(**lm_inputs(fresh, idx)))
        torch.autograd.backward(loss)
    grads = []
    for block in fresh.blocks:
        fc2 = block.get_submodule("mlp.fc2")
        grad = fc2.weight.grad if isinstance(fc2, nn.Linear) else None
        grads.append(float(grad.norm()) if grad is not None else float("nan"))
    return {"init_fc2_grad": grads}


def last_fc2_grad_at_init(records: list[dict[str, Any]], summary: Mapping[str, Any]) -> float | None:
    """``||dL/dW^{2,L}||_F`` at init: the last block's ``init_fc2_grad`` (``None`` without the probe)."""
    del records
    grads = summary.get("probe", {}).get("init_fc2_grad")
    if not grads or not isinstance(grads[-1], (int, float)):
        return None
    return float(grads[-1])


def _group(lr: float) -> str:
    return f"lr{lr:.0e}"  # "lr1e-03": one group per lr, so each figure compares warm-ups


def _lm(options: StudyOptions, lr: float) -> Any:
    def make(*, seed: int, placement: str, warmup: int) -> RunConfig:
        steps = options.steps(STEPS)
        task = LMTask(
            **options.corpus_fields(),
            level="char",
            block_size=32,
            gpt={"n_layer": N_LAYER, "n_embd": 64, "n_head": 4, "placement": placement, "norm": "layernorm"},
            eval_batches=4,
            eval_batch_size=32,
            probes=("residual", "warmup_init_grads"),
        )
        train = TrainConfig(
            steps=steps,
            batch_size=16,
            lr=lr,
            optimizer="adamw",
            betas=(0.9, 0.98),  # Xiong et al.'s Adam betas
            schedule="cosine",
            warmup=options.steps(warmup) if warmup else 0,
            min_lr_ratio=0.1,
            seed=seed,
            log_every=5,
            eval_every=max(1, steps // 6),
            ckpt_every=200,
        )
        return RunConfig(task=task, train=train)

    return make


def _grid(options: StudyOptions) -> list[RunSpec]:
    specs: list[RunSpec] = []
    for lr in (LR_LOW, LR_HIGH):
        specs += grid(
            _group(lr),
            _lm(options, lr),
            seeds=options.seed_list,
            placement=["post", "pre"],
            warmup=[0, WARMUP_SHORT, WARMUP_LONG],
        )
    return specs


def _side(label: str, placement: str, lr: float, warmup: int) -> Side:
    return Side(label=label, group=_group(lr), where={"placement": placement, "warmup": warmup})


def _plots() -> tuple[PlotSpec, ...]:
    plots: list[PlotSpec] = []
    for lr in (LR_LOW, LR_HIGH):
        g = _group(lr)
        plots += [
            PlotSpec(
                kind="xy",
                group=g,
                metric="val_loss",
                x="warmup",
                series="placement",
                title=f"lr {lr:g}: final validation loss against warm-up steps",
            ),
            PlotSpec(
                kind="layers",
                group=g,
                metric="init_fc2_grad",
                title=f"lr {lr:g}: ||dL/dW_fc2|| per block at init (x = block index)",
                logy=True,
            ),
        ]
    return tuple(plots)


CLAIMS = (
    Claim(
        id="post-needs-warmup",
        text=f"At lr {LR_HIGH:g}, Post-LN with a {WARMUP_LONG}-step warm-up reaches a lower validation "
        "loss than Post-LN without warm-up",
        paper="Xiong et al. 2020 (arXiv:2002.04745), Sec. 3.2: Post-LN with Adam, BLEU without / with "
        "4,000 warm-up steps about 8.45 / 34 (ratio about 0.25)",
        metric="val_loss",
        a=_side(f"Post-LN warm-up {WARMUP_LONG}", "post", LR_HIGH, WARMUP_LONG),
        b=_side("Post-LN no warm-up", "post", LR_HIGH, 0),
        rule=Better(lower_is_better=True, min_effect=0.01),
    ),
    Claim(
        id="post-short-warmup-needs-low-lr",
        text=f"With a {WARMUP_SHORT}-step warm-up, Post-LN reaches a lower validation loss at lr "
        f"{LR_LOW:g} than at {LR_HIGH:g}",
        paper="Xiong et al. 2020 (arXiv:2002.04745), Sec. 3.2: Post-LN with 500 warm-up steps, BLEU "
        "31.16 at lr 5e-4 and 2.77 at lr 1e-3 (the higher lr about 0.09 of the lower)",
        metric="val_loss",
        a=_side(f"Post-LN warm-up {WARMUP_SHORT} lr {LR_LOW:g}", "post", LR_LOW, WARMUP_SHORT),
        b=_side(f"Post-LN warm-up {WARMUP_SHORT} lr {LR_HIGH:g}", "post", LR_HIGH, WARMUP_SHORT),
        rule=Better(lower_is_better=True, min_effect=0.01),
    ),
    Claim(
        id="pre-no-warmup-on-par",
        text=f"At lr {LR_HIGH:g}, Pre-LN without warm-up is on par (within 2%) with Pre-LN with a "
        f"{WARMUP_LONG}-step warm-up in validation loss",
        paper="Xiong et al. 2020 (arXiv:2002.04745), Sec. 4: Pre-LN without warm-up reaches about the "
        "BLEU (about 34) and validation loss (about 4) of warmed-up training",
        metric="val_loss",
        a=_side("Pre-LN no warm-up", "pre", LR_HIGH, 0),
        b=_side(f"Pre-LN warm-up {WARMUP_LONG}", "pre", LR_HIGH, WARMUP_LONG),
        rule=Similar(tol=0.02, relative=True),
    ),
    Claim(
        id="pre-beats-post-no-warmup",
        text=f"Without warm-up at lr {LR_HIGH:g}, Pre-LN reaches a lower validation loss than Post-LN",
        paper="Xiong et al. 2020 (arXiv:2002.04745), Sec. 3-4: without warm-up Post-LN is far below "
        "Pre-LN in BLEU (Post / Pre about 0.25); Pre-LN needs no warm-up",
        metric="val_loss",
        a=_side("Pre-LN no warm-up", "pre", LR_HIGH, 0),
        b=_side("Post-LN no warm-up", "post", LR_HIGH, 0),
        rule=Better(lower_is_better=True, min_effect=0.01),
    ),
    Claim(
        id="post-large-last-grad-at-init",
        text="At initialization, the gradient of the last block's second FFN matrix is larger with "
        "Post-LN than with Pre-LN",
        paper="Xiong et al. 2020 (arXiv:2002.04745), Thm. 1 and Fig. 3: ||dL/dW^{2,L}|| is "
        "O(d sqrt(ln d)) for Post-LN and O(d sqrt(ln d / L)) for Pre-LN (about 1.6 vs well below "
        "for Pre-LN, 6 to 14 layers)",
        metric="last_fc2_grad_at_init",
        a=_side("Post-LN", "post", LR_HIGH, 0),
        b=_side("Pre-LN", "pre", LR_HIGH, 0),
        rule=Better(lower_is_better=False),
    ),
)

STUDY = register_study(
    Study(
        name="warmup",
        title="Post-LN vs Pre-LN with and without a learning-rate warm-up",
        question=(
            "Xiong et al. 2020: does Post-LN need a warm-up at a high lr, and does Pre-LN train as "
            "well without one? A CPU-sized echo: 6 blocks, 500 steps, 2 lrs x 3 warm-ups, 2 to 4 seeds."
        ),
        grid=_grid,
        claims=CLAIMS,
        plots=_plots(),
        metrics={"last_fc2_grad_at_init": last_fc2_grad_at_init, "loss_spikes": loss_spikes},
        default_seeds=2,
        max_seeds=4,  # sequential seeding: a claim still inconclusive gets up to 4 seeds a cell
        sizes={
            "tiny": 0.005,  # the scale of its tests
            "small": 1.0,
            "base": Size(
                scale=10.0,
                sets=BASE_GPT,
                note="width 256 over 128 characters, 5,000 steps (warm-ups 250 / 1,250); about 1 GPU-hour, "
                "estimated, not yet run",
            ),
        },
        budget="about 8 min on 2 cores with --jobs 2 (24-48 runs, 2 to 4 seeds a cell)",
    )
)
