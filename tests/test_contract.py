"""The contract every registered norm keeps.

Each test sweeps ``normlab.list_norms()``: a new norm gets this suite without edits. The
fp64 comparisons live in test_reference.py, properties in test_properties.py, compile and
meta-device checks in test_compile.py.
"""

from __future__ import annotations

import copy
import inspect
import io
import pickle
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import normlab

from cases import all_norms, make_input, make_norm, randomize_params, ranks, spec_of

NAMES = all_norms()

# The torch module each normlab norm must be state_dict- and output-compatible with.
TORCH_EQUIVALENT: dict[str, Callable[[int], nn.Module]] = {
    "layernorm": lambda c: nn.LayerNorm(c),
    "rmsnorm": lambda c: nn.RMSNorm(c, eps=1e-6),
    "batchnorm": lambda c: nn.BatchNorm1d(c),
    "groupnorm": lambda c: nn.GroupNorm(3, c),
    "instancenorm": lambda c: nn.InstanceNorm1d(c, affine=True),
    "identity": lambda c: nn.Identity(),
}


def _grads(module: nn.Module, x: Tensor, seed: int = 5) -> tuple[Tensor, list[Tensor | None]]:
    for p in module.parameters():
        p.grad = None
    y = module(x)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    # The training loss: a norm's auxiliary loss (Batchless's NLL; 0 for most norms) included.
    ((y * upstream).sum() + normlab.total_aux_loss(module)).backward()
    return y.detach(), [p.grad for p in module.parameters()]


def _affine_flag(name: str) -> str:
    params = inspect.signature(normlab.get_norm_layer(name).__init__).parameters
    return "elementwise_affine" if "elementwise_affine" in params else "affine"


@pytest.mark.parametrize("name", NAMES)
def test_shape_and_dtype_preserved_for_every_rank(name: str) -> None:
    module = make_norm(name)
    for rank in ranks(module):
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            m = copy.deepcopy(module).to(dtype)
            x = make_input(m, rank, dtype=dtype)
            y = m(x)
            assert y.shape == x.shape and y.dtype == dtype, (name, rank, dtype)
            assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", NAMES)
def test_mixed_precision_input_keeps_its_dtype(name: str) -> None:
    """bf16/fp16 activations through fp32 parameters (the usual AMP layout) stay bf16/fp16."""
    module = make_norm(name)
    for dtype in (torch.bfloat16, torch.float16):
        x = make_input(module, 3, dtype=dtype, requires_grad=True)
        y = module(x)
        y.float().sum().backward()
        assert y.dtype == dtype and x.grad is not None and x.grad.dtype == dtype


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_gets_a_gradient(name: str) -> None:
    module = randomize_params(make_norm(name))
    _, grads = _grads(module, make_input(module, 3, requires_grad=True))
    for (pname, _), g in zip(module.named_parameters(), grads, strict=True):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, pname


@pytest.mark.parametrize("name", NAMES)
def test_no_parameter_is_0_dim(name: str) -> None:
    """FSDP2's ``fully_shard`` refuses scalar parameters: a learned scalar is a ``(1,)`` vector."""
    module = make_norm(name)
    assert not [n for n, p in module.named_parameters() if p.dim() == 0]


@pytest.mark.parametrize("name", NAMES)
def test_train_and_eval_agree_unless_running_stats(name: str) -> None:
    module = randomize_params(make_norm(name))
    x = make_input(module, 3)
    y_train = module.train()(x)
    y_eval = module.eval()(x)
    if spec_of(name).running_stats:
        assert not torch.allclose(y_train, y_eval)
    else:
        assert torch.equal(y_train, y_eval)


