"""Throughput options of the shared loop: ``compile`` routes every step through ``torch.compile``."""
from __future__ import annotations

import torch

import training.engine as engine
from promptclip_testing import TINY, tiny_method_config
from training.backbone import create_backbone
from training.distributed import TrainingLoss
from training.engine import TrainConfig, train
from training.methods import create_method


def _factory(n: int = 8, batch: int = 4):
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % 2)
    return lambda epoch: torch.utils.data.DataLoader(data, batch_size=batch)


def test_compile_option_runs_every_step_through_the_compiled_loss(monkeypatch):
    compiled: list[torch.nn.Module] = []
    calls = [0]

    def fake_compile(module):  # inductor needs a C++ toolchain and minutes on 2 cores; the wiring is what counts
        compiled.append(module)

        def run(batch):
            calls[0] += 1
            return module(batch)
        return run

    monkeypatch.setattr(engine.torch, "compile", fake_compile)
    m = create_method("coop", create_backbone(TINY), tiny_method_config("coop"))
    from open_clip.tokenizer import SimpleTokenizer

    ids = SimpleTokenizer()(m.prompt_texts(["a", "b"], "a photo of a {}."))
    res = train(m, _factory(), ids, TrainConfig(epochs=1, device="cpu", precision="fp32", compile=True),
                progress=False)
    assert res.steps == 2 and calls[0] == 2
    assert len(compiled) == 1 and isinstance(compiled[0], TrainingLoss) and compiled[0].method is m


def test_compile_is_off_by_default_and_a_cli_flag():
    from promptclip.cli import build_parser
    from promptclip.cli.commands.train import _train_config

    assert TrainConfig().compile is False
    args = build_parser().parse_args(["train", "--method", "coop", "--data", "d", "--out", "o", "--compile"])
    assert _train_config(args).compile is True
    args = build_parser().parse_args(["train", "--method", "coop", "--data", "d", "--out", "o"])
    assert _train_config(args).compile is False
