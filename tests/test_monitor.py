"""NormMonitor in a plain loop, in normlab's Trainer, in Hugging Face's Trainer and in Lightning;
its records, alerts, bad input, detaching, and ``normlab report-monitor``."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import normlab
from normlab.cli import main
from normlab.diagnostics.hooks import count_hooks
from normlab.models import GPT, ConvNet, ConvNetConfig, GPTConfig
from normlab.monitor import (
    LOG_FILE,
    PROBES,
    MonitorThresholds,
    NormAlertError,
    NormMonitor,
    NormMonitorWarning,
    read_log,
)

pytestmark = pytest.mark.usefixtures("one_thread_plain_torch")

VOCAB, SEQ = 32, 16


def gpt(norm: str = "dyt", n_layer: int = 4) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=VOCAB, block_size=SEQ, n_layer=n_layer, n_head=2, n_embd=32, norm=norm))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randint(0, VOCAB, (4, SEQ), generator=g), torch.randint(0, VOCAB, (4, SEQ), generator=g)


def train_loop(
    model: GPT, steps: int, monitor: NormMonitor | None, *, zero_before_step: bool = False
) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(steps):
        idx, tgt = batch(step)
        out = model(idx, tgt)
        assert out.loss is not None
        out.loss.backward()
        opt.step()
        if zero_before_step:
            opt.zero_grad(set_to_none=True)
        if monitor is not None:
            monitor.step()
        opt.zero_grad(set_to_none=True)
        model.eval()  # an evaluation between steps is not measured
        with torch.no_grad():
            model(idx)
        model.train()


def test_a_plain_loop_records_every_signal(tmp_path: Path) -> None:
    model = gpt("dyt")
    with NormMonitor(model, every=3, log_dir=tmp_path) as monitor:
        train_loop(model, 7, monitor)
    records = read_log(tmp_path / LOG_FILE)
    assert [r["step"] for r in records] == [0, 3, 6] == [r["step"] for r in monitor.records]
    r = records[-1]
    n = len(r["blocks"])
    assert r["blocks"] == [f"blocks.{i}" for i in range(4)]
    for key in ("residual_var", "var_growth", "angular", "grad_norm"):
        assert len(r[key]) == n and all(
            isinstance(v, float) and math.isfinite(v) and v > 0 for v in r[key]
        ), key
    assert all(0 < a < 0.5 for a in r["angular"])
    assert set(r["alpha"]) == {n for n, m in model.named_modules() if isinstance(m, normlab.DyT)}
    s = r["alpha"]["blocks.0.norm_attn"]
    assert s["margin"] == pytest.approx(abs(s["alpha"]) * s["input_std"]) and 0 <= s["saturated"] <= 1
    assert r["nonfinite"] is None and r["alerts"] == []


def test_the_signals_are_what_they_say() -> None:
    """The residual variance is the block output's, the gradient norm the block's parameters'."""
    model = gpt("layernorm", n_layer=2)
    outs: list[torch.Tensor] = []
    handle = model.blocks[1].register_forward_hook(lambda m, a, o: outs.append(o.detach()))
    monitor = NormMonitor(model, every=1, probes=("residual", "grad_norm"))
    idx, tgt = batch(0)
    out = model(idx, tgt)
    assert out.loss is not None
    out.loss.backward()
    expected_grad = math.sqrt(sum(float(p.grad.square().sum()) for p in model.blocks[1].parameters()))
    record = monitor.step()
    handle.remove()
    monitor.close()
    assert record is not None and set(record) >= {"residual_var", "grad_norm"} and "angular" not in record
    assert record["residual_var"][1] == pytest.approx(float(outs[0].var()), rel=1e-6)
    assert record["grad_norm"][1] == pytest.approx(expected_grad, rel=1e-6)


def test_gradients_zeroed_before_step_are_still_read() -> None:
    model = gpt("rmsnorm", n_layer=2)
    monitor = NormMonitor(model, every=1, probes=("grad_norm",))
    train_loop(model, 1, monitor, zero_before_step=True)
    monitor.close()
    assert all(v is not None and v > 0 for v in monitor.records[0]["grad_norm"])


