"""CLIP steps through the trainer on a fixed, seeded global batch, for the 2-process DDP and FSDP test:

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m clip_ddp --out D --config JSON [--strategy fsdp]

Each process takes its contiguous slice of every global batch; open_clip's ClipLoss gathers the
features of all processes with gradients, so 2 processes must train exactly as 1 on the whole batch.
The ViT twin of the tiny CLIP is used: LayerNorm only (BatchNorm statistics are per process).
"""

from __future__ import annotations

import argparse

import torch

from unclip.config import ClipTrainConfig
from unclip.train import distributed
from unclip.train.clip import ClipTask
from unclip.train.trainer import Trainer

ARCH = "unclip-tiny-vit"


class FixedBatchClip(ClipTask):
    def batches(self, micro_batch, start, ctx):
        import open_clip

        self.loss_fn = open_clip.ClipLoss(local_loss=False, gather_with_grad=True, rank=ctx.rank,
                                          world_size=ctx.world_size)
        index = start
        while True:
            g = torch.Generator().manual_seed(1000 + index)
            rows = micro_batch * ctx.world_size
            images = torch.randn(rows, 3, 64, 64, generator=g)
            texts = torch.randint(1, 49407, (rows, 32), generator=g)
            mine = slice(ctx.rank * micro_batch, (ctx.rank + 1) * micro_batch)
            yield {"image": images[mine], "text": texts[mine], "source": ["x"] * micro_batch}
            index += 1


def run(out: str, cfg: ClipTrainConfig, ctx=None, strategy: str = "ddp") -> str:
    return Trainer(FixedBatchClip(cfg, None), cfg, out, strategy=strategy, ctx=ctx).run().checkpoint


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp")
    a = ap.parse_args()
    ctx = distributed.init("gloo")
    try:
        run(a.out, ClipTrainConfig.model_validate_json(a.config), ctx, a.strategy)
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    main()
