"""normlab.convert on torch and normlab models: exactness, selection, state, revert, LNS, DyT fold, CLI."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import normlab
from normlab.cli import main
from normlab.convert import (
    UnsupportedNormError,
    apply_layernorm_scaling,
    convert_norms,
    find_blocks,
    fold_dyt,
    load_converted,
    read_norm,
    remove_layernorm_scaling,
    revert,
)
from normlab.models import GPT, GPTConfig, save_checkpoint


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].device == b[k].device and torch.equal(a[k], b[k]) for k in a
    )


def _randomize(model: nn.Module) -> None:
    """Norm weights away from 1 and biases away from 0, so a dropped or wrong copy shows."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("weight", "bias")) and p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if name.endswith("weight") else 0.0))


class Tower(nn.Module):
    """Norms under attributes, Sequential, ModuleList and ModuleDict, and one shared twice."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU()) for _ in range(3)
        )
        self.heads = nn.ModuleDict({"a": nn.LayerNorm(d, eps=1e-6), "b": nn.LayerNorm(d, bias=False)})
        self.shared = nn.LayerNorm(d)
        self.shared_again = self.shared  # the same module under two names

    def forward(self, x: Tensor) -> Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = x + block(x)
        x = self.shared(x) + self.shared_again(x)
        return self.heads["a"](x) + self.heads["b"](x)


# --------------------------------------------------------------------------------------------
# Exactness


def test_layernorm_and_rmsnorm_between_normlab_classes_are_bit_identical() -> None:
    """normlab LayerNorm/RMSNorm <-> LayerNormScaling compute through the same function: same bits."""
    x = torch.randn(4, 7, 16) * 3 + 1
    cases = [
        (normlab.LayerNorm(16, eps=1e-6), "lns", {"layer_idx": 0}),
        (normlab.LayerNormScaling(16, layer_idx=0, eps=1e-6), "layernorm", {}),
        (normlab.RMSNorm(16), "lns", {"layer_idx": 0}),
        (normlab.LayerNormScaling(16, layer_idx=0, base="rmsnorm"), "rmsnorm", {}),
        (normlab.LayerNormScaling(16, layer_idx=3, base="rmsnorm"), "rmsnorm", {}),  # w/2 folded
        (normlab.LayerNormScaling(16, layer_idx=8), "layernorm", {}),  # w/3, b/3 folded
    ]
    for source, target, kwargs in cases:
        model = nn.Sequential(source)
        _randomize(model)
        ref = model(x)
        report = convert_norms(model, target, where="0", **kwargs)
        assert report.replaced[0].relation == "exact", (source, target)
        assert type(model[0]) is normlab.get_norm_layer(target)
        assert torch.equal(model(x), ref), (source, target)


def test_torch_layernorm_and_rmsnorm_to_normlab_are_exact_within_fp32() -> None:
    x = torch.randn(4, 7, 16) * 3 + 1
    for source, target in [
        (nn.LayerNorm(16, eps=1e-6), "layernorm"),
        (nn.LayerNorm(16, bias=False), "layernorm"),
        (nn.RMSNorm(16, eps=1e-5), "rmsnorm"),
        (nn.RMSNorm(16), "rmsnorm"),  # eps=None: finfo(dtype).eps at run time, kept as None
    ]:
        model = nn.Sequential(source)
        _randomize(model)
        ref = model(x)
        report = convert_norms(model, target)
        assert report.replaced[0].relation == "exact"
        has_bias = getattr(source, "bias", None) is not None
        assert report.replaced[0].shared == (["weight", "bias"] if has_bias else ["weight"])
        # normlab may run its own fused kernel instead of torch's: equal up to fp32 rounding
        torch.testing.assert_close(model(x), ref, rtol=1e-6, atol=2e-6)


def test_normlab_layernorm_scaling_to_its_base_is_exact_within_fp32() -> None:
    x = torch.randn(4, 16) * 2
    lns = normlab.LayerNormScaling(16, layer_idx=3, base="rmsnorm")
    model = nn.Sequential(lns)
    _randomize(model)
    ref = model(x)
    report = convert_norms(model, "rmsnorm")
    assert report.replaced[0].relation == "exact"
    assert report.replaced[0].copied == {"weight": "weight x 0.5"}
    torch.testing.assert_close(model(x), ref, rtol=1e-6, atol=1e-6)


def test_layernorm_to_rmsnorm_equal_on_zero_mean_inputs() -> None:
    x = torch.randn(8, 16) * 2
    x = x - x.mean(-1, keepdim=True)
    for ln, kwargs in [(nn.LayerNorm(16, bias=False), {}), (nn.LayerNorm(16), {"bias": True})]:
        model = nn.Sequential(ln)
        _randomize(model)
        ref = model(x)
        report = convert_norms(model, "rmsnorm", **kwargs)
        assert report.replaced[0].relation == "exact on zero-mean inputs"
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    # with its bias dropped the function changes, and the report says so
    model = nn.Sequential(nn.LayerNorm(16))
    report = convert_norms(model, "rmsnorm")
    assert report.replaced[0].relation.startswith("approximate") and report.replaced[0].dropped == ["bias"]


class GemmaRMSNorm(nn.Module):
    """Hugging Face's Gemma RMSNorm (transformers/models/gemma/modeling_gemma.py): x * (1 + w), w init 0."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)


