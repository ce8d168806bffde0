"""Diffusion prior training (stage ``prior_diffusion``; MISSION "Prior", the diffusion kind).

The rows are the dataset version's stored embeddings of the generative sources (``for_generative``,
the paper's DALL-E data), training split, read by ``unclip.data.embedding_pairs`` with their
captions; the captions are tokenized with the tokenizer of the CLIP that embedded them. The network
and its loss are ``unclip.models.prior``; the shared trainer does the rest (EMA, checkpoints,
resume, NaN guard, TensorBoard, held-out evaluation every ``eval_every`` steps).

Evaluation (``evaluate_prior``), on held-out pairs, in the protocol of DALLE2-pytorch's prior:

- ``cosine_true``: the predicted image embedding (best of ``candidates``) against the true one;
- ``cosine_true_1``: the same with one sample per caption (what best-of-N buys);
- ``cosine_text_baseline``: the CLIP text embedding against the true image embedding;
- ``cosine_unrelated``: the prediction for another pair's caption (a different one) against this image;
- ``i2i_recall@{1,5}``: the prediction retrieving its true image among ``GALLERY`` held-out images.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from unclip import storage
from unclip.config import DiffusionPriorTrainConfig, RunConfig
from unclip.data import embedding_pairs, embeddings
from unclip.data.prefetch import prefetch
from unclip.data.retrieval import RecallCounter
from unclip.models import prior as prior_model
from unclip.models.prior import DiffusionPrior, DiffusionPriorConfig
from unclip.train import distributed
from unclip.train.trainer import Trainer

RECALL_AT = (1, 5)


class DiffusionPriorTask:
    """The ``prior_diffusion`` training task for the shared trainer."""

    name = "prior_diffusion"

    def __init__(self, cfg: DiffusionPriorTrainConfig, train_files: pa.Table, eval_files: pa.Table | None,
                 tokenizer, *, embed_dim: int, text_ctx: int) -> None:
        self.cfg, self.train_files, self.eval_files = cfg, train_files, eval_files
        self.tokenizer = tokenizer
        self.embed_dim, self.text_ctx = embed_dim, text_ctx
        self.prior_cfg: DiffusionPriorConfig | None = None
        self.diffusion = None
        self._held: dict | None = None

    def model_config(self) -> dict:
        base = prior_model.FLAVOURS[self.cfg.flavour]
        prior = dataclasses.replace(base, embed_dim=self.embed_dim, text_ctx=self.text_ctx, cond_drop=self.cfg.cond_drop)
        return {"flavour": self.cfg.flavour, "prior": prior.to_dict()}

    def build_model(self, model_config: dict) -> nn.Module:
        self.prior_cfg = DiffusionPriorConfig(**model_config["prior"])
        model = DiffusionPrior(self.prior_cfg)
        self.diffusion = model.diffusion()
        return model

    def encode(self, image_emb: np.ndarray, text_emb: np.ndarray, captions: list[str]) -> dict[str, torch.Tensor]:
        """Stored rows -> the prior's inputs: the embeddings and the caption tokens (trimmed)."""
        return {"image_emb": torch.from_numpy(image_emb), "text_emb": torch.from_numpy(text_emb),
                "tokens": prior_model.trim_tokens(self.tokenizer(captions))}

    def batches(self, micro_batch: int, start: int, ctx: distributed.DistContext) -> Iterator[dict]:
        return prepared_batches(self.train_files, self.cfg, self.encode, micro_batch, start, ctx)

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        loss = prior_model.training_loss(model, self.prior_cfg, self.diffusion, image_emb=batch["image_emb"],
                                         text_emb=batch["text_emb"], tokens=batch["tokens"])
        return loss, {}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if self.eval_files is None or not self.eval_files.num_rows:
            return {}
        if self._held is None:
            self._held = embedding_pairs.held_out(self.eval_files, self.cfg.eval_pairs, seed=self.cfg.seed)
        return evaluate_prior(model, self._held, self.tokenizer, steps=self.cfg.sample_steps,
                              guidance=self.cfg.guidance, candidates=self.cfg.candidates, seed=self.cfg.seed)