def test_detaching_leaves_the_model_as_it_was() -> None:
    model = gpt("dyt")
    idx, _ = batch(0)
    before = model(idx).logits
    hooks = count_hooks(model)
    grad_hooks = sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters())
    monitor = NormMonitor(model, every=1)
    assert count_hooks(model) > hooks
    torch.testing.assert_close(model(idx).logits, before, rtol=0, atol=0)
    monitor.close()
    assert count_hooks(model) == hooks
    assert sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters()) == grad_hooks
    torch.testing.assert_close(model(idx).logits, before, rtol=0, atol=0)
    NormMonitor(model).close()  # attachable again once closed


def test_bad_input_is_refused_with_the_reason() -> None:
    model = gpt()
    with pytest.raises(ValueError, match="every must be an int >= 1, got 0"):
        NormMonitor(model, every=0)
    with pytest.raises(ValueError, match=r"unknown probe\(s\) \['variance'\]; the probes are"):
        NormMonitor(model, probes=("variance",))
    with pytest.raises(ValueError, match=r"parametrized modules found in Sequential; pass layers="):
        NormMonitor(nn.Sequential(nn.ReLU(), nn.Tanh()))
    with pytest.raises(ValueError, match=r"GPT has no module 'blocks\.9'"):
        NormMonitor(model, layers=["blocks.9"])
    with pytest.raises(ValueError, match="on_alert must be"):
        NormMonitor(model, on_alert="stop")  # type: ignore[arg-type]
    monitor = NormMonitor(model)
    with pytest.raises(ValueError, match="a monitor is already attached to this GPT"):
        NormMonitor(model)
    monitor.close()
    with pytest.raises(RuntimeError, match=r"step\(\) after close\(\)"):
        monitor.step()


def test_explicit_layers_and_a_convnet_with_batchnorm() -> None:
    torch.manual_seed(0)
    net = ConvNet(ConvNetConfig(widths=(4, 8), depth=1, norm="batchnorm", num_classes=3, in_channels=1))
    monitor = NormMonitor(net, every=1)
    x, y = torch.randn(8, 1, 12, 12) * 3 + 1, torch.randint(0, 3, (8,))
    nn.functional.cross_entropy(net(x), y).backward()
    record = monitor.step()
    monitor.close()
    assert record is not None and record["blocks"] and record["bn_stats"]
    first = next(iter(record["bn_stats"].values()))
    assert first["mean_gap"] > 0.5  # fresh running stats (0, 1) against inputs of mean 1, std 3
    named = NormMonitor(net, layers=[record["blocks"][0]], probes=("residual",))
    assert [b.name for b in named.blocks] == [record["blocks"][0]]
    named.close()


def test_alerts_warn_once_or_stop_the_loop(tmp_path: Path) -> None:
    model = gpt("dyt")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, normlab.DyT):
                m.alpha.fill_(40.0)  # saturated from the start
    monitor = NormMonitor(model, every=1)
    with pytest.warns(NormMonitorWarning, match=r"DyT blocks\.0\.norm_attn saturates: alpha 40 x std"):
        train_loop(model, 1, monitor)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same alert does not warn twice
        train_loop(model, 1, monitor)
    monitor.close()

    strict = NormMonitor(model, every=1, log_dir=tmp_path, on_alert="raise")
    with pytest.raises(NormAlertError, match="saturates") as raised:
        train_loop(model, 1, strict)
    strict.close()
    assert raised.value.record["alerts"] and read_log(tmp_path / LOG_FILE)[-1]["alerts"]  # logged first

    broken = gpt("layernorm")
    with torch.no_grad():
        broken.blocks[2].mlp.fc1.weight[0, 0] = float("nan")  # type: ignore[index]
    monitor = NormMonitor(broken, every=1, probes=("nonfinite",), on_alert="raise")
    with pytest.raises(NormAlertError, match=r"non-finite activations: blocks\.2 is the first module"):
        train_loop(broken, 1, monitor)
    monitor.close()

    quiet = NormMonitor(gpt("layernorm"), every=1, thresholds=MonitorThresholds(residual_growth=1.0001))
    with pytest.warns(NormMonitorWarning, match="residual variance grows"):
        train_loop(quiet.model, 1, quiet)  # type: ignore[arg-type]
    quiet.close()