@pytest.mark.parametrize("name", NAMES)
def test_batch_of_one_in_eval(name: str) -> None:
    module = randomize_params(make_norm(name)).eval()
    for rank in ranks(module):
        x = make_input(module, rank, batch=1)
        assert torch.isfinite(module(x)).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_empty_batch(name: str, mode: str) -> None:
    """An empty batch (the last shard of a dataset) gives an empty output and zero grads."""
    module = randomize_params(make_norm(name)).train(mode == "train")
    buffers = {k: v.clone() for k, v in module.named_buffers()}
    x = make_input(module, 3, batch=0, requires_grad=True)
    y, grads = _grads(module, x)
    assert y.shape == x.shape
    for g in grads:
        assert g is None or torch.count_nonzero(g) == 0
    for k, v in module.named_buffers():
        assert torch.equal(v, buffers[k]), f"{k} changed on an empty batch"


@pytest.mark.parametrize("name", NAMES)
def test_non_contiguous_input(name: str) -> None:
    module = randomize_params(make_norm(name))
    x = make_input(module, 4, batch=4)
    views = {
        "interleaved": torch.repeat_interleave(x, 2, dim=-1)[..., ::2],
        "transposed": x.transpose(0, 2).contiguous().transpose(0, 2),
    }
    ref_y, ref_grads = _grads(copy.deepcopy(module), x.clone().requires_grad_(True))
    for label, view in views.items():
        assert not view.is_contiguous() and torch.equal(view, x)
        y, grads = _grads(copy.deepcopy(module), view.detach().requires_grad_(True))
        torch.testing.assert_close(y, ref_y, atol=1e-6, rtol=1e-6, msg=label)
        for g, rg in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, rg, atol=1e-5, rtol=1e-5, msg=label)


