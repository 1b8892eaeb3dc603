"""The quick study: five claims that a few CPU minutes can decide (``make demo`` runs it).

Language model (Shakespeare, char-level; a 6-block GPT of width 64, 200 AdamW steps of 16
windows of 32 characters, lr 3e-3 with a cosine decay to 0.1x, 2 seeds), four cells:
Pre-LN, Pre-LN + LNS, Post-LN, and Post-LN with 50 warm-up steps. Images (Fashion-MNIST, or
the MNIST-5k fallback): a 6-conv plain CNN at batch 2, BatchNorm vs GroupNorm (8 groups),
SGD with momentum, 500 steps (1,000 images), 2 seeds.

The learning rate 3e-3 was chosen after a pilot, for the budget: at 1e-3, 200 steps leave
every model near the unigram plateau, and the claims here are about trainability at a high
learning rate. In the pilot (one seed each) Post-LN stayed on the unigram plateau at 3e-3
with or without 50 warm-up steps, and BatchNorm and GroupNorm were within a few points of
accuracy at batch 2: those verdicts are expected to be inconclusive at this budget, which is
what the quick study reports; the full ``warmup`` and ``small-batch`` studies spend more.
Every verdict comes from the rules below, fixed before the run.
"""

from __future__ import annotations

from typing import Any

from normlab.studies.framework import (
    Better,
    Claim,
    PlotSpec,
    RunSpec,
    Side,
    Study,
    StudyOptions,
    grid,
    register_study,
)
from normlab.studies.metrics import resid_var_growth
from normlab.train.config import ImageTask, LMTask, RunConfig, TrainConfig

N_LAYER = 6
LM_STEPS = 200
IMG_STEPS = 500


