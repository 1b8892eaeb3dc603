"""Identity: the no-normalization baseline with a norm's signature."""

from __future__ import annotations

from torch import Tensor, nn

from normlab.norms._base import Device, DType, NormMixin, NormSpec, check_num_features, register_norm
from normlab.norms._info import NormInfo


@register_norm("identity", aliases=("none", "no_norm"))
class Identity(NormMixin, nn.Identity):
    """``y = x``: the ablation baseline. Takes ``num_features`` so it can stand in for any norm.

    Args:
        num_features: the feature count, checked against the input.
        channels_first: the features are dimension 1 of ``(N, C, *)`` (standing in for a
            BatchNorm or GroupNorm) instead of the last dimension.

    Shape: ``(*, C)``, or ``(N, C, *)`` with ``channels_first`` -> same.
    """

    spec = NormSpec(paper="no normalization (ablation baseline)", layout="last", elementwise=True)

    def __init__(
        self, num_features: int, *, channels_first: bool = False, device: Device = None, dtype: DType = None
    ) -> None:
        super().__init__()
        self.num_features = check_num_features(type(self).__name__, num_features)
        self.channels_first = channels_first

    def reset_parameters(self) -> None:
        """Nothing to reset: kept so every norm answers ``reset_parameters()``."""

    def norm_info(self) -> NormInfo:
        return NormInfo("identity", self, (self.num_features,), channels_first=self.channels_first)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return x

    def extra_repr(self) -> str:
        return f"{self.num_features}" + (", channels_first=True" if self.channels_first else "")