@pytest.mark.parametrize("name", [n for n in NAMES if spec_of(n).layout == "channel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_channels_last(name: str, dtype: torch.dtype) -> None:
    """channels_last(_3d) inputs: same values and grads as contiguous; BN/GN keep the format."""
    for rank, fmt in ((4, torch.channels_last), (5, torch.channels_last_3d)):
        module = randomize_params(make_norm(name)).to(dtype)
        x = make_input(module, rank, batch=4, dtype=dtype)
        ref_y, ref_grads = _grads(copy.deepcopy(module), x.clone().requires_grad_(True))
        xc = x.to(memory_format=fmt).requires_grad_(True)
        y, grads = _grads(copy.deepcopy(module), xc)
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        torch.testing.assert_close(y, ref_y, atol=tol, rtol=tol)
        for g, rg in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, rg, atol=tol * 10, rtol=tol * 10)
        if name != "instancenorm":  # documented: InstanceNorm returns a contiguous output, like torch
            assert y.is_contiguous(memory_format=fmt), (name, fmt)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_and_serialization(name: str) -> None:
    module = randomize_params(make_norm(name))
    clone = make_norm(name)
    clone.load_state_dict(module.state_dict())
    for (k, a), (_, b) in zip(module.state_dict().items(), clone.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert loaded.keys() == module.state_dict().keys()
    x = make_input(module, 3)
    module.eval()
    for other in (pickle.loads(pickle.dumps(module)), copy.deepcopy(module)):
        assert torch.equal(other.eval()(x), module(x))
    assert type(module).__name__ in repr(module)


@pytest.mark.parametrize("name", sorted(TORCH_EQUIVALENT))
def test_torch_checkpoint_loads_both_ways_and_outputs_match(name: str) -> None:
    c = 6
    theirs = randomize_params(TORCH_EQUIVALENT[name](c))
    ours = make_norm(name, c)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    back = TORCH_EQUIVALENT[name](c)
    back.load_state_dict(ours.state_dict())
    for k, v in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    for mode in (True, False):
        ours.train(mode)
        theirs.train(mode)
        x = make_input(ours, 3)
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_reset_parameters_restores_the_init(name: str) -> None:
    fresh = make_norm(name)
    module = randomize_params(make_norm(name))
    module.reset_parameters()  # type: ignore[operator]
    for (k, a), (_, b) in zip(module.named_parameters(), fresh.named_parameters(), strict=True):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("name", [n for n in NAMES if n != "identity"])
def test_affine_off_leaves_no_per_feature_parameters(name: str) -> None:
    module = make_norm(name, **{_affine_flag(name): False})
    # Only scalars (DyT/Derf alpha, FRN eps), a fused activation's parameters (FRN tau) and
    # statistics fitted by an auxiliary loss (Batchless mean/std) remain.
    kept = set(spec_of(name).activation_params) | set(spec_of(name).aux_params)
    assert all(p.numel() == 1 or pname in kept for pname, p in module.named_parameters())
    x = make_input(module, 3)
    assert module(x).shape == x.shape


# --------------------------------------------------------------------------------------------
# Errors: clear ValueErrors that name the module and the values, never a NaN or a deep crash.


@pytest.mark.parametrize(
    "name", [n for n in NAMES if "eps" in inspect.signature(normlab.get_norm_layer(n)).parameters]
)
@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan")])
def test_nonpositive_eps_fails_at_construction(name: str, eps: float) -> None:
    with pytest.raises(ValueError, match=r"eps must be a finite number > 0"):
        make_norm(name, eps=eps)


@pytest.mark.parametrize("name", NAMES)
def test_bad_num_features_fails_at_construction(name: str) -> None:
    for bad in (0, -3):
        with pytest.raises(ValueError, match="num_features"):
            make_norm(name, bad)


@pytest.mark.parametrize("name", NAMES)
def test_wrong_feature_size_names_expected_and_actual(name: str) -> None:
    module = make_norm(name, 6)
    wrong = make_input(make_norm(name, 9), 3)
    with pytest.raises(ValueError, match=r"expected 6 features .* got 9"):
        module(wrong)


@pytest.mark.parametrize("name", NAMES)
def test_integer_input_is_refused(name: str) -> None:
    module = make_norm(name)
    x = make_input(module, 3).long()
    with pytest.raises(ValueError, match="floating-point"):
        module(x)


def test_too_few_dimensions_names_the_shape() -> None:
    with pytest.raises(ValueError, match=r"InstanceNorm: expected an input with at least 3 dimensions"):
        normlab.InstanceNorm(4)(torch.randn(2, 4))


def test_group_count_must_divide_channels() -> None:
    with pytest.raises(ValueError, match=r"num_features \(10\) must be divisible by num_groups \(3\)"):
        normlab.GroupNorm(10, num_groups=3)


def test_groupnorm_single_value_groups_raise() -> None:
    with pytest.raises(ValueError, match="single value"):
        normlab.GroupNorm(4, num_groups=4)(torch.randn(2, 4))


def test_instancenorm_one_spatial_element_raises_in_training_only() -> None:
    norm = normlab.InstanceNorm(4, track_running_stats=True)
    with pytest.raises(ValueError, match=r"more than 1 spatial element.*\(3, 4, 1\)"):
        norm(torch.randn(3, 4, 1))
    assert torch.isfinite(norm.eval()(torch.randn(3, 4, 1))).all()


def test_errors_name_the_layer_inside_a_model() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.ReLU(), normlab.BatchNorm(4)))
    assert normlab.label_modules(model) == 1
    with pytest.raises(
        ValueError, match=r"BatchNorm '1\.1': expected more than 1 value per channel.*\(1, 4\)"
    ):
        model(torch.randn(1, 3))


def test_option_validation() -> None:
    with pytest.raises(ValueError, match="eps_mode"):
        normlab.RMSNorm(8, eps_mode="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"p \(partial fraction\)"):
        normlab.RMSNorm(8, p=1.5)
    with pytest.raises(ValueError, match="momentum"):
        normlab.BatchNorm(8, momentum=1.5)
    with pytest.raises(ValueError, match="layer_idx"):
        normlab.LayerNormScaling(8, layer_idx=-1)
    with pytest.raises(ValueError, match="base"):
        normlab.LayerNormScaling(8, layer_idx=0, base="batchnorm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="channels_first"):
        normlab.LayerNorm((4, 4), channels_first=True)
