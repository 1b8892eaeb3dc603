"""``normlab bench``: speed of normlab's norms against the memory-bandwidth limit, torch and the papers' code.

A normalization layer reads its input once and writes its output once (backward: reads ``x`` and
``dy``, writes ``dx``), so its *minimal traffic* is 2 tensor passes forward and 3 backward (5 for
forward+backward; 4 and 4 for the fused residual add, which reads two inputs, writes ``y`` and
``h``, and gets two input gradients). Each case times, interleaved in rounds
so that a noisy neighbour hits every implementation alike:

- ``normlab``: the normlab layer, fused kernels on (the default);
- ``plain``: the same layer with the kernels off (``normlab.kernels.use_kernels(False)``);
- ``torch``: torch's native layer (``nn.LayerNorm`` for DyT/Derf/LNS, the layers they replace);
- ``paper``: the paper's reference code where it differs from torch: eager DyT
  (``tanh(alpha x) * w + b``, arXiv:2503.10622), eager Derf (arXiv:2512.10938), LNS as LayerNorm
  then a multiply (arXiv:2502.05795), RMSNorm's official ``x / (||x|| d^-1/2 + eps) * g``
  (arXiv:1910.07467);
- ``compile``: ``torch.compile`` of the paper's code (torch's layer where there is none), the
  generated-kernel baseline (``--compile`` on CPU; on by default on CUDA);
- ``liger``: Liger-Kernel's Triton layer (RMSNorm, LayerNorm, DyT, GroupNorm), on CUDA when the
  ``liger_kernel`` package is installed;
- ``copy``: ``dst.copy_(x)`` of the same tensor, the bandwidth a memory-bound kernel can reach.

On CUDA (``--device cuda``) the same cases run on the GPU with the Triton kernels, each sample
timed by CUDA events over several back-to-back calls; the default shape is 8x larger there so
that a tensor (200 MB in fp32) does not fit in the L2 cache, and %copy is then the fraction of the
HBM bandwidth that a same-run device copy reaches.

Reported per case: forward and forward+backward median ms and spread (half the inter-quartile
range, % of the median), achieved GB/s of the minimal traffic, that bandwidth over the same-run
``copy_`` bandwidth (``%copy``), and the time ratios to torch and to the paper's code (< 1 is
faster). The end-to-end part trains normlab's small GPT with each norm (kernels on and off) and
reports steps per second.

Timings depend on the machine's load: the JSON records the load average before and after, the
thread count and ``GLIBC_TUNABLES``: with glibc's defaults every tensor of 32 MiB or more is a
fresh ``mmap`` whose pages fault in at first touch, which adds about a third to a memory-bound
kernel's time here; ``glibc.malloc.mmap_max=0`` keeps them on the heap (:data:`RECOMMENDED_MALLOC`).

Layout: :mod:`~normlab.bench.references` (the papers' code and torch's layers as timed),
:mod:`~normlab.bench.cases` (what is timed), :mod:`~normlab.bench.timing` (how),
:mod:`~normlab.bench.render` (the table, ``bench.json``, ``bench.png``), :mod:`~normlab.bench.run`
(:func:`run_bench`).
"""

from __future__ import annotations

from normlab.bench.cases import DEVICES, DTYPES, E2E_NORMS, RECOMMENDED_MALLOC, ROLES, Case, default_cases
from normlab.bench.references import (
    AddNorm,
    PaperDerf,
    PaperDyT,
    PaperLNS,
    PaperRMSNorm,
    Plain,
    TorchLayerNorm2d,
    Transposed,
)
from normlab.bench.render import format_e2e, format_table, plot, save
from normlab.bench.run import run_bench
from normlab.bench.timing import CaseResult, Timing, machine_info, run_case, run_e2e

__all__ = [
    "DEVICES",
    "DTYPES",
    "E2E_NORMS",
    "RECOMMENDED_MALLOC",
    "ROLES",
    "AddNorm",
    "Case",
    "CaseResult",
    "PaperDerf",
    "PaperDyT",
    "PaperLNS",
    "PaperRMSNorm",
    "Plain",
    "Timing",
    "TorchLayerNorm2d",
    "Transposed",
    "default_cases",
    "format_e2e",
    "format_table",
    "machine_info",
    "plot",
    "run_bench",
    "run_case",
    "run_e2e",
    "save",
]
