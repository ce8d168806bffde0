"""Training throughput: the shared trainer on the CLIP stage against a bare loop, same model and batch.

    python bench/bench_trainer.py [--steps 40] [--batch-size 64] [--arch unclip-tiny-timm] [--workers 1] [--repeats 3]
                                  [--threads N]

Preparation (not timed): webdataset shards of the demo's procedural scenes (64 px), 2 sources; for the
bare loop every sample is decoded, preprocessed (the stage's eval transform) and tokenized once into
tensors.

- trainer: ``Trainer(ClipTask)`` for ``--steps`` steps with everything on: the real data pipeline
  (tar reading, source mix, decoding and augmentation in a DataLoader worker), open_clip's ClipLoss,
  AdamW with the schedule, global-norm clipping, EMA, TensorBoard scalars every 5 steps, progress,
  and a checkpoint every ``--checkpoint-every`` steps (default: 4 in the run) plus the exit one;
- bare: the same model, ClipLoss, AdamW and batch size over the preloaded tensors; no EMA, no
  clipping, no logging, no checkpoints;
- stream: that bare loop fed by the task's own data stream (``ClipTask.batches``: the same reader,
  decoding, augmentation, tokenizing and loader workers as the trainer's), so trainer / stream is the
  trainer's own overhead and stream / bare the data path's.

Both skip their first 5 steps (warm-up) in the timing. Repeats alternate; medians are compared:
ratios = trainer steps/s over bare's and over stream's.

``--threads`` sets the model's torch threads in both arms. The default gives the model the cores the
loader workers do not take (``cpu_count - workers``, at least 1): the layout of a GPU node, where the
accelerator runs the model and the loader has CPU cores of its own. ``--threads 2 --workers 1`` on a
2-core machine makes the loader compete with the model for the same cores instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
WARMUP = 5


def _config(args):
    from unclip.config import ClipTrainConfig

    return ClipTrainConfig(arch=args.arch, steps=args.steps + WARMUP, batch_size=args.batch_size, warmup_steps=1,
                           checkpoint_every=args.checkpoint_every, log_every=WARMUP, num_workers=args.workers,
                           ema_decay=0.99, grad_clip=1.0)


def bare(args, tensors, files=None) -> float:
    """The bare loop over the preloaded ``tensors``, or (``files`` given) over the CLIP task's own data
    stream from those shards (the trainer's reader, decoding, augmentation, tokenizing and loader)."""
    import open_clip
    import torch

    from unclip.data import clip as clip_data
    from unclip.train import distributed
    from unclip.train.clip import ClipTask

    clip_data.register_project_configs()
    torch.manual_seed(0)
    stream = None
    if files is None:
        model = open_clip.create_model(args.arch)
    else:  # the task builds the same model and, with it, the transforms its stream applies
        task = ClipTask(_config(args), files)
        model = task.build_model(task.model_config())
        stream = task.batches(args.batch_size, 0, distributed.init())
    model.train()
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as the trainer's
    t0 = None
    try:
        for step in range(args.steps + WARMUP):
            if step == WARMUP:
                t0 = time.perf_counter()
            if stream is not None:
                batch = next(stream)
                images, texts = batch["image"], batch["text"]
            else:
                i = (step * args.batch_size) % (len(tensors[0]) - args.batch_size)
                images, texts = tensors[0][i:i + args.batch_size], tensors[1][i:i + args.batch_size]
            out = model(images, texts)
            loss = loss_fn(*out[:3])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return args.steps / (time.perf_counter() - t0)
    finally:
        if stream is not None:
            stream.close()  # its loader workers end now, not at garbage collection


def trainer(args, files, out: str) -> float:
    from unclip.train.clip import ClipTask
    from unclip.train.trainer import Trainer

    shutil.rmtree(out, ignore_errors=True)
    cfg = _config(args)
    marks = {}

    def progress(step, steps, scalars):  # called at log steps; the warm-up ends at a log step too
        marks[step] = time.perf_counter()

    Trainer(ClipTask(cfg, files), cfg, out, on_progress=progress).run()
    end = time.perf_counter()
    return args.steps / (end - marks[WARMUP])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--arch", default="unclip-tiny-timm", help="the demo's CLIP (configs/demo.yaml)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--checkpoint-every", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=None, help="the model's torch threads in both arms "
                    "(default: the cores the loader workers leave, at least 1)")
    args = ap.parse_args()
    logging.disable(logging.WARNING)

    import torch

    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) - args.workers))
    from pair_shards import make_pair_shards
    from unclip.data import clip as clip_data
    from unclip.data import pairs

    root = Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    files = make_pair_shards(root, {"clip": args.pairs // 2, "dalle": args.pairs // 2}, samples_per_shard=128)
    clip_data.register_project_configs()
    import open_clip

    _, _, preprocess = open_clip.create_model_and_transforms(args.arch)
    tokenizer = open_clip.get_tokenizer(args.arch)
    ds = pairs.HeldOutPairs(files, preprocess=preprocess, tokenizer=tokenizer, batch_size=256)
    batches = list(ds)
    tensors = (torch.cat([b["image"] for b in batches]), torch.cat([b["text"] for b in batches]))
    print(f"{len(tensors[0])} pairs preloaded; {args.arch}, batch {args.batch_size}, {args.steps} timed steps, "
          f"{torch.get_num_threads()} torch threads, {args.workers} loader worker(s), {os.cpu_count()} CPUs")
    arms = {"bare": lambda: bare(args, tensors), "stream": lambda: bare(args, None, files),
            "trainer": lambda: trainer(args, files, str(root / "out"))}
    results: dict[str, list[float]] = {name: [] for name in arms}
    for r in range(args.repeats):
        for name in list(arms) if r % 2 == 0 else list(arms)[::-1]:
            v = arms[name]()
            results[name].append(v)
            print(f"repeat {r}: {name:<8} {v:.3f} steps/s ({v * args.batch_size:.1f} samples/s)", flush=True)
    b, s, t = (statistics.median(results[k]) for k in ("bare", "stream", "trainer"))
    print(f"median: bare {b:.3f} steps/s, bare on the data stream {s:.3f}, trainer {t:.3f}; trainer / bare "
          f"{t / b:.3f} (per repeat {[round(x / y, 3) for x, y in zip(results['trainer'], results['bare'])]}), "
          f"trainer / bare on the stream {t / s:.3f} "
          f"(per repeat {[round(x / y, 3) for x, y in zip(results['trainer'], results['stream'])]})")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