class LlamaRMSNorm(nn.Module):
    """Hugging Face's LLaMA RMSNorm: weight * x / rms(x), ``variance_epsilon``."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(x.dtype)


class LayerNorm2d(nn.LayerNorm):
    """timm's / torchvision's channels-first LayerNorm (a permute around nn.LayerNorm)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(
            x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps
        ).permute(0, 3, 1, 2)


class OddRMSNorm(LlamaRMSNorm):
    """Named like an RMSNorm but computes something else: must be refused, not misread."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * 2 + 1


@pytest.mark.parametrize("gemma_weight", ["zeros", "random"])
def test_foreign_rmsnorms_by_class_name_and_gemma_one_plus_w(gemma_weight: str) -> None:
    x = torch.randn(3, 5, 16)
    gemma = GemmaRMSNorm(16)
    if gemma_weight == "random":
        with torch.no_grad():
            gemma.weight.normal_(0, 0.3)
    info = read_norm(gemma)
    assert info is not None and info.weight_offset == 1.0 and info.eps == 1e-6
    model = nn.Sequential(gemma, LlamaRMSNorm(16, eps=1e-5))
    ref = model(x)
    report = convert_norms(model, "rmsnorm")
    assert [r.relation for r in report.replaced] == ["exact", "exact"]
    assert report.replaced[0].copied == {"weight": "1 + weight"}
    assert report.replaced[1].shared == ["weight"]  # LLaMA's weight object is carried over
    assert model[1].eps == 1e-5
    torch.testing.assert_close(model(x), ref, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(model[0].weight, 1 + gemma.weight.detach())


def test_channels_first_layernorm_subclass_is_read_and_checked() -> None:
    x = torch.randn(2, 8, 5, 5)
    model = nn.Sequential(nn.Conv2d(8, 8, 1), LayerNorm2d(8, eps=1e-6))
    _randomize(model)
    ref = model(x)
    report = convert_norms(model, "layernorm")
    assert report.replaced[0].options["channels_first"] is True
    assert report.replaced[0].relation == "exact"
    torch.testing.assert_close(model(x), ref, rtol=1e-6, atol=1e-6)


def test_a_norm_whose_output_disagrees_is_refused_with_the_difference() -> None:
    model = nn.Sequential(OddRMSNorm(8))
    with pytest.raises(UnsupportedNormError, match="matches no reading normlab has"):
        read_norm(model[0])
    with pytest.raises(ValueError, match=r"(?s)nothing was changed.*OddRMSNorm '0'.*matches no reading"):
        convert_norms(model, "dyt")
    report = convert_norms(model, "dyt", strict=False)
    assert len(report) == 0 and report.skipped[0].reason.startswith("unsupported")
    assert type(model[0]) is OddRMSNorm


# --------------------------------------------------------------------------------------------
# Where, sharing, state, reports


def test_every_container_and_a_shared_module_which_stays_shared() -> None:
    model = Tower()
    _randomize(model)
    x = torch.randn(3, 16)
    ref = model(x)
    report = convert_norms(model, "layernorm")  # torch LN -> normlab LN: the same function
    names = {n for r in report.replaced for n in r.names}
    assert names == {"blocks.0.0", "blocks.1.0", "blocks.2.0", "heads.a", "heads.b", "shared", "shared_again"}
    assert len(report) == 6
    assert model.shared is model.shared_again and type(model.shared) is normlab.LayerNorm
    assert model.heads["a"].eps == 1e-6 and model.heads["b"].bias is None
    torch.testing.assert_close(model(x), ref, rtol=1e-6, atol=1e-5)


def test_where_patterns_depths_types_callables() -> None:
    model = Tower()
    assert find_blocks(model) is not None and find_blocks(model).name == "blocks"  # type: ignore[union-attr]

    def converted(where: object) -> set[str]:
        m = copy.deepcopy(model)
        return {r.name for r in convert_norms(m, "dyt", where=where, dry_run=True).replaced}  # type: ignore[arg-type]

    assert converted("blocks.0-1") == {"blocks.0.0", "blocks.1.0"}
    assert converted("0-1") == {"blocks.0.0", "blocks.1.0"}
    assert converted(range(1, 3)) == {"blocks.1.0", "blocks.2.0"}
    assert converted("heads.*") == {"heads.a", "heads.b"}
    assert converted("**.b") == {"heads.b"}
    assert converted(["heads.a", "2"]) == {"heads.a", "blocks.2.0"}
    assert converted(lambda name, m: getattr(m, "eps", None) == 1e-6) == {"heads.a"}
    assert converted(nn.LayerNorm) == converted(None)
    assert converted("shared_again") == {"shared"}  # a shared module is selected by any of its names
    with pytest.raises(ValueError, match="empty range"):
        converted("blocks.3-1")
    with pytest.raises(ValueError, match="where must be"):
        converted(3.5)


def test_batchnorm_is_left_alone_for_dyt_unless_selected() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(72, 4), nn.LayerNorm(4)
    )
    report = convert_norms(model, "dyt", dry_run=True)
    assert [r.name for r in report.replaced] == ["4"]
    assert report.skipped[0].names == ("1",) and "left alone" in report.skipped[0].reason
    report = convert_norms(model, "dyt", where=nn.BatchNorm2d)
    assert type(model[1]) is normlab.DyT and model[1].channels_first
    assert report.replaced[0].dropped == ["running_mean", "running_var", "num_batches_tracked"]


def test_device_dtype_requires_grad_and_mode_are_kept() -> None:
    ln = nn.LayerNorm(8, dtype=torch.float64)
    ln.weight.requires_grad_(False)
    bn = nn.BatchNorm1d(8)
    model = nn.Sequential(ln, bn).eval()
    convert_norms(model, "dyt", where="0")
    convert_norms(model, "groupnorm", num_groups=2)
    dyt, gn = model[0], model[1]
    assert dyt.weight.dtype == torch.float64 and dyt.alpha.dtype == torch.float64
    assert not dyt.weight.requires_grad and dyt.bias.requires_grad  # each flag follows its source
    assert not dyt.training and not gn.training and gn.num_groups == 2
    bf = nn.Sequential(nn.RMSNorm(8, dtype=torch.bfloat16))
    convert_norms(bf, "rmsnorm")
    assert (
        bf[0].weight.dtype == torch.bfloat16
        and bf(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16
    )


def test_meta_device_models_convert_without_running_anything() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), LlamaRMSNorm(8), nn.BatchNorm1d(8))
    report = convert_norms(model, "dyt", where=["1", "2"])
    assert [r.target for r in report.replaced] == ["DyT", "DyT"]
    assert all(p.device.type == "meta" for p in model.parameters())
    convert_norms(model, "groupnorm", num_groups=4)
    assert model[3].weight.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_models_stay_on_their_device() -> None:
    model = _gpt().cuda()
    before = _state(model)
    idx = torch.randint(0, 32, (2, 9), device="cuda")
    ref = model(idx).logits
    report = convert_norms(model, "rmsnorm", bias=True)
    assert all(p.is_cuda for p in model.parameters())
    model(idx).logits.sum().backward()
    revert(model, report)
    assert _same_state(before, _state(model)) and torch.equal(model(idx).logits, ref)


def test_a_second_call_is_a_no_op_and_dry_run_changes_nothing() -> None:
    model = Tower()
    before = _state(model)
    report = convert_norms(model, "dyt", dry_run=True)
    assert len(report) == 6 and report.dry_run and "would replace 6" in str(report)
    assert _same_state(before, _state(model)) and type(model.shared) is nn.LayerNorm
    with pytest.raises(ValueError, match="dry run"):
        revert(model, report)
    convert_norms(model, "dyt")
    after = _state(model)
    again = convert_norms(model, "dyt")
    assert len(again) == 0 and {s.reason for s in again.skipped} == {"already dyt"}
    assert _same_state(after, _state(model))


def test_strict_refuses_what_it_cannot_do_and_changes_nothing() -> None:
    model = nn.Sequential(nn.LayerNorm(8), nn.LayerNorm((4, 8)))
    with pytest.raises(ValueError, match=r"LayerNorm '1'.*2 trailing dimensions"):
        convert_norms(model, "dyt")
    assert type(model[0]) is nn.LayerNorm
    report = convert_norms(model, "dyt", strict=False)
    assert [r.name for r in report.replaced] == ["0"] and report.skipped[0].reason.startswith("refused")
    with pytest.raises(ValueError, match="GroupNorm normalizes dimension 1"):
        convert_norms(nn.Sequential(nn.LayerNorm(8)), "groupnorm", where="0")
    with pytest.raises(ValueError, match="unknown norm 'dyyt'"):
        convert_norms(model, "dyyt")
    with pytest.raises(ValueError, match="the model itself is a norm"):
        convert_norms(nn.LayerNorm(8), "dyt")


def test_report_lists_what_was_copied_new_and_dropped() -> None:
    model = nn.Sequential(nn.LayerNorm(8), nn.RMSNorm(8))
    report = convert_norms(model, normlab.DyT, alpha_init=0.8)  # a registered class works as a name
    ln, rms = report.replaced
    assert (ln.source, ln.target, ln.relation) == ("LayerNorm", "DyT", "approximate: new function")
    assert ln.copied == {"weight": "weight", "bias": "bias"} and ln.new == {"alpha": "0.8"}
    assert rms.copied == {"weight": "weight"} and rms.options["bias"] is False  # LLaMA-style DyT
    data = json.loads(json.dumps(report.to_dict()))
    assert data["replaced"][0]["names"] == ["0"] and data["recipe"]["norm_kwargs"] == {"alpha_init": 0.8}
    text = str(report)
    assert (
        "convert_norms -> dyt: replaced 2 norms" in text
        and "LayerNorm -> DyT" in text
        and "alpha=0.8" in text
    )


def test_revert_restores_the_state_dict_exactly_and_keeps_training() -> None:
    model = Tower()
    _randomize(model)
    before = _state(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    report = convert_norms(model, "rmsnorm", bias=True)
    model(torch.randn(2, 16)).sum().backward()  # the shared weights still reach the optimizer
    assert model.shared.weight.grad is not None
    revert(model, report)
    assert _same_state(before, _state(model)) and model.shared is model.shared_again
    # a trained conversion hands its shared tensors back
    report = convert_norms(model, "layernorm")
    model(torch.randn(2, 16)).sum().backward()
    optimizer.step()
    trained = model.heads["a"].weight.detach().clone()
    revert(model, report)
    assert torch.equal(model.heads["a"].weight, trained) and type(model.heads["a"]) is nn.LayerNorm
    with pytest.raises(ValueError, match="already reverted"):
        revert(model, report)


def test_revert_follows_dtype_and_mode_and_refuses_out_of_order() -> None:
    model = nn.Sequential(nn.LayerNorm(8), nn.BatchNorm1d(8))
    first = convert_norms(model, "dyt")
    second = convert_norms(model, "rmsnorm", where="0")
    with pytest.raises(ValueError, match="later conversion must be reverted first"):
        revert(model, first)
    revert(model, second)
    model.double().eval()
    revert(model, first)
    assert model[0].weight.dtype == torch.float64 and not model[0].training and type(model[0]) is nn.LayerNorm


# --------------------------------------------------------------------------------------------
# normlab GPT: LNS, DyT fold


def _gpt(**kw: object) -> GPT:
    cfg = {"vocab_size": 32, "block_size": 16, "n_layer": 3, "n_head": 2, "n_embd": 16, **kw}
    return GPT(GPTConfig(**cfg))  # type: ignore[arg-type]


def test_apply_layernorm_scaling_equals_the_lns_placement_and_is_removable() -> None:
    idx = torch.randint(0, 32, (2, 9))
    pre, lns = _gpt(), _gpt(placement="lns")
    _randomize(pre)
    lns.load_state_dict(pre.state_dict())
    ref = pre(idx).logits
    scaled = apply_layernorm_scaling(pre)
    assert scaled["blocks.2.norm_mlp"] == pytest.approx(3**-0.5) and "final_norm" not in str(scaled)
    assert torch.equal(pre(idx).logits, lns(idx).logits)
    assert apply_layernorm_scaling(pre) == scaled  # second call: nothing added
    with pytest.raises(ValueError, match="already scaled by apply_layernorm_scaling"):
        convert_norms(pre, "lns", where="blocks")
    report = convert_norms(pre, "rmsnorm", where="blocks.1")  # the LNS hooks move with the norms
    assert type(pre.blocks[1].norm_attn) is normlab.RMSNorm
    assert next(iter(pre.blocks[1].norm_attn._forward_hooks.values())).layer_idx == 1
    revert(pre, report)
    assert torch.equal(copy.deepcopy(pre)(idx).logits, lns(idx).logits)
    assert torch.equal(pickle.loads(pickle.dumps(pre))(idx).logits, lns(idx).logits)
    assert remove_layernorm_scaling(pre) == 6
    assert torch.equal(pre(idx).logits, ref)
    with pytest.raises(ValueError, match="already applies LayerNorm Scaling"):
        apply_layernorm_scaling(lns)
    with pytest.raises(ValueError, match="placement 'post', not Pre-LN"):
        apply_layernorm_scaling(_gpt(placement="post"))


def test_convert_to_lns_uses_the_block_index_and_refuses_the_final_norm() -> None:
    idx = torch.randint(0, 32, (2, 9))
    model, reference = _gpt(), _gpt(placement="lns")
    _randomize(model)
    reference.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match="'final_norm' is not inside the block stack 'blocks'"):
        convert_norms(model, "lns")
    report = convert_norms(model, "lns", where="blocks")
    assert [r.depth for r in report.replaced] == [0, 0, 1, 1, 2, 2]
    assert model.blocks[2].norm_attn.layer_idx == 2 and model.blocks[2].norm_attn.base == "layernorm"
    torch.testing.assert_close(model(idx).logits, reference(idx).logits, rtol=1e-5, atol=1e-5)
    report = convert_norms(model, "lns", where="final_norm", layer_idx=0)
    assert report.replaced[0].relation == "exact"


def test_fold_dyt_into_the_following_linears() -> None:
    idx = torch.randint(0, 32, (2, 9))
    model = _gpt(norm="dyt", tie_weights=False)
    _randomize(model)
    ref = model(idx).logits
    report = fold_dyt(model)
    assert report.folded["blocks.0.norm_attn"] == (
        "blocks.0.attn.q_proj",
        "blocks.0.attn.k_proj",
        "blocks.0.attn.v_proj",
    )
    assert report.folded["blocks.1.norm_mlp"] == ("blocks.1.mlp.fc1",) and report.folded["final_norm"] == (
        "lm_head",
    )
    assert model.blocks[0].norm_attn.weight is None and model.lm_head.bias is not None
    torch.testing.assert_close(model(idx).logits, ref, rtol=1e-5, atol=1e-5)
    assert fold_dyt(model).folded == {}  # nothing left to fold

    tied = _gpt(norm="dyt")
    apply_layernorm_scaling(tied)
    refused = fold_dyt(tied).refused
    assert "tied" in refused["final_norm"] and "forward hooks" in refused["blocks.0.norm_attn"]
    seq = nn.Sequential(
        normlab.DyT(8), nn.Linear(8, 4), normlab.DyT(4), nn.ReLU(), normlab.DyT(4, channels_first=True)
    )
    _randomize(seq)
    x = torch.randn(3, 8)
    ref = seq[:4](x)
    report = fold_dyt(seq)
    assert report.folded == {"0": ("1",)}
    assert "not an nn.Linear" in report.refused["2"] and "channels-first" in report.refused["4"]
    torch.testing.assert_close(seq[:4](x), ref, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Command line


def test_cli_converts_a_checkpoint_and_writes_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _gpt()
    _randomize(model)
    ckpt = save_checkpoint(model, tmp_path / "gpt.pt")
    out = tmp_path / "dyt.pt"
    assert (
        main(
            [
                "convert",
                str(ckpt),
                "--to",
                "dyt",
                "--where",
                "blocks.0-1",
                "--set",
                "alpha_init=0.8",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "replaced 4 norms" in printed and "blocks.1.norm_mlp" in printed
    report = json.loads((tmp_path / "dyt.pt.report.json").read_text())
    assert len(report["convert_norms"]["replaced"]) == 4
    loaded, payload = load_converted(out)
    assert (
        type(loaded.blocks[1].norm_mlp) is normlab.DyT
        and type(loaded.blocks[2].norm_mlp) is normlab.LayerNorm
    )
    assert loaded.blocks[0].norm_attn.alpha.item() == pytest.approx(0.8)
    convert_norms(model, "dyt", where="blocks.0-1", alpha_init=0.8)
    assert _same_state(_state(model), _state(loaded))
    # converting the converted checkpoint again accumulates the steps
    out2 = tmp_path / "lns.pt"
    assert main(["convert", str(out), "--lns", "--out", str(out2), "--report", str(tmp_path / "r.json")]) == 0
    again, payload = load_converted(out2)
    assert [s["op"] for s in payload["steps"]] == ["convert_norms", "apply_layernorm_scaling"]
    idx = torch.randint(0, 32, (2, 5))
    apply_layernorm_scaling(model)
    assert torch.equal(again(idx).logits, model(idx).logits)


def test_cli_errors_and_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", "gpt:n_layer=2,n_embd=16,n_head=2", "--to", "dyt", "--dry-run"]) == 0
    assert "would replace 5 norms" in capsys.readouterr().out
    assert main(["convert", "gpt:n_layer=2,n_embd=16,n_head=2", "--to", "dyt"]) == 2
    assert "--out PATH is required" in capsys.readouterr().err
    assert (
        main(["convert", "gpt:n_layer=2,n_embd=16,n_head=2", "--to", "lns", "--out", str(tmp_path / "x.pt")])
        == 2
    )
    assert "not inside the block stack" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
