"""Fused kernels for normlab's norms (C++ on CPU, Triton on CUDA), used automatically by the layers.

A normalization layer reads its input once and writes its output once (backward: reads ``x`` and
``dy``, writes ``dx``), so it is memory-bound and its speed limit is the machine's copy bandwidth.
Eager torch is far from it on CPU for most norms (DyT's ``tanh``, RMSNorm's composite autograd,
GroupNorm on token layouts; measured on an AVX2 CPU, eager DyT is 5-6x slower than LayerNorm, RMSNorm
4.4x slower forward+backward, and most eager norms reach 5-45% of the ``copy_`` bandwidth); these ops
make one pass each way:

- ``normlab::dyt`` / ``derf``: DyT (arXiv:2503.10622) and Derf (arXiv:2512.10938), ``(*, C)`` and
  ``(N, C, *)``; tanh by the clamped 13/6 rational of Eigen/XLA (max abs error 3.4e-7).
- ``normlab::rms_norm`` / ``layer_norm``: RMSNorm (arXiv:1910.07467, eps inside or outside the
  square root, optional bias) and LayerNorm (arXiv:1607.06450) over trailing dimensions; LNS
  (arXiv:2502.05795) folds its scale into their affine.
- ``normlab::add_rms_norm`` / ``add_layer_norm``: residual add fused with the norm,
  ``h = x + r; y = norm(h)``, returning ``(y, h)`` (see :func:`normlab.functional.add_layer_norm`).
- ``normlab::group_norm``: GroupNorm (arXiv:1803.08494) for ``(N, C, *)`` stored contiguous or
  channels-last, so ``(N, L, C)`` tokens passed as ``x.transpose(1, 2)`` take a one-sweep path.
- ``normlab::batch_norm_train``: BatchNorm's training step (arXiv:1502.03167) on contiguous
  ``(N, C, *)``, returning ``(y, mean, var)`` for the running update; one task per channel, which
  stays in L2 between its statistics and its writes (about 2 tensor passes forward, 3 backward).

fp32, fp64, bf16 and fp16 inputs; statistics and parameter grads accumulated in fp32 (fp64 for
fp64). The ops are ``torch.library`` operators with fake kernels and autograd, so
``torch.compile`` keeps them in the graph; double backward recomputes through plain torch.

``make install`` compiles the library ahead (``normlab kernels build``); otherwise the first
fused call compiles it (about a minute on 2 cores, announced on stderr by normlab's logger) and every
later process loads it from the cache (``NORMLAB_KERNELS_CACHE``, see :func:`status`) in
milliseconds. With no compiler, the plain-torch path runs after one warning. Switch the kernels off
with ``NORMLAB_KERNELS=0``, :func:`set_enabled` or the :func:`use_kernels` context manager.

CUDA tensors take Triton kernels for the same operators (:mod:`normlab.kernels.gpu`, registered
with their autograd by :mod:`normlab.kernels._gpu` at the first CUDA call, when Triton is
installed); BatchNorm keeps torch's cuDNN kernel there. :func:`gpu_status` says what happened.
"""

from __future__ import annotations

from typing import Any

from normlab.kernels import _build, _gpu
from normlab.kernels._build import status
from normlab.kernels._dispatch import usable
from normlab.kernels._switch import enabled, set_enabled, use_kernels


def build(verbose: bool = False) -> bool:
    """Load the fused CPU ops now, compiling them first if the cache has no build for this machine;
    ``True`` if they are usable.

    The first fused call does this anyway; calling it up front moves the one-time cost (about a minute
    on 2 cores) out of the first training step. ``verbose`` shows the compiler output.
    """
    return _build.ensure_built(verbose=verbose)


def clear() -> list[str]:
    """Delete every cached build (the ``cpu-*`` folders of the cache); returns the folders removed.

    A library already loaded in this process stays usable; the next new process rebuilds.
    """
    return [str(p) for p in _build.clear()]


def available() -> bool:
    """Whether the fused CPU ops are built and loaded in this process (does not build)."""
    return _build.STATE.loaded


def gpu_status() -> dict[str, Any]:
    """The Triton kernels' registration: ``loaded``, ``reason`` and the ops whose kernel ``failed``."""
    return _gpu.status()


def info() -> dict[str, Any]:
    """:func:`status` plus the switch and :func:`gpu_status`: what ``normlab bench`` records."""
    return {"enabled": enabled(), **status(), "gpu": gpu_status()}


__all__ = [
    "available",
    "build",
    "clear",
    "enabled",
    "gpu_status",
    "info",
    "set_enabled",
    "status",
    "usable",
    "use_kernels",
]
