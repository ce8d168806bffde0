"""The priors: training steps/s through the shared trainer against a bare loop, and sampling throughput.

    python bench/bench_priors.py [--steps 30] [--batch-size 64] [--diffusion-flavour tiny]
                                 [--ar-flavour micro] [--ar-batch-size 32] [--repeats 3]
                                 [--checkpoint-every 1000] [--prefetch 2]
                                 [--priors diffusion,ar]
                                 [--sample-batch 64] [--sample-steps 64]

Preparation (not timed): Parquet embedding files as the data pipeline writes them (float16
embeddings, captions) of 4,800 synthetic pairs whose image embedding follows the caption, and for
the AR prior a 319-component PCA + 1024-bucket quantiser fitted on them. For the bare loops every
row is read, tokenized (and for the AR prior coded and bucketed) once into tensors.

- trainer: ``Trainer(DiffusionPriorTask | ARPriorTask)`` for ``--steps`` steps with everything on: the
  embeddings reader (seeded file order and row permutation, exact resume position), tokenizing and
  trimming (and coding) each batch, AdamW with the schedule, global-norm clipping, EMA, TensorBoard
  scalars every 5 steps, progress, and a checkpoint every ``--checkpoint-every`` steps plus the exit one;
- bare: the same training over the preloaded tensors (trimmed the same way): network, loss, AdamW,
  global-norm clipping and the EMA (``AveragedModel``, as the trainer's), in a plain loop. Clipping and
  the EMA are part of what is trained (the config asks for them), so both sides pay them; the ratio
  is the trainer's own cost: reading, tokenizing and coding (in its prefetch thread, ``--prefetch``
  batches ahead), the NaN guard's sync, logging, progress and checkpoints.

Both skip their first 5 steps (warm-up), then time each window of 5 steps (the trainer's logging
interval, so each window holds one log write); repeats alternate; ratio = bare's median window time /
the trainer's (robust to the windows a busy host slows down), with the ratio of the means beside it.
Sampling: embeddings/s of ``prior.sample`` (DDIM with ``--sample-steps`` steps, 2 candidates,
guidance 1 and 2; the caption prefix run once, and against the full sequence at every step as its
reference) and of the AR prior (319 codes with the key/value cache, guidance 1 and 2, decoded
through the PCA), after one warm-up batch; for the AR prior also against a full pass per code (the
cache's reference, same batch).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
WARMUP = WINDOW = 5  # steps: the first window is not timed; then the seconds of each window of 5
GRAD_CLIP, EMA_DECAY = 1.0, 0.99


def tokenizer():
    import open_clip

    from unclip.data import clip as clip_data

    clip_data.register_project_configs()
    return open_clip.get_tokenizer("unclip-tiny")


def preload(files, tok, q=None) -> dict:
    import numpy as np
    import torch

    from unclip.data import embedding_pairs
    from unclip.train.prior_ar import codes_and_dots

    rows = [embedding_pairs.read_rows(u) for u in files.column("kept").to_pylist()]
    img = np.concatenate([r["image_emb"] for r in rows]).astype(np.float32)
    txt = np.concatenate([r["text_emb"] for r in rows]).astype(np.float32)
    out = {"image_emb": torch.from_numpy(img), "text_emb": torch.from_numpy(txt),
           "tokens": tok([c for r in rows for c in r["caption"]])}
    if q is not None:
        out["codes"], out["dot"] = codes_and_dots(q, img, txt)
        out["dot_buckets"] = q.dot_quantiser.n_buckets
    return out


def bare(kind: str, args, data: dict, flavour: str, batch: int) -> float:
    import torch

    from torch.optim.swa_utils import AveragedModel

    from unclip.models import ar_prior, prior
    from unclip.models.prior import trim_tokens
    from unclip.train.trainer import ema_avg_fn

    torch.manual_seed(0)
    n = len(data["image_emb"])
    if kind == "diffusion":
        cfg = prior.FLAVOURS[flavour]
        model = prior.DiffusionPrior(cfg)
        diffusion = model.diffusion()
    else:
        cfg = ar_prior.ARPriorConfig(**{**ar_prior.FLAVOURS[flavour].to_dict(), "n_codes": data["codes"].shape[1],
                                        "dot_buckets": int(data["dot_buckets"])})
        model = ar_prior.ARPrior(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as the trainer's
    ema = AveragedModel(model, multi_avg_fn=ema_avg_fn(EMA_DECAY), use_buffers=True)
    marks: list[float] = []
    for step in range(args.steps + WARMUP):
        if step % WINDOW == 0 and step >= WARMUP:
            marks.append(time.perf_counter())
        i = (step * batch) % (n - batch)
        tokens = trim_tokens(data["tokens"][i:i + batch])
        if kind == "diffusion":
            loss = prior.training_loss(model, cfg, diffusion, image_emb=data["image_emb"][i:i + batch],
                                       text_emb=data["text_emb"][i:i + batch], tokens=tokens)
        else:
            loss, _ = ar_prior.training_loss(model, cfg, codes=data["codes"][i:i + batch], tokens=tokens,
                                             text_emb=data["text_emb"][i:i + batch], dot=data["dot"][i:i + batch])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update_parameters(model)
    marks.append(time.perf_counter())
    return [b - a for a, b in zip(marks, marks[1:])]


def trainer(kind: str, args, files, tok, q, out: str, flavour: str, batch: int) -> float:
    from unclip.config import ARPriorTrainConfig, DiffusionPriorTrainConfig
    from unclip.train.prior import DiffusionPriorTask
    from unclip.train.prior_ar import ARPriorTask
    from unclip.train.trainer import Trainer

    shutil.rmtree(out, ignore_errors=True)
    common = dict(flavour=flavour, steps=args.steps + WARMUP, batch_size=batch, warmup_steps=1,
                  checkpoint_every=args.checkpoint_every, log_every=WINDOW, grad_clip=GRAD_CLIP, ema_decay=EMA_DECAY,
                  prefetch_batches=args.prefetch)
    if kind == "diffusion":
        cfg = DiffusionPriorTrainConfig(**common)
        task = DiffusionPriorTask(cfg, files, None, tok, embed_dim=1024, text_ctx=77)
    else:
        cfg = ARPriorTrainConfig(**common)
        task = ARPriorTask(cfg, files, None, tok, q, "bench", text_ctx=77)
    marks: list[float] = []

    def on_progress(step: int, steps: int, scalars: dict) -> None:
        marks.append(time.perf_counter())

    Trainer(task, cfg, out, on_progress=on_progress).run()
    # on_progress fires every log_every (= WINDOW) steps, from step WARMUP to the last
    return [b - a for a, b in zip(marks, marks[1:])]


def sampling(kind: str, args, data: dict, q, flavour: str, guidance: float) -> float:
    import numpy as np
    import torch

    from unclip.models import ar_prior, prior

    torch.manual_seed(0)
    b = args.sample_batch
    text, tokens = data["text_emb"][:b], data["tokens"][:b]
    if kind == "diffusion":
        model = prior.DiffusionPrior(prior.FLAVOURS[flavour]).eval()

        def run() -> None:
            prior.sample(model, text_emb=text, tokens=tokens, guidance=guidance, steps=args.sample_steps, candidates=2,
                         generator=torch.Generator().manual_seed(0))
    else:
        cfg = ar_prior.ARPriorConfig(**{**ar_prior.FLAVOURS[flavour].to_dict(), "n_codes": q.n_components})
        model = ar_prior.ARPrior(cfg).eval()
        dot = torch.from_numpy(q.sample_dot_bucket_upper_half(np.random.default_rng(0), b).astype(np.int64))

        def run() -> None:
            codes = ar_prior.sample(model, tokens=prior.trim_tokens(tokens), text_emb=text, dot=dot, guidance=guidance,
                                    generator=torch.Generator().manual_seed(0))
            q.decode(codes.numpy())

    run()
    t0 = time.perf_counter()
    run()
    return b / (time.perf_counter() - t0)


def uncached_diffusion_sampling(args, data: dict, flavour: str) -> float:
    """The reference for the prefix cache: DDIM over the full sequence (caption, text embedding and
    the step's tokens) at every step, as training runs it; guidance 1, 2 candidates."""
    import math

    import torch

    from unclip.models import prior
    from unclip.models.diffusion import guided

    torch.manual_seed(0)
    b = args.sample_batch
    model = prior.DiffusionPrior(prior.FLAVOURS[flavour]).eval()
    scale = math.sqrt(model.cfg.embed_dim)
    text, tokens = data["text_emb"][:b].repeat(2, 1) * scale, prior.trim_tokens(data["tokens"][:b]).repeat(2, 1)
    keep = torch.zeros(2 * b, dtype=torch.bool)
    t0 = time.perf_counter()
    model.diffusion().respaced(args.sample_steps).sample(
        guided(model, 1.0, uncond_kwargs={"drop": ~keep}), (2 * b, model.cfg.embed_dim),
        generator=torch.Generator().manual_seed(0), model_kwargs={"tokens": tokens, "text_emb": text, "drop": keep})
    return b / (time.perf_counter() - t0)


def uncached_ar_sampling(args, data: dict, q, flavour: str) -> float:
    """The reference for the cache: each code from a full pass over the prefix and the codes so far
    (what sampling cost before the key/value cache), guidance 1, multinomial draws."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from unclip.models import ar_prior, prior

    torch.manual_seed(0)
    b = args.sample_batch
    text, tokens = data["text_emb"][:b], prior.trim_tokens(data["tokens"][:b])
    cfg = ar_prior.ARPriorConfig(**{**ar_prior.FLAVOURS[flavour].to_dict(), "n_codes": q.n_components})
    model = ar_prior.ARPrior(cfg).eval()
    dot = torch.from_numpy(q.sample_dot_bucket_upper_half(np.random.default_rng(0), b).astype(np.int64))
    keep = torch.zeros(b, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    with torch.no_grad():
        codes = torch.zeros(b, 0, dtype=torch.long)
        for _ in range(cfg.n_codes):
            logits = model(codes, tokens=tokens, text_emb=text, dot=dot, drop=keep)[:, -1]
            codes = torch.cat([codes, torch.multinomial(F.softmax(logits, -1), 1, generator=g)], 1)
    return b / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--ar-batch-size", type=int, default=32)
    ap.add_argument("--diffusion-flavour", default="tiny")
    ap.add_argument("--ar-flavour", default="micro")
    # a checkpoint of the tiny diffusion prior takes about 0.5 s here; real runs write one every
    # hundreds to thousands of steps, so the default times none but the untimed exit one
    ap.add_argument("--checkpoint-every", type=int, default=1000)
    ap.add_argument("--prefetch", type=int, default=2, help="the trainer's prefetch_batches")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--priors", default="diffusion,ar", help="which to measure, comma-separated")
    ap.add_argument("--sample-batch", type=int, default=64)
    ap.add_argument("--sample-steps", type=int, default=64)
    args = ap.parse_args()

    import torch

    from test_prior_ar_stage import _fit_pca
    from test_prior_stage import make_embedding_files

    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = Path(tempfile.mkdtemp(prefix="bench-priors-"))
    try:
        files = make_embedding_files(work / "data", n_files=24, rows=200)
        tok = tokenizer()
        q = _fit_pca(files, n_components=319, n_buckets=1024, dot_buckets=1024)
        data = preload(files, tok, q)
        print(f"data: {files.num_rows} files, {len(data['image_emb'])} rows; torch threads {torch.get_num_threads()}")
        for kind, flavour, batch in (("diffusion", args.diffusion_flavour, args.batch_size),
                                     ("ar", args.ar_flavour, args.ar_batch_size)):
            if kind not in args.priors.split(","):
                continue
            windows: dict[str, list[float]] = {"bare": [], "trainer": []}
            for r in range(args.repeats):
                b = bare(kind, args, data, flavour, batch)
                t = trainer(kind, args, files, tok, q, str(work / f"run-{kind}-{r}"), flavour, batch)
                windows["bare"] += b
                windows["trainer"] += t
                print(f"  {kind} repeat {r}: bare {WINDOW * len(b) / sum(b):.3f} steps/s, trainer "
                      f"{WINDOW * len(t) / sum(t):.3f} steps/s, ratio {sum(b) / len(b) / (sum(t) / len(t)):.3f}",
                      flush=True)
            # the median window: robust to the few windows a busy host slows down, on either side
            b, t = (WINDOW / statistics.median(windows[k]) for k in ("bare", "trainer"))
            mean_ratio = statistics.mean(windows["bare"]) / statistics.mean(windows["trainer"])
            print(f"{kind} prior ({flavour}, batch {batch}): bare {b:.3f} steps/s, trainer {t:.3f} steps/s "
                  f"(median of {len(windows['bare'])} windows of {WINDOW} steps each), ratio {t / b:.3f} "
                  f"(goal >= 0.95); ratio of the means {mean_ratio:.3f}")
            if kind == "diffusion":
                ref = uncached_diffusion_sampling(args, data, flavour)
                cached = sampling(kind, args, data, q, flavour, 1.0)
                print(f"diffusion prior sampling, guidance 1, batch {args.sample_batch}: caption prefix run once "
                      f"{cached:.1f} embeddings/s, full sequence every step {ref:.1f} embeddings/s, "
                      f"ratio {cached / ref:.1f}")
            if kind == "ar":
                ref = uncached_ar_sampling(args, data, q, flavour)
                cached = sampling(kind, args, data, q, flavour, 1.0)
                print(f"ar prior sampling, guidance 1, batch {args.sample_batch}: cached {cached:.1f} embeddings/s, "
                      f"full pass per code {ref:.1f} embeddings/s, ratio {cached / ref:.1f}")
            for g in (1.0, 2.0):
                rate = sampling(kind, args, data, q, flavour, g)
                what = f"{args.sample_steps} DDIM steps x 2 candidates" if kind == "diffusion" else "319 codes, cached"
                print(f"{kind} prior sampling ({what}, guidance {g:g}, batch {args.sample_batch}): {rate:.1f} embeddings/s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
