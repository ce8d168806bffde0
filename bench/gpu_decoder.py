"""The decoder UNet's training throughput and bf16 model FLOP utilisation on one GPU.

    python bench/gpu_decoder.py [--width 256] [--batch 64] [--steps 30] [--peak-tflops 989]

A decoder at the paper's 64 px with a realistic width (``--width``: the UNet's base channels; the
paper's 3.5B model is 512), its text Transformer and CLIP conditioning, trained as the trainer does
(bf16 autocast, AdamW fused, global-norm clipping), on random inputs (the data path is measured by
bench/bench_images.py). FLOPs per step are counted once with ``torch.utils.flop_counter`` (forward
and backward of the network; the optimiser's are not model FLOPs); MFU = achieved FLOP/s / the
GPU's dense bf16 peak (``--peak-tflops``: 989 for an H100/H200 SXM). Prints one line per setting.
Needs CUDA; the project never needs a GPU to install or pass its tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, nargs="+", default=[256])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    args = ap.parse_args()

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from unclip.models import unet

    if not torch.cuda.is_available():
        raise SystemExit("gpu_decoder: needs CUDA")
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    for width in args.width:
        base = unet.FLAVOURS["paper"]["decoder"]
        cfg = dataclasses.replace(base, model_channels=width, head_channels=64, text_width=max(512, 2 * width),
                                  text_layers=12, text_heads=max(8, width // 32))
        model = unet.Decoder(cfg).to(dev).train()
        params = unet.count_parameters(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        diffusion = model.diffusion()
        b = args.batch

        def step(model=model, opt=opt) -> None:
            x0 = torch.randn(b, 3, 64, 64, device=dev)
            tokens = torch.randint(1, 49000, (b, 32), device=dev)
            kwargs = {"tokens": tokens, "image_emb": torch.nn.functional.normalize(torch.randn(b, 1024, device=dev), dim=-1),
                      "drop_text": torch.rand(b, device=dev) < 0.5, "drop_image": torch.rand(b, device=dev) < 0.1}
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = diffusion.training_loss(model, x0, diffusion.sample_timesteps(b, device=dev),
                                               model_kwargs=kwargs).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        counter = FlopCounterMode(display=False)
        with counter:
            step()
        flops = counter.get_total_flops()
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / args.steps
        mfu = flops / dt / (args.peak_tflops * 1e12)
        print(f"decoder width {width} ({params / 1e6:.0f}M parameters), 64 px, batch {b}, bf16: {b / dt:.1f} samples/s, "
              f"{dt * 1e3:.1f} ms a step, {flops / 1e12:.2f} TFLOP a step (forward + backward), "
              f"{flops / dt / 1e12:.1f} TFLOP/s, MFU {mfu:.3f} of {args.peak_tflops:g} TFLOP/s; "
              f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
        del model, opt
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main()
