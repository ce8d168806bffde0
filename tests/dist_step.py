"""One data-parallel training step of a toy MLP, for tests/test_distributed.py to run under torchrun.

Every process builds the same seeded model and the same seeded global batch of 2*B rows, takes its
contiguous slice, and runs one forward/backward through ``wrap_model``. Rank 0 saves the global mean
loss, the full gradients (FSDP shards gathered), the world size and the wrapper's class to ``--out``.
Without torchrun the one process takes the whole batch and the model is not wrapped: the reference a
parallel run must match.

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m dist_step --out step.pt
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.distributed.tensor import DTensor

from unclip.train import distributed

B = 4  # rows per process in a 2-process run; the global batch is 2*B
# 5 -> 7 -> 3: odd sizes, so FSDP's shards of every weight are uneven across 2 processes
D_IN, D_HIDDEN, D_OUT = 5, 7, 3


class Scale(nn.Module):
    """A 0-d parameter, as open_clip's logit_scale: FSDP2 cannot shard it, wrap_model keeps it whole."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def build_model(seed: int) -> nn.Sequential:
    """The same weights in every process, without touching the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(D_IN, D_HIDDEN), nn.Tanh(), nn.Linear(D_HIDDEN, D_OUT), Scale())


def global_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2 * B, D_IN, generator=g), torch.randn(2 * B, D_OUT, generator=g)


def step(ctx: distributed.DistContext, strategy: str, seed: int) -> dict:
    """Run the step in this process and return what rank 0 saves; every rank gathers (a collective)."""
    if 2 * B % ctx.world_size:
        raise ValueError(f"the global batch of {2 * B} rows does not split over {ctx.world_size} processes")
    model = build_model(seed)
    # the scalar's module is a block too: wrap_model keeps 0-d parameters out of every FSDP unit
    wrapped = distributed.wrap_model(model, strategy, ctx, blocks=[m for m in model if isinstance(m, (nn.Linear, Scale))])
    x, y = global_batch(seed + 1)
    rows = 2 * B // ctx.world_size
    mine = slice(ctx.rank * rows, (ctx.rank + 1) * rows)
    loss = nn.functional.mse_loss(wrapped(x[mine].to(ctx.device)), y[mine].to(ctx.device))
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():  # the unwrapped model's names: DDP's wrapper adds "module."
        g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        grads[name] = g.detach().cpu()
    return {"world_size": ctx.world_size, "wrapper": type(wrapped).__name__,
            "loss": distributed.all_reduce_mean(loss).cpu(), "grads": grads}


@record  # a failing rank's traceback goes into torchrun's summary, the end of the log
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="Output .pt file (written by rank 0).")
    ap.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp")
    ap.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    ctx = distributed.init(a.backend)
    try:
        result = step(ctx, a.strategy, a.seed)
        if distributed.is_main():
            torch.save(result, a.out)
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    main()
