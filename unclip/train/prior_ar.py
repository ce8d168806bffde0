"""AR prior training (stage ``prior_ar``; MISSION "Prior", the autoregressive kind).

The rows are those of the diffusion prior (``unclip.train.prior``): the generative sources' stored
embeddings and captions, training split. The dataset version's PCA + quantiser (or the run's own
``pca`` stage's, when it ran one) turns each image embedding into ``n_components`` codes of
``n_buckets`` values, and the stored text-image dot product into the conditioning token; the PCA
file travels in the release folder and its version in the lineage, since the codes mean nothing
without it. The network and its loss are ``unclip.models.ar_prior``; the shared trainer does the rest.

Evaluation (``evaluate_ar_prior``), on held-out pairs:

- ``nll_per_code`` (nats) and ``code_acc``: teacher-forced, with the true dot-product token, against
  ``nll_per_code_uniform`` = ln(n_buckets);
- sampled codes (dot-product token drawn from the upper half of its training distribution, the
  paper's choice) decoded through the quantiser and the PCA, then the diffusion prior's metrics:
  ``cosine_true``, ``cosine_text_baseline``, ``cosine_unrelated``, ``i2i_recall@{1,5}``;
- ``cosine_true_ceiling``: the true embedding encoded and decoded, what the codes can express at best.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits
from torch import nn

from unclip import storage
from unclip.config import ARPriorTrainConfig, RunConfig
from unclip.data import embedding_pairs, embeddings
from unclip.data.pca import PcaQuantiser
from unclip.models import ar_prior as ar_model
from unclip.models.ar_prior import ARPrior, ARPriorConfig
from unclip.models.prior import trim_tokens
from unclip.train import distributed
from unclip.train.prior import caption_tokenizer, finish, prediction_metrics, prepared_batches, prior_data
from unclip.train.trainer import Trainer

PCA_FILE = "pca.npz"


class ARPriorTask:
    """The ``prior_ar`` training task for the shared trainer."""

    name = "prior_ar"

    def __init__(self, cfg: ARPriorTrainConfig, train_files: pa.Table, eval_files: pa.Table | None, tokenizer,
                 pca: PcaQuantiser, pca_version: str | None, *, text_ctx: int) -> None:
        self.cfg, self.train_files, self.eval_files = cfg, train_files, eval_files
        self.tokenizer, self.pca, self.pca_version = tokenizer, pca, pca_version
        self.text_ctx = text_ctx
        self.prior_cfg: ARPriorConfig | None = None
        self._held: dict | None = None

    def model_config(self) -> dict:
        prior = dataclasses.replace(ar_model.FLAVOURS[self.cfg.flavour], n_codes=self.pca.n_components,
                                    n_buckets=self.pca.quantiser.n_buckets,
                                    dot_buckets=self.pca.dot_quantiser.n_buckets, embed_dim=self.pca.dim,
                                    text_ctx=self.text_ctx, cond_drop=self.cfg.cond_drop,
                                    head=self.cfg.head, mixtures=self.cfg.mixtures,
                                    code_features=self.cfg.code_features)
        return {"flavour": self.cfg.flavour, "prior": prior.to_dict(), "pca_version": self.pca_version,
                "pca_fingerprint": self.pca.fingerprint()}

    def build_model(self, model_config: dict) -> nn.Module:
        if model_config.get("pca_fingerprint") not in (None, self.pca.fingerprint()):
            raise ValueError(f"prior_ar: the checkpoint was trained on PCA {model_config.get('pca_version')}, "
                             f"not on this run's {self.pca_version}")
        self.prior_cfg = ARPriorConfig(**model_config["prior"])
        return ARPrior(self.prior_cfg)

    def encode(self, image_emb: np.ndarray, text_emb: np.ndarray, captions: list[str]) -> dict[str, torch.Tensor]:
        """Stored rows -> the prior's inputs: codes, dot-product token, caption tokens (trimmed)."""
        codes, dot = codes_and_dots(self.pca, image_emb, text_emb)
        return {"codes": codes, "dot": dot, "text_emb": torch.from_numpy(text_emb),
                "tokens": trim_tokens(self.tokenizer(captions))}

    def batches(self, micro_batch: int, start: int, ctx: distributed.DistContext) -> Iterator[dict]:
        # numpy's BLAS (the PCA projection of each batch) on one thread for the run: its idle threads
        # spin beside torch's, and took 14% of the training step on 2 cores (ratio to a bare loop 0.86
        # against 1.00 with one thread; bench/bench_priors.py). A batch's projection is ~1 ms on one.
        with threadpool_limits(1, user_api="blas"):
            yield from prepared_batches(self.train_files, self.cfg, self.encode, micro_batch, start, ctx)

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        return ar_model.training_loss(model, self.prior_cfg, codes=batch["codes"], tokens=batch["tokens"],
                                      text_emb=batch["text_emb"], dot=batch["dot"])

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if self.eval_files is None or not self.eval_files.num_rows:
            return {}
        if self._held is None:
            self._held = embedding_pairs.held_out(self.eval_files, self.cfg.eval_pairs, seed=self.cfg.seed)
        return evaluate_ar_prior(model, self._held, self.tokenizer, self.pca, guidance=self.cfg.guidance,
                                 temperature=self.cfg.temperature, seed=self.cfg.seed)