def prepared_batches(files: pa.Table, cfg, encode, micro_batch: int, start: int,
                     ctx: distributed.DistContext) -> Iterator[dict]:
    """This rank's training batches after its first ``start`` micro-batches: rows from the stored
    embeddings (``embedding_pairs``, seeded order, exact resume position) turned into the network's
    inputs by ``encode``, up to ``cfg.prefetch_batches`` of them ahead in a background thread (reading,
    tokenizing and PCA coding overlap the training step; bench/bench_priors.py), then moved to the
    device. The order does not depend on the prefetching, so a resumed run sees the same batches."""
    data = embedding_pairs.EmbeddingPairs(files, batch_size=micro_batch, rank=ctx.rank,
                                          world_size=ctx.world_size, seed=cfg.seed)
    rows = (encode(b["image_emb"], b["text_emb"], b["caption"]) for b in data.stream(start * micro_batch))
    pin = ctx.device.type == "cuda"
    for batch in prefetch(rows, cfg.prefetch_batches):
        yield {k: (v.pin_memory() if pin else v).to(ctx.device, non_blocking=pin) for k, v in batch.items()}


@torch.no_grad()
def evaluate_prior(model: DiffusionPrior, held: dict[str, Any], tokenizer, *, steps: int, guidance: float,
                   candidates: int, seed: int = 0, batch_size: int = 256, only_true: bool = False) -> dict[str, float]:
    """Held-out cosine and retrieval metrics of a diffusion prior (see the module docstring);
    ``only_true``: one sampling pass, for ``cosine_true`` and the recall alone (a guidance sweep)."""
    device = next(model.parameters()).device
    tokens = tokenizer(held["caption"])
    txt = F.normalize(torch.from_numpy(held["text_emb"]), dim=-1)

    def predictor(k: int):
        def predict(index: torch.Tensor, g: torch.Generator) -> torch.Tensor:
            return prior_model.sample(model, text_emb=txt[index].to(device), tokens=tokens[index].to(device),
                                      guidance=guidance, steps=steps, candidates=k, generator=g)
        return predict

    metrics = prediction_metrics(held, predictor(candidates), seed=seed, device=device, batch_size=batch_size)
    if only_true:
        return metrics
    one = predictions(predictor(1), torch.arange(len(txt)), seed * 1_000_003 + 1, device, batch_size)
    metrics["cosine_true_1"] = float((one * F.normalize(torch.from_numpy(held["image_emb"]), dim=-1)).sum(-1).mean())
    return metrics


def predictions(predict, index: torch.Tensor, seed: int, device, batch_size: int) -> torch.Tensor:
    """``predict(index_batch, generator)`` over ``index`` in batches, one seeded generator: [n, D] on the CPU."""
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.cat([F.normalize(predict(index[i:i + batch_size], g).float(), dim=-1).cpu()
                      for i in range(0, len(index), batch_size)])


def unrelated_partners(captions: list[str], seed: int, tries: int = 8) -> np.ndarray:
    """For each row, another row whose caption differs (where ``tries`` seeded draws find one): the
    rows in a seeded cyclic order, each paired with its successor, then with later ones for as long
    as the captions are the same. No row is its own partner once there are two."""
    n = len(captions)
    order = np.random.default_rng(seed).permutation(n)
    caption = np.asarray(captions, dtype=object)[order]
    shift = np.ones(n, dtype=np.int64)
    for _ in range(tries):
        same = (caption[(np.arange(n) + shift) % n] == caption) & (shift < n - 1)
        if not same.any():
            break
        shift[same] += 1
    partners = np.empty(n, dtype=np.int64)
    partners[order] = order[(np.arange(n) + shift) % n]
    return partners