def _lm(options: StudyOptions) -> Any:
    def make(*, seed: int, placement: str, warmup: int) -> RunConfig:
        steps = options.steps(LM_STEPS)
        task = LMTask(
            **options.corpus_fields(),
            level="char",
            block_size=32,
            gpt={"n_layer": N_LAYER, "n_embd": 64, "n_head": 4, "placement": placement, "norm": "layernorm"},
            eval_batches=4,
            eval_batch_size=32,
        )
        train = TrainConfig(
            steps=steps,
            batch_size=16,
            lr=3e-3,
            optimizer="adamw",
            betas=(0.9, 0.98),  # Xiong et al.'s Adam betas
            schedule="cosine",
            warmup=options.steps(warmup) if warmup else 0,
            min_lr_ratio=0.1,
            seed=seed,
            log_every=10,
            eval_every=max(1, steps // 4),
            ckpt_every=50,
        )
        return RunConfig(task=task, train=train)

    return make


def _img(options: StudyOptions) -> Any:
    def make(*, seed: int, norm: str, batch_size: int) -> RunConfig:
        task = ImageTask(
            dataset=options.images,
            n_train=10000,
            n_test=2000,
            convnet={"arch": "plain", "widths": (16, 32, 64), "depth": 2, "norm": norm},
        )
        train = TrainConfig(
            steps=options.steps(IMG_STEPS),
            batch_size=batch_size,
            lr=0.01,
            optimizer="sgd",
            momentum=0.9,
            schedule="cosine",
            min_lr_ratio=0.0,
            seed=seed,
            log_every=20,
            eval_every=0,
            ckpt_every=200,
        )
        return RunConfig(task=task, train=train)

    return make


def _grid(options: StudyOptions) -> list[RunSpec]:
    seeds = options.seed_list
    lm_points = [
        {"placement": "pre", "warmup": 0},
        {"placement": "lns", "warmup": 0},
        {"placement": "post", "warmup": 0},
        {"placement": "post", "warmup": 50},
    ]
    specs = grid("lm", _lm(options), seeds=seeds, points=lm_points)
    specs += grid("img", _img(options), seeds=seeds, norm=["batchnorm", "groupnorm"], batch_size=[2])
    return specs


def _lm_side(label: str, placement: str, warmup: int = 0) -> Side:
    return Side(label=label, group="lm", where={"placement": placement, "warmup": warmup})


CLAIMS = (
    Claim(
        id="lns-val-loss",
        text="Pre-LN + LayerNorm Scaling reaches a lower validation loss than Pre-LN",
        paper="Sun et al. 2025 (arXiv:2502.05795), Table 1: LNS below Pre-LN in perplexity at every "
        "size from 130M to 1B (LNS / Pre-LN 0.92-0.96)",
        metric="val_loss",
        a=_lm_side("Pre-LN+LNS", "lns"),
        b=_lm_side("Pre-LN", "pre"),
        rule=Better(lower_is_better=True, min_effect=0.01),
    ),
    Claim(
        id="lns-variance",
        text="LNS keeps the residual variance from growing with depth as much as Pre-LN "
        "(log var(x_L)/var(x_1), lower is better)",
        paper="Sun et al. 2025 (arXiv:2502.05795), Sec. 3-4: Pre-LN output variance grows "
        "exponentially with depth, LNS bounds it polynomially",
        metric="resid_var_growth",
        a=_lm_side("Pre-LN+LNS", "lns"),
        b=_lm_side("Pre-LN", "pre"),
        rule=Better(lower_is_better=True),
    ),
    Claim(
        id="pre-ln-no-warmup",
        text="Without warm-up, Pre-LN reaches a lower validation loss than Post-LN at the same lr",
        paper="Xiong et al. 2020 (arXiv:2002.04745), Sec. 3-4: without warm-up Post-LN is far below "
        "Pre-LN in BLEU (Post / Pre about 0.25); Pre-LN needs no warm-up",
        metric="val_loss",
        a=_lm_side("Pre-LN", "pre"),
        b=_lm_side("Post-LN", "post"),
        rule=Better(lower_is_better=True, min_effect=0.01),
    ),
    Claim(
        id="post-ln-warmup",
        text="Post-LN with a learning-rate warm-up reaches a lower validation loss than without",
        paper="Xiong et al. 2020 (arXiv:2002.04745), Sec. 3.2: Post-LN with Adam, BLEU without / with "
        "4,000 warm-up steps about 0.25",
        metric="val_loss",
        a=_lm_side("Post-LN warm-up 50", "post", 50),
        b=_lm_side("Post-LN no warm-up", "post", 0),
        rule=Better(lower_is_better=True, min_effect=0.01),
    ),
    Claim(
        id="gn-vs-bn-batch2",
        text="At batch size 2, GroupNorm reaches a higher test accuracy than BatchNorm",
        paper="Wu & He 2018 (arXiv:1803.08494), Fig. 1: ResNet-50 on ImageNet at 2 images per GPU, "
        "GN's top-1 error well below BN's (BN / GN about 1.44); GN flat from batch 32 to 2",
        metric="test_acc",
        a=Side(label="GroupNorm", group="img", where={"norm": "groupnorm", "batch_size": 2}),
        b=Side(label="BatchNorm", group="img", where={"norm": "batchnorm", "batch_size": 2}),
        rule=Better(lower_is_better=False, min_effect=0.005),
    ),
)

STUDY = register_study(
    Study(
        name="quick",
        title="normlab quick study: LNS, warm-up and small-batch norms in a few CPU minutes",
        question=(
            "Does LayerNorm Scaling beat Pre-LN, does Post-LN need warm-up, does GroupNorm "
            "beat BatchNorm at batch 2? A CPU-sized echo of each paper's claim, 2 seeds per cell."
        ),
        grid=_grid,
        claims=CLAIMS,
        plots=(
            PlotSpec(
                kind="layers",
                group="lm",
                metric="resid_var",
                title="lm: residual variance per layer",
                logy=True,
            ),
            PlotSpec(
                kind="heatmap", group="lm", metric="angular", title="lm: angular distance between layers"
            ),
            PlotSpec(
                kind="layers", group="img", metric="act_var", title="img: activation variance per layer"
            ),
        ),
        metrics={"resid_var_growth": resid_var_growth},
        default_seeds=2,
        sizes={"tiny": 0.1, "small": 1.0},  # tiny: the scale of its tests
        budget="about 2 min on 2 shared cores with --jobs 2",
    )
)