def codes_and_dots(pca: PcaQuantiser, image_emb: np.ndarray, text_emb: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, d] float32 stored embeddings -> the image's codes [n, K] and the bucket of the text-image
    dot product [n] (as the PCA fit measured it: the stored vectors' dot product), int64."""
    codes = pca.encode(image_emb).astype(np.int64)
    dot = pca.encode_dot(np.einsum("ij,ij->i", image_emb, text_emb)).astype(np.int64)
    return torch.from_numpy(codes), torch.from_numpy(dot)


@torch.no_grad()
def evaluate_ar_prior(model: ARPrior, held: dict[str, Any], tokenizer, pca: PcaQuantiser, *, guidance: float,
                      temperature: float, seed: int = 0, batch_size: int = 128) -> dict[str, float]:
    """Held-out likelihood, code accuracy and the sampled embeddings' metrics (module docstring)."""
    device = next(model.parameters()).device
    img, txt = held["image_emb"], held["text_emb"]
    tokens = tokenizer(held["caption"])
    codes, dot = codes_and_dots(pca, img, txt)
    nll = correct = 0.0
    rows = max(1, 4096 // codes.shape[1])  # the whole distribution per code: rows x codes x buckets (x mixtures)
    for i in range(0, len(codes), rows):
        c = codes[i:i + rows].to(device)
        log_prob = model(c[:, :-1], tokens=trim_tokens(tokens[i:i + rows]).to(device),
                         text_emb=torch.from_numpy(txt[i:i + rows]).to(device), dot=dot[i:i + rows].to(device),
                         drop=torch.zeros(len(c), dtype=torch.bool, device=device))  # [n, K, B]
        nll -= float(log_prob.gather(-1, c[..., None]).sum())
        correct += float((log_prob.argmax(-1) == c).sum())
    n_codes = codes.numel()
    # the dot-product tokens of the samples: the upper half of the training distribution, one seeded draw
    drawn = torch.from_numpy(pca.sample_dot_bucket_upper_half(np.random.default_rng(seed), len(codes)).astype(np.int64))
    text = torch.from_numpy(txt)

    def predict(index: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        sampled = ar_model.sample(model, tokens=trim_tokens(tokens[index]).to(device), text_emb=text[index].to(device),
                                  dot=drawn[index].to(device), guidance=guidance, temperature=temperature,
                                  generator=g)
        return torch.from_numpy(pca.decode(sampled.cpu().numpy()))

    metrics = prediction_metrics(held, predict, seed=seed, device=device, batch_size=batch_size)
    ceiling = F.normalize(torch.from_numpy(pca.decode(codes.numpy())), dim=-1)
    metrics.update(
        nll_per_code=nll / n_codes, nll_per_code_uniform=float(np.log(pca.quantiser.n_buckets)),
        code_acc=correct / n_codes, code_acc_chance=1.0 / pca.quantiser.n_buckets,
        cosine_true_ceiling=float((ceiling * F.normalize(torch.from_numpy(img), dim=-1)).sum(-1).mean()))
    return metrics


def pca_for(previous: dict, release: dict) -> tuple[str, str | None]:
    """(uri, version) of the PCA the AR prior codes with: the run's own ``pca`` stage's when it ran
    one, else the dataset version's."""
    own = previous.get("pca") or {}
    if own.get("outputs", {}).get("pca"):
        return own["outputs"]["pca"], own.get("metrics", {}).get("pca_version")
    if release.get("pca"):
        return release["pca"], release.get("pca_version")
    raise ValueError("prior_ar: the dataset version has no PCA and the run fitted none (add the `pca` stage)")


def train_ar_prior(config: RunConfig, train_files: pa.Table, eval_files: pa.Table, out_dir: str, *,
                   release: dict, previous: dict | None = None, catalog_uri: str | None, lineage: dict | None = None,
                   strategy: str = "ddp", ctx: distributed.DistContext | None = None) -> dict | None:
    """Train on the generative sources' training rows, then (rank 0) evaluate the EMA weights on their
    held-out rows and write the release folder (with the PCA). Returns the stage result."""
    cfg = config.train.prior_ar
    pca_uri, pca_version = pca_for(previous or {}, release)
    pca_bytes = storage.read_bytes(pca_uri)
    pca = PcaQuantiser.load(io.BytesIO(pca_bytes))
    if pca.dim != embeddings.EMBED_DIM:
        raise ValueError(f"prior_ar: the PCA {pca_uri} is of {pca.dim}-d embeddings, not {embeddings.EMBED_DIM}")
    train, held = prior_data(config, train_files, eval_files, "prior_ar")
    arch, tokenizer = caption_tokenizer(release, catalog_uri, config)
    task = ARPriorTask(cfg, train, held, tokenizer, pca, pca_version, text_ctx=getattr(tokenizer, "context_length", 77))
    lineage = {**(lineage or {}), "pca_version": pca_version, "pca": pca_uri}
    trainer = Trainer(task, cfg, out_dir, lineage=lineage, strategy=strategy, ctx=ctx)
    result = trainer.run()
    if not trainer.main:
        return None
    done = finish(trainer, result, out_dir, arch, "prior_ar", train, files={PCA_FILE: pca_bytes})
    done["model"]["pca_version"] = pca_version
    return done


def main() -> None:
    """``torchrun ... -m unclip.train.prior_ar --run-dir D --stage prior_ar --context C.json``."""
    distributed.stage_main("prior_ar", "Train the AR prior (stage prior_ar) under torchrun.", _from_context)


def _from_context(config: RunConfig, context: dict, out: str, dist: distributed.DistContext) -> dict | None:
    return train_ar_prior(config, storage.read_parquet(context["train_files"]),
                          storage.read_parquet(context["eval_files"]), out,
                          release=context.get("release_record") or {}, previous=context.get("previous"),
                          catalog_uri=context.get("catalog"), lineage=context.get("lineage"),
                          strategy=config.train.launch.strategy, ctx=dist)


if __name__ == "__main__":
    main()
