"""Embedding throughput: the embed stage against a bare loop over the same model on preloaded tensors.

    python bench/bench_embed.py [--size 2000] [--arch unclip-tiny] [--batch-size 128] [--workers 1]

Preparation (not timed): the demo's ingest and basic filter (``unclip demo --until basic_filter``)
make real webdataset shards; every kept image is decoded and preprocessed once into a tensor, every
caption tokenized.

- stage: ``embed_batch`` over all shards (webdataset pipeline, decoding in DataLoader workers,
  batching, inference, Parquet writing with float16 lists), outputs removed before each repeat;
- bare: ``encode_image`` + ``encode_text`` (normalised, inference mode) over the preloaded tensors in
  batches of the same size.

Repeats alternate and medians are compared: ratio = stage / bare throughput (how much of the model's
speed the pipeline keeps).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=2000)
    ap.add_argument("--arch", default="unclip-tiny")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "embed"))
    a = ap.parse_args()

    import torch

    from unclip import storage
    from unclip.config import EmbedConfig
    from unclip.data import clip
    from unclip.tasks import embed as embed_tasks

    out = Path(a.out)
    if not (out / "index" / "basic_filter.parquet").exists():
        subprocess.run([sys.executable, "-m", "unclip.cli", "demo", "--workdir", str(out), "--size", str(a.size),
                        "--until", "basic_filter"], check=True)
    shards = storage.read_parquet(str(out / "index" / "basic_filter.parquet")).to_pylist()
    n = sum(s["rows"] for s in shards)
    cfg = EmbedConfig(model={"arch": a.arch, "seed": 0}, batch_size=a.batch_size, num_workers=a.workers,
                      device="auto")
    device = clip.resolve_device(cfg.device)
    model_id = embed_tasks.model_identity(cfg)
    model, preprocess, tokenizer = clip.load_clip(cfg.model, device)

    # preload: every kept image decoded and preprocessed, every caption tokenized (not timed)
    keep = {s["tar"]: dict(zip(*(storage.read_parquet(s["kept"]).column(c).to_pylist() for c in ("key", "caption"))))
            for s in shards if s["rows"]}
    images, texts = [], []
    for b in clip.embedding_pipeline(keep, preprocess, tokenizer, a.batch_size):
        images.append(b["image"])
        texts.append(b["text"])
    images, texts = torch.cat(images), torch.cat(texts)
    assert len(images) == n, (len(images), n)

    def bare() -> float:
        t = time.perf_counter()
        for i in range(0, n, a.batch_size):
            clip.encode_batch(model, images[i:i + a.batch_size], texts[i:i + a.batch_size], device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    def stage() -> float:
        shutil.rmtree(out / "embed", ignore_errors=True)
        t = time.perf_counter()
        embed_tasks.embed_batch.fn(0, shards, str(out), cfg, model_id)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    bare()  # warm-up: first-call allocations and kernel selection are not part of either side
    bt, st = [], []
    for i in range(a.repeats):
        bt.append(bare())
        st.append(stage())
        print(f"repeat {i}: bare {n / bt[-1]:8.1f} pairs/s   stage {n / st[-1]:8.1f} pairs/s", flush=True)
    b, s = statistics.median(bt), statistics.median(st)
    print(f"\n{n} pairs, {a.arch}, batch {a.batch_size}, {a.workers} loader workers, device {device}, "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs")
    print(f"bare loop: median {n / b:.1f} pairs/s;  embed stage: median {n / s:.1f} pairs/s")
    print(f"ratio (stage / bare): {b / s:.3f}")


if __name__ == "__main__":
    main()