def prediction_metrics(held: dict[str, Any], predict, *, seed: int, device, batch_size: int = 256) -> dict[str, float]:
    """The metrics both priors share, for ``predict(index, generator) -> [len(index), D]`` image
    embeddings of held-out captions ``index``: cosine with the true image embedding, the text
    embedding's cosine (the baseline), the cosine of another pair's prediction (unrelated), and
    image-to-image recall@k of the predictions among the held-out images."""
    img = F.normalize(torch.from_numpy(held["image_emb"]), dim=-1)
    txt = F.normalize(torch.from_numpy(held["text_emb"]), dim=-1)
    n = len(img)
    best = predictions(predict, torch.arange(n), seed * 1_000_003, device, batch_size)
    recall = RecallCounter(ks=RECALL_AT)
    recall.add(best.numpy(), img.numpy())
    r = recall.result()
    metrics = {
        "cosine_true": float((best * img).sum(-1).mean()),
        "cosine_text_baseline": float((txt * img).sum(-1).mean()),
        "heldout_pairs": n, "gallery": r["gallery"],
    }
    other = torch.from_numpy(unrelated_partners(held["caption"], seed))  # the prediction for another caption
    metrics["cosine_unrelated"] = float((best[other] * img).sum(-1).mean())
    for k in RECALL_AT:
        metrics[f"i2i_recall@{k}"] = r[f"i2t_recall@{k}"]
        metrics[f"i2i_recall@{k}_chance"] = r[f"recall@{k}_chance"]
    return metrics


def generative_files(files: pa.Table, generative_sources: list[str]) -> pa.Table:
    """The rows of the sources the generative stack trains on."""
    keep = np.isin(np.array(files.column("source").to_pylist(), dtype=object), generative_sources)
    return files.filter(pa.array(keep))


WEIGHTS_FILE = "model.safetensors"


def tokenizer_arch(release: dict, catalog_uri: str | None, config: RunConfig) -> str:
    """The open_clip architecture whose tokenizer goes with the captions' CLIP embeddings: the
    dataset version's CLIP model version when it came from the catalog, else the architecture its
    config embedded with, else this run's embed config."""
    version = release.get("clip_model_version")
    if version and catalog_uri:
        from unclip import catalog

        return catalog.resolve_model(catalog_uri, version)["arch"]
    embedded = (((release.get("config") or {}).get("embed") or {}).get("model") or {}).get("arch")
    arch = embedded or config.embed.model.arch
    if arch is None:
        raise ValueError("priors: the dataset version names no CLIP model version or architecture, "
                         "and embed.model no arch")
    return arch


def write_release(model: nn.Module, model_config: dict, arch: str | None, folder: str, *, kind: str,
                  files: dict[str, bytes] | None = None, meta: str = "prior.json") -> dict:
    """``prior.json`` (``meta``: the stage, the network's config and the tokenizer's arch),
    ``model.safetensors`` (the EMA weights) and any further ``files`` (the AR prior's PCA):
    ``load_release`` (the image models': ``unclip.train.image.load_release``) rebuilds it."""
    import hashlib

    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    data = save(state, metadata={"kind": kind})
    weights_uri = storage.write_bytes(storage.join(folder, WEIGHTS_FILE), data)
    for name, blob in (files or {}).items():
        storage.write_bytes(storage.join(folder, name), blob)
    storage.write_json(storage.join(folder, meta), {"kind": kind, **model_config, "tokenizer": arch})
    return {"uri": folder, "weights": weights_uri, "arch": arch, "weights_sha256": hashlib.sha256(data).hexdigest(),
            "parameters": sum(v.numel() for v in state.values()), "flavour": model_config["flavour"]}


def load_release(folder: str) -> tuple[nn.Module, dict]:
    """A released prior (either kind) in eval mode, and its ``prior.json``."""
    from safetensors.torch import load

    from unclip.models.ar_prior import ARPrior, ARPriorConfig

    meta = storage.read_json(storage.join(folder, "prior.json"))
    kind = meta.get("kind", "prior_diffusion")
    model = ARPrior(ARPriorConfig(**meta["prior"])) if kind == "prior_ar" else \
        DiffusionPrior(DiffusionPriorConfig(**meta["prior"]))
    model.load_state_dict(load(storage.read_bytes(storage.join(folder, WEIGHTS_FILE))))
    return model.eval(), meta


def prior_data(config: RunConfig, train_files: pa.Table, eval_files: pa.Table, stage: str) -> tuple[pa.Table, pa.Table]:
    """The training and held-out files of the generative sources; an error when no training row is left."""
    generative = [s.name for s in config.sources if s.for_generative]
    train, held = generative_files(train_files, generative), generative_files(eval_files, generative)
    if not train.num_rows:
        raise ValueError(f"{stage}: no training rows from the generative sources {generative}")
    return train, held


