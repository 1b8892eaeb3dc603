"""The result dataclasses of the diagnostics: what :func:`~normlab.diagnostics.diagnose` returns.

``Diagnosis`` gathers every measurement of one call; ``Finding`` is one rule's outcome and
``Thresholds`` the numbers the rules compare against (:mod:`normlab.diagnostics.findings`).
Every class has ``to_dict()``/``to_json()`` (NaN and inf become ``null``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from normlab.diagnostics._jsonable import Result
from normlab.diagnostics.depth import AngularDistances, Removal, ResidualStream
from normlab.diagnostics.layers import DyTRelation, LayerStats, NonFiniteReport
from normlab.diagnostics.tracking import ModelUpdateHistory

__all__ = ["Diagnosis", "Finding", "ModelInfo", "Thresholds"]


@dataclass(frozen=True, kw_only=True)
class Thresholds:
    """The numbers the rules compare against (see the module docstring)."""

    small_angular: float = 0.1
    small_removal: float = 0.01
    min_run: int = 2
    residual_growth: float = 10.0
    geometric_total: float = 100.0
    geometric_r2: float = 0.9
    geometric_step: float = 1.15
    collapse_corr: float = 0.9
    vanishing_ratio: float = 0.25
    exploding_ratio: float = 10.0
    dyt_saturation: float = 2.5
    update_relative: float = 1.0


@dataclass
class Finding(Result):
    """One verdict: ``code`` names the rule, ``severity`` is ``"error"``, ``"warning"`` or
    ``"info"``, ``numbers`` the measured values the ``message`` quotes, ``paper`` the source."""

    code: str
    severity: str
    message: str
    numbers: dict[str, float | int | str] = field(default_factory=dict)
    paper: str = ""


@dataclass
class ModelInfo(Result):
    """What was measured: the class, parameter count and the blocks found."""

    model_type: str
    num_params: int
    num_blocks: int
    block_names: list[str]
    spec: str = ""
    stack: str = ""  # where the blocks were found ("model.layers", "encoder.block+decoder.block")


@dataclass
class Diagnosis(Result):
    """Everything :func:`diagnose` measured; ``to_dict()``/``to_json()`` for ``diagnostics.json``.

    ``layers`` are per-module statistics (:class:`~normlab.diagnostics.layers.LayerStats`);
    ``residual``, ``angular``, ``block_influence`` and ``removal`` are per block (``None``/empty
    when the model has no blocks); ``findings`` come from
    :func:`~normlab.diagnostics.findings.verdicts`.
    """

    model: ModelInfo
    data: str
    loss: float
    loss_kind: str
    layers: list[LayerStats]
    residual: ResidualStream | None = None
    angular: AngularDistances | None = None
    block_influence: list[float] = field(default_factory=list)
    removal: Removal | None = None
    dyt: DyTRelation | None = None
    nonfinite: NonFiniteReport | None = None
    model_update: ModelUpdateHistory | None = None
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
