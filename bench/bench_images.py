"""The image models: training steps/s through the shared trainer against a bare loop, and the whole
stack's sampling throughput.

    python bench/bench_images.py [--steps 30] [--repeats 3] [--stages decoder,upsampler1,upsampler2]
                                 [--images 512] [--sample-captions 8] [--checkpoint-every 1000]
                                 [--upsampler-steps N1,N2]

Preparation (not timed): webdataset shards of the demo's procedural scenes at 256 px (JPEG, with a
stand-in CLIP image embedding per row in the kept Parquet, as the embed stage stores it); for the
bare loops every sample is decoded, resized, cropped and degraded once into tensors, with the demo's
sizes and batches (configs/demo.yaml: decoder 16 px, batch 32; upsampler 1 16 px crops of 64 px,
batch 32, blur; upsampler 2 64 px crops of 256 px, batch 16, BSR).

- trainer: ``Trainer(ImageTask)`` with everything on: the shard reader (seeded shuffle, exact resume
  position), JPEG decoding, resizing, random crops and the low-res corruption per sample,
  tokenizing, AdamW with the schedule, clipping, EMA, TensorBoard and progress every 5 steps, and a
  checkpoint every ``--checkpoint-every`` steps plus the exit one;
- bare: the same network, loss, AdamW, clipping and EMA over the preloaded tensors in a plain loop;
- bare on the data stream: that loop reading the task's own data stream (shard reader, decoding,
  crops, corruption), so trainer / this is the trainer's own overhead and bare on the stream / bare
  the data path's cost.

Timing as bench_priors: 5 warm-up steps, then windows of 5 steps, repeats alternating, ratio of the
median windows. Sampling: images/s at the top of the chain (256 px) of ``Stack.generate`` with the
demo's evaluation settings (configs/demo.yaml's ``train.eval_generation``: diffusion prior 25 steps at
guidance 2, decoder 25 steps at guidance 5, upsamplers 5 and 4 steps at eta 1), and each stage's share, with randomly initialised tiny models (the cost does not depend
on the weights).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
WARMUP = WINDOW = 5
GRAD_CLIP, EMA_DECAY = 1.0, 0.995
DEMO = {"decoder": (16, 32), "upsampler1": (64, 32), "upsampler2": (256, 16)}  # image_size, batch


def tokenizer():
    import open_clip

    from unclip.data import clip as clip_data

    clip_data.register_project_configs()
    return open_clip.get_tokenizer("unclip-tiny")


def config(stage: str, args):
    from unclip.config import DecoderTrainConfig, UpsamplerTrainConfig

    size, batch = DEMO[stage]
    common = dict(flavour="tiny", image_size=size, steps=args.steps + WARMUP, batch_size=batch, warmup_steps=1,
                  checkpoint_every=args.checkpoint_every, log_every=WINDOW, grad_clip=GRAD_CLIP, ema_decay=EMA_DECAY,
                  num_workers=args.num_workers, shuffle_buffer=256)
    if stage == "decoder":
        return DecoderTrainConfig(**common)
    return UpsamplerTrainConfig(**common, degradation="blur" if stage == "upsampler1" else "bsr")


def preload(stage: str, files, tok, args) -> dict:
    """Every sample once through the stage's training preprocessing, as tensors."""
    import torch

    from unclip.data import pairs
    from unclip.train import image

    task = image.ImageTask(stage, config(stage, args), files, None, tok)
    torch.manual_seed(0)
    held = pairs.held_out_images(files, args.images, task.preprocess(train=True),
                                 embeddings=("image_emb",) if stage == "decoder" else ())
    if stage == "decoder":
        held["text"] = tok(held["caption"])
    return held


def bare(stage: str, args, data: dict | None, files=None, tok=None) -> list[float]:
    """The bare loop over the preloaded tensors, or (``data`` None) over the task's own data stream
    from ``files``: the same shard reader and per-sample preprocessing the trainer uses."""
    import torch
    from torch.optim.swa_utils import AveragedModel

    from unclip.train import distributed, image
    from unclip.train.trainer import ema_avg_fn

    torch.manual_seed(0)
    task = image.ImageTask(stage, config(stage, args), files, None, tok if stage == "decoder" else None)
    model = task.build_model(task.model_config())
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ema = AveragedModel(model, multi_avg_fn=ema_avg_fn(EMA_DECAY), use_buffers=True)
    batch = DEMO[stage][1]
    stream = task.batches(batch, 0, distributed.init()) if data is None else None
    n = len(data["caption"]) if data is not None else 0
    marks: list[float] = []
    for step in range(args.steps + WARMUP):
        if step % WINDOW == 0 and step >= WARMUP:
            marks.append(time.perf_counter())
        if stream is not None:
            part = next(stream)
        else:
            i = (step * batch) % (n - batch)
            part = {k: ({kk: vv[i:i + batch] for kk, vv in v.items()} if isinstance(v, dict) else v[i:i + batch])
                    for k, v in data.items() if k in ("image", "text", "image_emb")}
        loss, _ = task.loss(model, part)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update_parameters(model)
    marks.append(time.perf_counter())
    return [b - a for a, b in zip(marks, marks[1:])]


def trainer(stage: str, args, files, tok, out: str) -> list[float]:
    from unclip.train import image
    from unclip.train.trainer import Trainer

    shutil.rmtree(out, ignore_errors=True)
    cfg = config(stage, args)
    task = image.ImageTask(stage, cfg, files, None, tok if stage == "decoder" else None)
    marks: list[float] = []
    Trainer(task, cfg, out, on_progress=lambda step, steps, scalars: marks.append(time.perf_counter())).run()
    return [b - a for a, b in zip(marks, marks[1:])]