def caption_tokenizer(release: dict, catalog_uri: str | None, config: RunConfig):
    """(arch, open_clip tokenizer) of the CLIP that embedded the dataset version's captions."""
    import open_clip

    from unclip.data import clip as clip_data

    arch = tokenizer_arch(release, catalog_uri, config)
    clip_data.register_project_configs()
    return arch, check_caption_tokenizer(open_clip.get_tokenizer(arch), arch)


def check_caption_tokenizer(tokenizer, arch: str):
    """``tokenizer`` if the priors' and the decoder's text encoders can read its tokens: open_clip's CLIP
    BPE, whose ids they embed (``vocab_size``), 0 pads and the end-of-text token the highest id (where
    they pool); else a ValueError before any training."""
    from open_clip.tokenizer import SimpleTokenizer

    expected = DiffusionPriorConfig.vocab_size  # the UNet's and the AR prior's too
    if not isinstance(tokenizer, SimpleTokenizer) or tokenizer.vocab_size != expected or \
            tokenizer.eot_token_id != expected - 1:
        raise ValueError(
            f"the CLIP {arch!r} tokenizes captions with {type(tokenizer).__name__} "
            f"(vocab {getattr(tokenizer, 'vocab_size', '?')}, end of text {getattr(tokenizer, 'eot_token_id', '?')}); "
            f"the priors and the decoder read open_clip's CLIP BPE ({expected} tokens, 0 pads, the end-of-text "
            f"token {expected - 1}): embed the dataset with a CLIP that uses it")
    return tokenizer


def finish(trainer: Trainer, result, out_dir: str, arch: str | None, kind: str, train: pa.Table,
           files: dict[str, bytes] | None = None, meta: str = "prior.json") -> dict:
    """Rank 0 after training: the released weights' metrics, the release folder, the stage result."""
    model, model_config, metrics = trainer.released(result)
    # the held-out split may hold no shard of the generative sources (small data): say so in the metrics
    metrics.setdefault("heldout_pairs", 0)
    metrics.update(steps=result.step, train_rows=int(sum(train.column("rows").to_pylist())))
    rel = write_release(model, model_config, arch, storage.join(out_dir, "model"), kind=kind, files=files, meta=meta)
    storage.write_json(storage.join(out_dir, "metrics.json"), metrics)
    return {"outputs": {"model": rel["uri"], "checkpoint": result.checkpoint,
                        "tensorboard": storage.join(out_dir, "tensorboard")},
            "metrics": metrics, "model": {"kind": kind, **rel, "resumed_from": result.resumed_from}}


def train_diffusion_prior(config: RunConfig, train_files: pa.Table, eval_files: pa.Table, out_dir: str, *,
                          release: dict, catalog_uri: str | None, lineage: dict | None = None,
                          strategy: str = "ddp", ctx: distributed.DistContext | None = None) -> dict | None:
    """Train on the generative sources' training rows, then (rank 0) evaluate the EMA weights on their
    held-out rows and write the release folder. Returns the stage result ({"outputs", "metrics", "model"})."""
    cfg = config.train.prior_diffusion
    train, held = prior_data(config, train_files, eval_files, "prior_diffusion")
    arch, tokenizer = caption_tokenizer(release, catalog_uri, config)
    task = DiffusionPriorTask(cfg, train, held, tokenizer, embed_dim=embeddings.EMBED_DIM,
                              text_ctx=getattr(tokenizer, "context_length", 77))
    trainer = Trainer(task, cfg, out_dir, lineage=lineage, strategy=strategy, ctx=ctx)
    result = trainer.run()
    return finish(trainer, result, out_dir, arch, "prior_diffusion", train) if trainer.main else None


def main() -> None:
    """``torchrun ... -m unclip.train.prior --run-dir D --stage prior_diffusion --context C.json``."""
    distributed.stage_main("prior_diffusion", "Train the diffusion prior (stage prior_diffusion) under torchrun.",
                           _from_context)


def _from_context(config: RunConfig, context: dict, out: str, dist: distributed.DistContext) -> dict | None:
    return train_diffusion_prior(config, storage.read_parquet(context["train_files"]),
                                 storage.read_parquet(context["eval_files"]), out,
                                 release=context.get("release_record") or {}, catalog_uri=context.get("catalog"),
                                 lineage=context.get("lineage"), strategy=config.train.launch.strategy, ctx=dist)


if __name__ == "__main__":
    main()