def test_tensorboard_and_wandb_receive_the_scalars(monkeypatch: pytest.MonkeyPatch) -> None:
    class Writer:
        def __init__(self) -> None:
            self.scalars: list[tuple[str, float, int]] = []

        def add_scalar(self, key: str, value: float, step: int) -> None:
            self.scalars.append((key, value, step))

    class Run:
        def __init__(self) -> None:
            self.logged: list[dict[str, float]] = []

        def log(self, values: dict[str, float]) -> None:
            self.logged.append(values)

    import sys
    import types

    run = Run()
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(run=run))
    writer = Writer()
    model = gpt("dyt", n_layer=2)
    monitor = NormMonitor(model, every=2, writer=writer)
    train_loop(model, 3, monitor)
    monitor.close()
    keys = {k for k, _, _ in writer.scalars}
    assert {
        "normlab/residual_var/blocks.0",
        "normlab/grad_norm/blocks.1",
        "normlab/dyt_margin/final_norm",
    } <= keys
    assert sorted({s for _, _, s in writer.scalars}) == [0, 2]
    assert len(run.logged) == 2 and run.logged[0].keys() == {k for k, _, s in writer.scalars if s == 0}


def test_a_real_tensorboard_writer_gets_event_files(tmp_path: Path) -> None:
    tensorboard = pytest.importorskip("torch.utils.tensorboard")
    writer = tensorboard.SummaryWriter(str(tmp_path / "tb"))
    model = gpt("layernorm", n_layer=2)
    with NormMonitor(model, every=1, writer=writer) as monitor:
        train_loop(model, 2, monitor)
    writer.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_normlab_trainer_writes_the_same_log_and_trains_the_same(tmp_path: Path) -> None:
    from normlab.data import TextCorpus
    from normlab.train import LMRuntime, LMTask, RunConfig, TrainConfig, train

    text = "".join(f"line {i % 9}: the monitor watches the norms\n" for i in range(300))
    task = LMTask(block_size=16, gpt={"n_layer": 2, "n_embd": 16, "n_head": 2, "norm": "dyt"},
                  eval_batches=1, eval_batch_size=4)  # fmt: skip

    def run(monitor_every: int, folder: Path, on_step: Any = None) -> dict[str, Any]:
        opts = {"steps": 6, "batch_size": 4, "lr": 3e-3, "eval_every": 2, "ckpt_every": 3}
        config = RunConfig(task=task, train=TrainConfig(monitor_every=monitor_every, **opts))
        runtime = LMRuntime(task, TextCorpus.from_text(text), seed=0, batch_size=4)
        return train(config, folder, task=runtime, on_step=on_step)

    class CrashError(Exception):
        pass

    def crash(done: int) -> None:
        if done == 5:  # after the measurement of step 4; the checkpoint is at 3
            raise CrashError

    run(0, tmp_path / "plain")
    with pytest.raises(CrashError):
        run(2, tmp_path / "watched", on_step=crash)
    assert [r["step"] for r in read_log(tmp_path / "watched" / LOG_FILE)] == [0, 2, 4]
    run(2, tmp_path / "watched")  # resumes from step 3: the log keeps 0 and 2, measures 4 again
    plain = torch.load(tmp_path / "plain" / "final.pt", weights_only=True)
    watched = torch.load(tmp_path / "watched" / "final.pt", weights_only=True)
    assert all(torch.equal(plain[k], watched[k]) for k in plain)  # observing changes nothing
    records = read_log(tmp_path / "watched" / LOG_FILE)
    assert [r["step"] for r in records] == [0, 2, 4]
    assert (tmp_path / "watched" / "monitor_report.md").exists()  # as report-monitor writes it
    assert not (tmp_path / "plain" / LOG_FILE).exists()


