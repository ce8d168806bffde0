"""The decoder UNet's training throughput and bf16 model FLOP utilisation on one GPU.

    python bench/gpu_decoder.py [--sizes 256 paper] [--batch 64] [--steps 30] [--compile] [--profile]
                                [--peak-tflops 989] [--out FILE] [--device cuda]

Each size is a decoder at the paper's 64 px: a number is the UNet's base width (``model_channels``;
its text Transformer 12 layers of width max(512, 2 x width)); ``paper`` is the paper's 3.5B decoder
exactly as ``unet.FLAVOURS["paper"]["decoder"]`` defines it (width 512, text 24 x 2048). A step is
the trainer's: bf16 autocast, the diffusion loss with the configured caption and embedding drops,
backward, global-norm clipping, fused AdamW; inputs are random (unit-norm 1024-d embeddings, captions
of 20 tokens padded to the full 77: the trainer cuts a batch's captions to its longest, so the text
Transformer's share here is an upper bound), since the data path is measured by bench/bench_images.py.

FLOPs per step are counted once with ``torch.utils.flop_counter`` (the network's forward and backward;
the optimiser's are not model FLOPs; a fused attention's backward is counted with the recomputation of
its scores, about 1% of the decoder's total); MFU = achieved FLOP/s / the GPU's dense bf16 peak
(``--peak-tflops``: 989 for an H100/H200 SXM by the datasheet; about 790 was measured on this
workplace's H200 for a large bf16 matmul). Steps are timed with CUDA events after warm-up, median
of ``--steps`` single-step timings. ``--compile`` adds each size under ``torch.compile``;
``--profile`` prints the top kernels of 3 eager steps. A batch that does not fit is halved until it
does. ``--device cpu`` runs the same code path tiny, as a smoke check (no MFU). The project never
needs a GPU to install or pass its tests; results are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch.utils.flop_counter import FlopCounterMode

from unclip.models import unet


def config(size: str) -> unet.DecoderConfig:
    base = unet.FLAVOURS["paper"]["decoder"]
    if size == "paper":
        return base
    width = int(size)
    return dataclasses.replace(base, model_channels=width, head_channels=64, text_width=max(512, 2 * width),
                               text_layers=12, text_heads=max(8, width // 32))


class Run:
    """One decoder, its optimiser and a step on random inputs of batch ``b``."""

    def __init__(self, cfg: unet.DecoderConfig, b: int, dev: torch.device, compiled: bool) -> None:
        with dev:
            self.model = unet.Decoder(cfg).train()
        self.params = unet.count_parameters(self.model)
        self.net = torch.compile(self.model) if compiled else self.model
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=dev.type == "cuda")
        self.diffusion = self.model.diffusion()
        self.b, self.dev, self.cfg = b, dev, cfg

    def step(self, eager: bool = False) -> None:
        """One training step; ``eager`` runs the uncompiled module (the FLOP counter sees its aten ops)."""
        b, dev, cfg = self.b, self.dev, self.cfg
        tokens = torch.randint(1, 49000, (b, cfg.text_ctx), device=dev)
        tokens[:, 20:] = 0
        kwargs = {"tokens": tokens,
                  "image_emb": torch.nn.functional.normalize(torch.randn(b, cfg.embed_dim, device=dev), dim=-1),
                  "drop_text": torch.rand(b, device=dev) < cfg.text_drop,
                  "drop_image": torch.rand(b, device=dev) < cfg.image_drop}
        x0 = torch.rand(b, 3, cfg.image_size, cfg.image_size, device=dev) * 2 - 1
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            net = self.model if eager else self.net
            loss = self.diffusion.training_loss(net, x0, self.diffusion.sample_timesteps(b, device=dev),
                                                model_kwargs=kwargs).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def timed(run: Run, steps: int) -> list[float]:
    """Seconds per step, one timing per step (CUDA events on a GPU)."""
    out = []
    for _ in range(steps):
        if run.dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run.step()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            run.step()
            out.append(time.perf_counter() - t0)
    return out


def measure(size: str, b: int, args, dev: torch.device, compiled: bool, log) -> None:
    cfg = config(size)
    if dev.type == "cpu":  # the smoke check: the same code path at a size two cores can run
        cfg = dataclasses.replace(cfg, model_channels=32, head_channels=32, text_width=64, text_layers=2,
                                  text_heads=2, image_size=16, channel_mult=(1, 2))
    while True:
        try:
            run = Run(cfg, b, dev, compiled)
            counter = FlopCounterMode(display=False)
            with counter:
                run.step(eager=True)
            flops = counter.get_total_flops()
            t0 = time.perf_counter()
            timed(run, 3 if not compiled else 5)  # warm-up
            warm_s = time.perf_counter() - t0
            times = timed(run, args.steps)
            break
        except torch.OutOfMemoryError:
            run = None
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()  # the peak reported is the batch that fits
            if b == 1:
                raise
            log(f"  {size}: batch {b} does not fit; halving")
            b //= 2
    dt = statistics.median(times)
    name = f"decoder {size} ({run.params / 1e6:,.0f}M parameters, text {cfg.text_layers} x {cfg.text_width}), " \
           f"{cfg.image_size} px, batch {b}, bf16{', compiled' if compiled else ''}"
    line = (f"{name}: {b / dt:.1f} samples/s, {dt * 1e3:.1f} ms a step (median of {len(times)}; "
            f"min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}), {flops / b / 1e9:.1f} GFLOP a sample, "
            f"{flops / dt / 1e12:.1f} TFLOP/s")
    if dev.type == "cuda":
        line += (f", MFU {flops / dt / (args.peak_tflops * 1e12):.3f} of {args.peak_tflops:g}; peak memory "
                 f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB; warm-up {warm_s:.0f} s")
    log(line)
    if args.profile and not compiled:
        profile(run, log)
    del run
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def profile(run: Run, log) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.dev.type == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        for _ in range(3):
            run.step()
        if run.dev.type == "cuda":
            torch.cuda.synchronize()
    key = "cuda_time_total" if run.dev.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60)
    log(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["256", "paper"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--out", type=Path, default=None, help="also append every line to this file")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()

    dev = torch.device(args.device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("gpu_decoder: needs CUDA (or --device cpu for a smoke check)")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    def log(line: str) -> None:
        print(line, flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(line + "\n")

    where = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    log(f"gpu_decoder: torch {torch.__version__}, {where}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    for compiled in [False, True] if args.compile else [False]:
        for size in args.sizes:
            measure(size, args.batch, args, dev, compiled, log)


if __name__ == "__main__":
    main()
