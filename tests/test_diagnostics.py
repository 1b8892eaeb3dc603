"""normlab.diagnostics: known answers, the probes leave the model untouched, blocks, removal, findings."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import normlab
from normlab.diagnostics import (
    Capture,
    Diagnosis,
    LayerStats,
    ModelInfo,
    ModelUpdateTracker,
    NonFiniteWatch,
    angular_distances,
    count_hooks,
    diagnose,
    dyt_alpha_relation,
    find_blocks,
    find_nonfinite,
    layer_stats,
    lm_inputs,
    metrics,
    removal_sensitivity,
    removed_block,
    residual_stream,
    select_modules,
    strip_prefixes,
    verdicts,
)
from normlab.diagnostics.depth import AngularDistances, Removal, ResidualStream
from normlab.diagnostics.findings import quarter_ratio
from normlab.models import GPT, GPTConfig


def tiny_gpt(**kw: object) -> GPT:
    cfg: dict[str, object] = {"vocab_size": 32, "block_size": 16, "n_layer": 3, "n_embd": 16, "n_head": 2}
    cfg.update(kw)
    return GPT(GPTConfig(**cfg))  # type: ignore[arg-type]


def tokens(b: int = 4, t: int = 9, vocab: int = 32) -> Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(1))


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = normlab.BatchNorm(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(F.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))
        return out


# ------------------------------------------------------------------------------------------
# Known answers


def test_angular_distance_known_answers() -> None:
    a = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0], [0.0, 0.0, 0.0]])
    b = torch.tensor([[5.0, 0.0, 0.0], [7.0, 0.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
    d = metrics.angular_distance(a, b)
    assert d.tolist() == pytest.approx([0.0, 0.5, 1.0, 0.5], abs=1e-12)  # zero vector -> 0.5
    assert metrics.block_influence(a[:3], b[:3]) == pytest.approx(1.0 - (1 + 0 - 1) / 3)


def test_stable_rank_and_act_corr_known_answers() -> None:
    n = 6
    ortho = torch.eye(n, 10) * torch.arange(1.0, n + 1)[:, None]  # orthogonal rows, any norms
    assert metrics.stable_rank(ortho) == pytest.approx(n, abs=1e-9)
    assert metrics.act_corr(ortho) == pytest.approx(0.0, abs=1e-12)
    same = torch.randn(1, 3, 4, 4).repeat(n, 1, 1, 1) * torch.arange(1.0, n + 1)[:, None, None, None]
    assert metrics.stable_rank(same) == pytest.approx(1.0, abs=1e-9)
    assert metrics.act_corr(same) == pytest.approx(1.0, abs=1e-9)
    assert math.isnan(metrics.act_corr(same[:1]))


def test_act_var_matches_the_beyond_bn_probe() -> None:
    m = torch.randn(5, 4, 3, 3) * torch.tensor([1.0, 2.0, 3.0, 4.0])[:, None, None]
    assert metrics.act_var(m, channel_dim=1) == pytest.approx(float(m.var(dim=[0, 2, 3]).mean()), rel=1e-6)
    seq = torch.randn(2, 7, 5)
    assert metrics.act_var(seq, channel_dim=-1) == pytest.approx(float(seq.var(dim=[0, 1]).mean()), rel=1e-6)
    assert metrics.residual_variance(seq) == pytest.approx(float(seq.var()), rel=1e-6)


def test_layer_stats_equal_a_manual_computation() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(10, 4), torch.randn(10, 3)

    def loss_fn(out: Tensor) -> Tensor:
        return F.mse_loss(out, y)

    stats = layer_stats(model, x, layers=nn.Linear, loss_fn=loss_fn)
    assert [s.name for s in stats] == ["0", "2"]
    # by hand
    h1 = model[0](x)
    out = model[2](model[1](h1))
    h1_, out_ = h1.detach(), out.detach()
    loss = loss_fn(out)
    g_h1, g_out, *pgrads = torch.autograd.grad(loss, [h1, out, *model.parameters()])
    w0 = float(pgrads[0].norm())  # weight matrix only
    p0 = math.sqrt(sum(float(g.pow(2).sum()) for g in pgrads[:2]))  # weight and bias
    w2 = float(pgrads[2].norm())
    s0, s2 = stats
    assert s0.act_var == pytest.approx(float(h1_.var(dim=0).mean()), rel=1e-5)
    assert s2.act_var == pytest.approx(float(out_.var(dim=0).mean()), rel=1e-5)
    assert s0.act_grad_norm == pytest.approx(float(g_h1.norm()), rel=1e-5)
    assert s2.act_grad_norm == pytest.approx(float(g_out.norm()), rel=1e-5)
    assert s0.weight_grad_norm == pytest.approx(w0, rel=1e-5)
    assert s0.param_grad_norm == pytest.approx(p0, rel=1e-5) and p0 > w0
    assert s2.weight_grad_norm == pytest.approx(w2, rel=1e-5)
    assert s0.num_params == 4 * 6 + 6 and s0.shape == [10, 6]
    assert all(p.grad is None for p in model.parameters())  # autograd.grad, not .backward()


# ------------------------------------------------------------------------------------------
# The probes change nothing


def _train_step(model: nn.Module, idx: Tensor, ctx: object) -> tuple[Tensor, list[Tensor]]:
    torch.manual_seed(7)
    model.zero_grad(set_to_none=True)
    with ctx:  # type: ignore[attr-defined]
        out = model(idx[:, :-1], idx[:, 1:])
        out.loss.backward()
    return out.logits.detach().clone(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_capture_changes_no_output_or_gradient_bit_for_bit() -> None:
    model = tiny_gpt(dropout=0.1)  # dropout: same seed must give the same masks with hooks on
    idx = tokens()
    ref_out, ref_grads = _train_step(model, idx, torch.enable_grad())
    cap = Capture(model, "blocks", inputs=True, output_grads=True)
    out, grads = _train_step(model, idx, cap)
    assert torch.equal(out, ref_out)
    assert len(grads) == len(ref_grads) and all(
        torch.equal(a, b) for a, b in zip(grads, ref_grads, strict=True)
    )
    assert cap.num_hooks == 0 and count_hooks(model) == 0
    # what was captured: detached CPU floats, one per call, with gradients
    first = cap.outputs["blocks.0"][0]
    assert not first.requires_grad and first.device.type == "cpu" and first.dtype == torch.float32
    assert cap.output_grad("blocks.2") is not None and cap.output_grad("blocks.2").shape == first.shape  # type: ignore[union-attr]
    out2, _ = _train_step(model, idx, NonFiniteWatch(model))
    assert torch.equal(out2, ref_out) and count_hooks(model) == 0


def test_hooks_are_removed_after_an_error() -> None:
    model = tiny_gpt()
    with pytest.raises(ValueError, match="token ids"), Capture(model, "blocks", output_grads=True):
        model(torch.full((1, 4), 99))
    assert count_hooks(model) == 0


@pytest.mark.parametrize("mode", ["train", "eval", "no_grad"])
def test_diagnose_leaves_the_model_as_it_was(mode: str) -> None:
    model = ConvBN()
    model.train(mode != "eval")
    x = torch.randn(6, 3, 5, 5)
    y = torch.randint(0, 5, (6,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()

    def loss_fn(out: Tensor) -> Tensor:
        return F.cross_entropy(out, y)

    ctx = torch.no_grad() if mode == "no_grad" else torch.enable_grad()
    with ctx:
        report = diagnose(model, x, layers=(nn.Conv2d, nn.Linear), loss_fn=loss_fn)
        diagnose(model, x, loss_fn=loss_fn, train=mode == "eval", removal=False)  # the other mode
    assert [s.name for s in report.layers] == ["conv", "head"]
    assert all(math.isfinite(s.weight_grad_norm) for s in report.layers)  # gradients even under no_grad
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats and counter untouched
    assert int(after["bn.num_batches_tracked"]) == 0
    assert model.training == (mode != "eval") and model.bn.training == (mode != "eval")
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert count_hooks(model) == 0


def test_a_hooked_train_forward_updates_batchnorm_exactly_as_without_hooks() -> None:
    x = torch.randn(6, 3, 5, 5)
    plain, hooked = ConvBN(), ConvBN()
    hooked.load_state_dict(plain.state_dict())
    plain(x)
    with Capture(hooked, (nn.Conv2d, nn.BatchNorm2d), inputs=True):
        hooked(x)
    assert all(
        torch.equal(a, b)
        for a, b in zip(plain.state_dict().values(), hooked.state_dict().values(), strict=True)
    )


# ------------------------------------------------------------------------------------------
# Finding modules


class _Wrap(nn.Module):
    def __init__(self, inner: nn.Module, attr: str) -> None:
        super().__init__()
        self.add_module(attr, inner)


class BasicBlock(nn.Module):  # the torchvision/timm class name
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.conv(x))


class Stage(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x)


class TinyResNet(nn.Module):
    def __init__(self, block: type[nn.Module]) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.layer1 = nn.Sequential(block(4), block(4))
        self.layer2 = nn.Sequential(block(4))
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.fc(self.layer2(self.layer1(self.stem(x))).mean(dim=(2, 3)))
        return out


def test_find_blocks_and_prefix_stripping() -> None:
    gpt = tiny_gpt()
    assert [n for n, _ in find_blocks(gpt)] == ["blocks.0", "blocks.1", "blocks.2"]
    wrapped = _Wrap(_Wrap(gpt, "_orig_mod"), "module")  # DDP around torch.compile
    names = [strip_prefixes(n) for n, _ in find_blocks(wrapped)]
    assert names == ["blocks.0", "blocks.1", "blocks.2"]
    assert strip_prefixes("module._orig_mod.blocks.0._orig_mod.attn") == "blocks.0.attn"
    assert [n for n, _ in select_modules(wrapped, "blocks.*.mlp")] == [
        f"module._orig_mod.blocks.{i}.mlp" for i in range(3)
    ]
    assert len(select_modules(gpt, "re:blocks\\.[01]")) == 2
    for block in (BasicBlock, Stage):
        assert [n for n, _ in find_blocks(TinyResNet(block))] == ["layer1.0", "layer1.1", "layer2.0"]
    with pytest.raises(ValueError, match="no residual blocks found in Sequential"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="no module of GPT matches 'nothing'"):
        select_modules(gpt, "nothing")


def test_diagnose_on_a_resnet_records_failed_removals() -> None:
    model = TinyResNet(BasicBlock)
    report = diagnose(model, torch.randn(4, 3, 6, 6), loss_fn=lambda out: out.pow(2).mean())
    assert report.model.block_names == ["layer1.0", "layer1.1", "layer2.0"]
    assert report.angular is not None and report.angular.rows == "samples"
    assert report.removal is not None and all(math.isfinite(d) for d in report.removal.delta)
    assert report.model.num_blocks == 3 and count_hooks(model) == 0


# ------------------------------------------------------------------------------------------
# Depth probes


def test_residual_stream_matches_output_hidden_states() -> None:
    model = tiny_gpt()
    idx = tokens()
    hidden = residual_stream(model, lm_inputs(model, idx))
    ref = model(idx[:, :-1], output_hidden_states=True).hidden_states
    assert len(hidden) == len(ref) == 4
    assert all(torch.equal(h, r) for h, r in zip(hidden, ref, strict=True))


def test_angular_table_shape_and_identity_block() -> None:
    x = torch.randn(3, 5, 4)
    hidden = [x, x.clone(), -x, torch.randn(3, 5, 4)]
    table = angular_distances(hidden)
    assert table.max_n == 3 and len(table.last_token) == 3 and len(table.last_token[0]) == 3
    assert table.adjacent()[:2] == pytest.approx([0.0, 1.0], abs=1e-6)
    assert math.isnan(table.last_token[2][1]) and math.isnan(table.all_tokens[1][2])  # l + n > L
    with pytest.raises(ValueError, match=r"max_n must be in \[1, 3\], got 4"):
        angular_distances(hidden, max_n=4)


def _make_identity(block: nn.Module) -> None:
    with torch.no_grad():
        for lin in (block.attn.out_proj, block.mlp.fc2):  # type: ignore[union-attr]
            lin.weight.zero_()
            lin.bias.zero_()


def test_removal_of_an_identity_block_costs_nothing_and_the_model_is_restored() -> None:
    model = tiny_gpt(n_layer=4)
    _make_identity(model.blocks[2])
    batch = lm_inputs(model, tokens())
    blocks_before = list(model.blocks)
    keys_before = list(model.state_dict())
    result = removal_sensitivity(model, batch)
    assert result.delta[2] == 0.0 and all(math.isfinite(d) for d in result.delta)
    assert result.delta[0] != 0.0 and result.errors == [None] * 4
    assert list(model.blocks) == blocks_before and list(model.state_dict()) == keys_before
    with removed_block(model, 1):
        assert len(model.blocks) == 3 and model.blocks[1] is blocks_before[2]
        model(**batch)
    assert list(model.blocks) == blocks_before
    with pytest.raises(RuntimeError, match="boom"), removed_block(model, 0):
        raise RuntimeError("boom")
    assert list(model.blocks) == blocks_before
    with pytest.raises(ValueError, match="index 4 out of range for 4 blocks"), removed_block(model, 4):
        pass


# ------------------------------------------------------------------------------------------
# Non-finite activations, DyT, model update


class _Log(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.log()


class _DivideInForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.b(self.a(x) / 0.0)
        return out


def test_first_nonfinite_activation_is_named() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.Tanh(), _Log()), nn.Linear(3, 2))
    x = torch.randn(64, 3)
    first = find_nonfinite(model, x)
    assert first is not None and first.name == "1.1" and first.where == "output"
    assert first.module_type == "_Log" and first.num_nan > 0
    second = find_nonfinite(_DivideInForward(), torch.randn(4, 3))
    assert second is not None and (second.name, second.where) == ("b", "input")
    assert find_nonfinite(nn.Linear(3, 3), torch.randn(2, 3)) is None
    report = diagnose(model, x, layers=nn.Linear, removal=False)
    assert report.findings[0].code == "nonfinite" and "1.1" in report.findings[0].message


def test_dyt_alpha_against_input_std() -> None:
    model = tiny_gpt(norm="dyt", n_layer=2)
    idx = tokens()
    rel = dyt_alpha_relation(model, lm_inputs(model, idx))
    assert [s.name for s in rel.layers] == [
        "blocks.0.norm_attn",
        "blocks.0.norm_mlp",
        "blocks.1.norm_attn",
        "blocks.1.norm_mlp",
        "final_norm",
    ]
    seen: list[Tensor] = []
    h = model.blocks[1].norm_mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    model(idx[:, :-1])
    h.remove()
    s = rel.layers[3]
    assert s.alpha == pytest.approx(float(model.blocks[1].norm_mlp.alpha.detach()))
    assert s.input_std == pytest.approx(float(seen[0].double().std()), rel=1e-6)
    assert s.alpha_times_std == pytest.approx(s.alpha * s.input_std)
    with pytest.raises(ValueError, match="has no DyT/Derf layer"):
        dyt_alpha_relation(tiny_gpt(), lm_inputs(model, idx))


def test_model_update_tracker() -> None:
    model = tiny_gpt(dropout=0.2)
    model.train()
    batch = lm_inputs(model, tokens())
    tracker = ModelUpdateTracker(model, batch)
    assert tracker.measure().norm == 0.0  # eval passes: dropout off, deterministic
    with torch.no_grad():
        model.blocks[0].mlp.fc2.weight.add_(0.05)
    point = tracker.measure(step=10)
    assert (
        point.step == 10
        and point.norm > 0
        and point.relative == pytest.approx(point.norm / tracker.history.output_norm0)
    )
    assert model.training and [p.step for p in tracker.history.points] == [0, 10]
    assert json.loads(tracker.history.to_json())["points"][1]["step"] == 10


# ------------------------------------------------------------------------------------------
# Report and findings


def test_diagnose_report_is_strict_json() -> None:
    model = tiny_gpt(n_layer=2)
    report = diagnose(model, lm_inputs(model, tokens()), data="random")
    d = json.loads(report.to_json())
    assert d["model"]["block_names"] == ["blocks.0", "blocks.1"]
    assert d["angular"]["last_token"][1][1] is None  # NaN cell -> null
    assert len(d["removal"]["delta"]) == 2 and d["loss_kind"] == "the model's own loss"
    assert {"act_var", "act_corr", "stable_rank", "act_grad_norm", "weight_grad_norm"} <= set(d["layers"][0])


def _report(**kw: object) -> Diagnosis:
    base: dict[str, object] = {
        "model": ModelInfo("M", 0, 0, []),
        "data": "",
        "loss": 1.0,
        "loss_kind": "",
        "layers": [],
    }
    base.update(kw)
    return Diagnosis(**base)  # type: ignore[arg-type]


def _layers(act_var: list[float], grads: list[float] | None = None, corr: float = 0.1) -> list[LayerStats]:
    grads = grads or [1.0] * len(act_var)
    return [
        LayerStats(f"l{i}", "Conv2d", [8, 4], v, corr, 3.0, math.nan, 1.0, g, g, 10)
        for i, (v, g) in enumerate(zip(act_var, grads, strict=True))
    ]


def test_verdicts_name_their_numbers_and_papers() -> None:
    geometric = verdicts(_report(layers=_layers([2.0**i for i in range(10)])))
    assert [f.code for f in geometric] == ["geometric_variance"]
    assert geometric[0].numbers["growth_per_layer"] == pytest.approx(2.0)
    assert "x2 per layer" in geometric[0].message and "2106.05956" in geometric[0].paper
    assert verdicts(_report(layers=_layers([1.0 + i for i in range(10)]))) == []  # linear growth: fine
    vanishing = verdicts(_report(layers=_layers([1.0] * 8, [0.01] * 2 + [1.0] * 6)))
    assert [f.code for f in vanishing] == ["vanishing_gradients"]
    assert vanishing[0].numbers["first_quarter_over_last"] == pytest.approx(0.01)
    exploding = verdicts(_report(layers=_layers([1.0] * 8, [50.0] * 2 + [1.0] * 6)))
    assert [f.code for f in exploding] == ["exploding_gradients"]
    collapse = verdicts(_report(layers=_layers([1.0] * 3, corr=0.95)))
    assert [f.code for f in collapse] == ["sample_collapse"] and "0.950" in collapse[0].message
    assert quarter_ratio([4.0, 1.0, 1.0, 2.0]) == pytest.approx(2.0)


def test_wasted_depth_finding() -> None:
    n = 12
    d = [0.3] * 6 + [0.05] * 6
    table = [d] + [[math.nan] * n for _ in range(n - 1)]
    variance = [0.01] + [0.1 * (1 + i) for i in range(n)]
    report = _report(
        angular=AngularDistances(n, n, table, table, "tokens"),
        residual=ResidualStream(["x"] * (n + 1), variance, variance, [[1]] * (n + 1)),
        removal=Removal(2.0, "", [0.5] * 6 + [0.001, 0.002, 0.5, 0.001, 0.003, 0.002]),
    )
    found = {f.code: f for f in verdicts(report)}
    assert set(found) == {"wasted_depth", "residual_growth"}
    msg = found["wasted_depth"].message
    assert msg.startswith("blocks 9-11 (of 12) change the residual stream by less than 0.05")
    assert "changes the loss by < 0.003" in msg and "LayerNorm Scaling" in msg
    assert found["residual_growth"].numbers["ratio"] == pytest.approx(12.0)