def test_report_monitor_writes_findings_plots_and_markdown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    model = gpt("dyt")
    with torch.no_grad():
        model.final_norm.alpha.fill_(30.0)  # type: ignore[union-attr]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NormMonitorWarning)
        with NormMonitor(model, every=2, log_dir=tmp_path / "log") as monitor:
            train_loop(model, 5, monitor)
    assert main(["report-monitor", str(tmp_path / "log" / LOG_FILE), "--out", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    assert "warning: dyt_saturation: DyT final_norm saturates" in out
    for name in ("monitor_report.md", "monitor_blocks.png", "monitor_grads.png", "monitor_alpha.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0, name
    text = (tmp_path / "report" / "monitor_report.md").read_text()
    assert "3 measurements, steps 0 to 4, 4 blocks." in text and "| blocks.3 |" in text
    with (tmp_path / "log" / LOG_FILE).open("a") as fh:
        fh.write('{"step": 6, "trunc')  # a crash mid-line: the record is skipped
    assert len(read_log(tmp_path / "log" / LOG_FILE)) == 3
    assert main(["report-monitor", str(tmp_path / "missing.jsonl")]) == 2


def test_probe_names_are_documented() -> None:
    import normlab.monitor.monitor as module

    for name in PROBES:
        assert f"``{name}``" in (module.__doc__ or ""), name
    assert json.loads(json.dumps(NormMonitor.scalars({"blocks": ["a"], "residual_var": [1.0]})))


# ------------------------------------------------------------------------------------------------
# integrations


def test_hf_trainer_run_of_a_tiny_llama_converted_to_dyt(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from normlab.convert import convert_norms
    from normlab.integrations.hf import NormMonitorCallback

    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2}
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, num_key_value_heads=2, max_position_embeddings=SEQ, **sizes
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    convert_norms(model, "dyt")
    rows = [batch(i)[0][0] for i in range(16)]
    data = [{"input_ids": r, "labels": r} for r in rows]

    seen: list[dict[str, float]] = []

    class Reporter(transformers.TrainerCallback):  # stands in for report_to's TensorBoard/W&B
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            seen.append(dict(logs or {}))

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=5, per_device_train_batch_size=4, learning_rate=1e-3,
        logging_steps=100, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    monitor_dir = tmp_path / "monitor"
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[Reporter()])
    trainer.add_callback(NormMonitorCallback(every=2, log_dir=monitor_dir))  # added after the reporter
    trainer.train()
    records = read_log(monitor_dir / LOG_FILE)
    assert [r["step"] for r in records] == [0, 2, 4]
    r = records[-1]
    assert r["blocks"] == [f"model.layers.{i}" for i in range(3)]
    assert all(
        v > 0 for v in r["residual_var"] + r["angular"] + r["grad_norm"]
    )  # grads read before zero_grad
    assert len(r["alpha"]) == 2 * 3 + 1  # two DyTs per layer and the final one
    logged = [k for logs in seen for k in logs if k.startswith("normlab/")]
    assert "normlab/residual_var/model.layers.2" in logged and "normlab/dyt_margin/model.norm" in logged
    assert count_hooks(model) == 0  # closed at the end of training


def test_lightning_run_logs_through_its_loggers(tmp_path: Path) -> None:
    lightning = pytest.importorskip("lightning.pytorch")
    from normlab.integrations.lightning import NormMonitorCallback

    class LitGPT(lightning.LightningModule):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.model = gpt("dyt", n_layer=2)

        def training_step(self, data: Any, index: int) -> torch.Tensor:
            out = self.model(data[0], data[1])
            return out.loss  # type: ignore[no-any-return]

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    pairs = [batch(i) for i in range(6)]
    loader = torch.utils.data.DataLoader([(x[0], y[0]) for x, y in pairs], batch_size=2)
    callback = NormMonitorCallback(every=2, log_dir=tmp_path)
    trainer = lightning.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                                accumulate_grad_batches=1)  # fmt: skip
    module = LitGPT()
    trainer.fit(module, loader)
    records = read_log(tmp_path / LOG_FILE)
    assert [r["step"] for r in records] == [0, 2, 4]
    assert records[0]["blocks"] == ["model.blocks.0", "model.blocks.1"]
    assert all(v > 0 for v in records[-1]["grad_norm"])
    assert "normlab/residual_var/model.blocks.1" in trainer.callback_metrics
    assert count_hooks(module) == 0