def sampling(args, work: Path) -> None:
    import torch

    from unclip import generate as gen
    from unclip.config import ClipModelConfig, load_config
    from unclip.models import unet
    from unclip.models.prior import FLAVOURS, DiffusionPrior
    from unclip.train import image, prior

    torch.manual_seed(0)
    pcfg = FLAVOURS["tiny"]
    folders = {"prior_diffusion": prior.write_release(DiffusionPrior(pcfg), {"flavour": "tiny", "prior": pcfg.to_dict()},
                                                      "unclip-tiny", str(work / "prior"), kind="prior_diffusion")["uri"]}
    for kind, cfg in unet.FLAVOURS["tiny"].items():
        folders[kind] = prior.write_release(unet.build(kind, cfg.to_dict()), {"stage": kind, "flavour": "tiny",
                                            "unet": cfg.to_dict()}, None, str(work / kind), kind=kind,
                                            meta=image.META_FILE)["uri"]
    stack = gen.Stack.from_folders(folders, ClipModelConfig(arch="unclip-tiny", seed=0))
    demo = load_config(ROOT / "configs" / "demo.yaml", variables={"workdir": str(work)})
    s = dataclasses.replace(gen.Settings.of(demo.train.eval_generation), batch_size=args.sample_captions)
    if args.upsampler_steps:
        s = dataclasses.replace(s, upsampler_steps=tuple(int(v) for v in args.upsampler_steps.split(",")))
    captions = [f"a small red circle at the top and {i} blue squares" for i in range(args.sample_captions)]
    stack.generate(captions[:2], s=s, seed=0)  # warm-up
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    tokens, text = stack.text(captions)
    z = stack.embed("prior_diffusion", tokens, text, s, g)
    t1 = time.perf_counter()
    first = stack.decode(z, tokens, s, g)
    t2 = time.perf_counter()
    up1 = stack.upsample("upsampler1", first, s.upsampler_steps[0], g, s.upsampler_eta)
    t3 = time.perf_counter()
    stack.upsample("upsampler2", up1, s.upsampler_steps[1], g, s.upsampler_eta)
    t4 = time.perf_counter()
    n = len(captions)
    print(f"sampling the stack, {n} captions at once, upsamplers {s.upsampler_steps[0]} and {s.upsampler_steps[1]} steps: {n / (t4 - t0):.3f} images/s at 256 px "
          f"({(t4 - t0) / n:.2f} s an image: prior {(t1 - t0) / n:.3f} s, decoder 16 px {(t2 - t1) / n:.3f} s, "
          f"upsampler 1 to 64 px {(t3 - t2) / n:.3f} s, upsampler 2 to 256 px {(t4 - t3) / n:.3f} s); "
          f"to 64 px only: {n / (t3 - t0):.3f} images/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stages", default="decoder,upsampler1,upsampler2")
    ap.add_argument("--images", type=int, default=512, help="rendered 256 px training images")
    ap.add_argument("--sample-captions", type=int, default=8)
    ap.add_argument("--checkpoint-every", type=int, default=1000)
    ap.add_argument("--num-workers", type=int, default=0, help="the trainer's DataLoader worker processes "
                    "(0: decode in the training process, as the demo)")
    ap.add_argument("--no-sampling", action="store_true", help="skip the stack's sampling throughput")
    ap.add_argument("--upsampler-steps", default=None, help="N1,N2: the upsamplers' DDIM steps when sampling "
                    "(default: configs/demo.yaml's train.eval_generation.upsampler_steps)")
    ap.add_argument("--tar-format", choices=("gnu", "pax"), default="gnu",
                    help="the shards' tar headers: gnu, as the ingest writes them; pax, as img2dataset alone does")
    args = ap.parse_args()

    import torch

    from pair_shards import make_pair_shards

    work = Path(tempfile.mkdtemp(prefix="bench-images-"))
    try:
        files = make_pair_shards(work / "data", {"dalle": args.images}, samples_per_shard=64, side=256, image_emb=True,
                                 tar_format=args.tar_format)
        tok = tokenizer()
        print(f"data: {files.num_rows} shards ({args.tar_format} tar headers), {args.images} images of 256 px; "
              f"torch threads {torch.get_num_threads()}; trainer loader workers {args.num_workers}")
        for stage in filter(None, args.stages.split(",")):  # --stages "": the sampling throughput only
            data = preload(stage, files, tok, args)
            windows: dict[str, list[float]] = {"bare": [], "bare_stream": [], "trainer": []}
            for r in range(args.repeats):
                b = bare(stage, args, data, tok=tok)
                bs = bare(stage, args, None, files, tok)
                t = trainer(stage, args, files, tok, str(work / f"run-{stage}-{r}"))
                windows["bare"] += b
                windows["bare_stream"] += bs
                windows["trainer"] += t
                rate = {k: WINDOW * len(v) / sum(v) for k, v in (("b", b), ("bs", bs), ("t", t))}
                print(f"  {stage} repeat {r}: bare {rate['b']:.3f} steps/s, bare on the data stream {rate['bs']:.3f}, "
                      f"trainer {rate['t']:.3f}; ratios {rate['t'] / rate['b']:.3f} and {rate['t'] / rate['bs']:.3f}",
                      flush=True)
            b, bs, t = (WINDOW / statistics.median(windows[k]) for k in ("bare", "bare_stream", "trainer"))
            size, batch = DEMO[stage]
            print(f"{stage} (tiny, {size} px, batch {batch}): bare {b:.3f} steps/s, bare on the data stream {bs:.3f}, "
                  f"trainer {t:.3f} (medians of {len(windows['bare'])} windows of {WINDOW} steps); trainer/bare "
                  f"{t / b:.3f} (goal >= 0.95), trainer/bare on the data stream {t / bs:.3f}", flush=True)
        if not args.no_sampling:
            sampling(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
