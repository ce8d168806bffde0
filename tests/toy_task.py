"""A tiny regression task for the trainer's tests: deterministic data addressed by position, so a
resumed run sees exactly the batches an uninterrupted one would. Also runs under torchrun:

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m toy_task --out D --steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from typing import Callable, Iterator

import torch
from torch import nn

from unclip.config import StageTrainConfig
from unclip.train import distributed

D_IN, D_OUT = 6, 3


def save_failing_at(step: int, delay_s: float = 0.0) -> Callable:
    """A ``torch.save`` that fails as a full disk would for the checkpoint of ``step`` (after ``delay_s``),
    and saves everything else."""
    real_save = torch.save

    def save(obj, f, *args, **kw):
        if isinstance(obj, dict) and obj.get("step") == step:
            time.sleep(delay_s)
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kw)

    return save


class ToyTask:
    name = "toy"

    def __init__(self, seed: int = 0, nan_at: int | None = None, stall_at: int | None = None,
                 sigterm_at: int | None = None) -> None:
        self.seed = seed
        self.nan_at = nan_at  # the micro-batch index whose loss is NaN
        self.stall_at = stall_at  # the micro-batch index at which the process waits to be killed
        self.sigterm_at = sigterm_at  # the micro-batch index at which rank 0 (only) sends itself SIGTERM
        self.seen = 0

    def model_config(self) -> dict:
        return {"d_in": D_IN, "hidden": 8, "d_out": D_OUT}

    def build_model(self, cfg: dict) -> nn.Module:
        model = nn.Sequential(nn.Linear(cfg["d_in"], cfg["hidden"]), nn.Tanh(), nn.Linear(cfg["hidden"], cfg["d_out"]))
        # a floating-point buffer, as real models have (open_clip's attention mask): FSDP leaves buffers unsharded
        model.register_buffer("scale", torch.ones(cfg["d_out"]))
        return model

    def global_batch(self, index: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        x = torch.randn(rows, D_IN, generator=g)
        w = torch.arange(D_IN * D_OUT, dtype=torch.float32).reshape(D_IN, D_OUT) / 10
        return x, torch.tanh(x @ w) + 0.01 * torch.randn(rows, D_OUT, generator=g)

    def batches(self, micro_batch: int, start: int, ctx: distributed.DistContext) -> Iterator:
        index = start
        while True:
            x, y = self.global_batch(index, micro_batch * ctx.world_size)
            mine = slice(ctx.rank * micro_batch, (ctx.rank + 1) * micro_batch)
            yield index, x[mine].to(ctx.device), y[mine].to(ctx.device)
            index += 1

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
        index, x, y = batch
        if self.stall_at is not None and index == self.stall_at:
            import time

            print("stalled", flush=True)
            time.sleep(600)
        if self.sigterm_at is not None and index == self.sigterm_at and os.environ.get("RANK", "0") == "0":
            os.kill(os.getpid(), signal.SIGTERM)
        self.seen += len(x)
        loss = nn.functional.mse_loss(model(x), y)
        if self.nan_at is not None and index >= self.nan_at:
            loss = loss * float("nan")
        return loss, {"rows": float(len(x))}

    def state_dict(self) -> dict:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.seen = state["seen"]


class EvalToyTask(ToyTask):
    """ToyTask with a held-out evaluation: the model's error on a fixed batch. Its ``build_model`` keeps
    the model it builds, as the image stages' task does: the trainer must not let an evaluation copy
    replace it."""

    def build_model(self, cfg: dict) -> nn.Module:
        self.built = super().build_model(cfg)
        return self.built

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
        if self.built is not getattr(model, "module", model):
            raise RuntimeError("the task's model is not the one being trained")
        return super().loss(model, batch)

    def evaluate(self, model: nn.Module) -> dict:
        x, y = self.global_batch(10_000, 64)
        with torch.no_grad():
            return {"mse": float(nn.functional.mse_loss(model(x), y))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", required=True, help="StageTrainConfig as JSON")
    ap.add_argument("--strategy", default="ddp")
    ap.add_argument("--stall-at", type=int, default=None)
    ap.add_argument("--sigterm-at", type=int, default=None)
    ap.add_argument("--evaluate", action="store_true", help="a task with a held-out evaluation")
    ap.add_argument("--fail-checkpoint-at", type=int, default=None, help="rank 0's write of this step's checkpoint fails")
    a = ap.parse_args()
    ctx = distributed.init("gloo")
    try:
        from unclip.train.trainer import Trainer

        if a.fail_checkpoint_at is not None:  # a full disk or a lost bucket at one step's checkpoint
            torch.save = save_failing_at(a.fail_checkpoint_at)

        cfg = StageTrainConfig.model_validate(json.loads(a.config))
        task = (EvalToyTask if a.evaluate else ToyTask)(stall_at=a.stall_at, sigterm_at=a.sigterm_at)
        Trainer(task, cfg, a.out, strategy=a.strategy, ctx=ctx).run()
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    main()
