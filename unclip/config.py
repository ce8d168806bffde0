"""Run configuration: nested, frozen pydantic models loaded from YAML.

One schema serves the built-in demo (configs/demo.yaml), the paper-scale run (configs/paper.yaml) and
a user's own URL lists. Every model forbids unknown fields, so a typo fails before any work with the
field's dotted path in the message (``ConfigError``). The same models are the Prefect flows'
parameters, so the Prefect UI renders them as a typed form.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# A stage is a named step of the pipeline, and a name means one operation wherever it appears: the data
# pipeline runs these in order (``--until``); ``retrain`` runs the training and evaluation stages of
# ``unclip.train.stages`` (``--stages``), where ``clip`` and ``pca`` are the same operations on a dataset
# version's training split.
DATA_STAGES: tuple[str, ...] = ("ingest", "basic_filter", "clip", "embed", "semantic_filter", "pca")

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def _check_name(v: str) -> str:
    if not _NAME.match(v):
        raise ValueError("must match [a-z0-9][a-z0-9_-]* (at most 63 characters)")
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # old field name -> new one: a config that still uses the old name fails with the new name
    _renamed: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for old, new in cls._renamed.items():
                if old in data:
                    raise ValueError(f"`{old}` was renamed to `{new}`")
        return data


class SourceConfig(_Strict):
    """One image-text source: a path or glob of Parquet/CSV URL lists."""

    name: str = Field(description="Short name: lowercase letters, digits, '-' and '_'.")
    url_list: str = Field(
        description="Path, fsspec URI or glob of .parquet/.csv files; each file is one or more input partitions."
    )
    url_col: str = Field("url", description="Column holding the image URL.")
    caption_col: str = Field("caption", description="Column holding the caption.")
    extra_cols: tuple[str, ...] = Field((), description="Further input columns carried into the shards' metadata.")
    for_generative: bool = Field(
        True,
        description="Whether the prior/decoder/upsamplers train on this source (the paper's 'DALL-E data'); "
        "CLIP trains on every source.",
    )

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        return _check_name(v)

    @field_validator("extra_cols")
    @classmethod
    def _extra_ok(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        reserved = {"uid", "url", "caption", "key", "status", "error_message", "width", "height",
                    "original_width", "original_height", "exif", "md5", "sha256", "sha512", "source"}
        clash = sorted(set(v) & reserved)
        if clash:
            raise ValueError(f"reserved column names cannot be extra columns: {clash}")
        return v


class UrlPolicyConfig(_Strict):
    """Which URLs the downloader may contact. Checked on the URL text, at every redirect hop and on the
    address a host name resolves to, before any connection is made."""

    allowed_schemes: tuple[Literal["http", "https"], ...] = Field(("http", "https"), min_length=1)
    allow_hosts: tuple[str, ...] = Field(
        (),
        description="Hosts exempt from the private/loopback/link-local refusal: host names, IP addresses or "
        "CIDR networks. Empty by default.",
    )
    max_redirects: int = Field(5, ge=0, le=20)

    @field_validator("allow_hosts")
    @classmethod
    def _hosts_ok(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for h in v:
            h = h.strip().lower()
            if not h:
                raise ValueError("empty host entry")
            if "/" in h:
                try:
                    ipaddress.ip_network(h, strict=False)
                except ValueError as e:
                    raise ValueError(f"{h!r} is not a valid CIDR network: {e}") from None
            out.append(h)
        return tuple(out)


class IngestConfig(_Strict):
    """img2dataset download settings and the safety caps around it."""

    url_policy: UrlPolicyConfig = UrlPolicyConfig()
    partition_rows: int = Field(
        1_000_000, ge=1, description="Rows per input partition, the unit of incremental re-runs: a partition "
        "downloaded once is never downloaded again."
    )
    partitions_per_call: int = Field(
        8, ge=1, description="Partitions downloaded by one img2dataset call (one Prefect task run); a call "
        "pays several seconds of process start-up."
    )
    samples_per_shard: int = Field(10_000, ge=1, le=1_000_000)
    image_size: int = Field(256, ge=8, le=4096, description="img2dataset resize target (pixels).")
    resize_mode: Literal["border", "keep_ratio", "keep_ratio_largest", "center_crop", "no"] = "border"
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(95, ge=1, le=100)
    processes: int = Field(2, ge=1, description="img2dataset worker processes.")
    threads: int = Field(64, ge=1, description="Download threads per worker process.")
    distributor: Literal["multiprocessing", "ray", "pyspark"] = "multiprocessing"
    spark_master: str | None = Field(
        None, description="Spark master URL for distributor 'pyspark' (spark://host:7077, k8s://...); None runs "
        "a local Spark with `processes` cores.",
    )
    timeout_s: float = Field(10.0, gt=0, description="Whole-response deadline per download (connect to last byte).")
    retries: int = Field(0, ge=0, le=10, description="img2dataset per-image retries.")
    max_body_bytes: int = Field(20 * 2**20, ge=1024, description="Response bodies larger than this are refused.")
    max_image_pixels: int = Field(
        64 * 2**20, ge=1024, description="Images with more pixels are refused before decoding (decompression bombs)."
    )
    user_agent_token: str | None = Field("unclip-pipeline", description="Token matched against X-Robots-Tag.")
    disallowed_header_directives: tuple[str, ...] = Field(
        ("noai", "noimageai", "noindex", "noimageindex"),
        description="X-Robots-Tag directives that opt an image out (img2dataset's defaults).",
    )


class BasicFilterConfig(_Strict):
    """Per-sample filters on img2dataset's metadata, then exact de-duplication by content hash."""

    min_side: int = Field(64, ge=1, description="Minimum of the original width and height, in pixels.")
    max_aspect_ratio: float = Field(3.0, ge=1.0, description="Maximum of long side / short side.")
    min_caption_chars: int = Field(1, ge=1, description="Captions shorter than this (after stripping) are dropped.")
    max_caption_chars: int = Field(512, ge=1)
    dedup_buckets: int = Field(
        64, ge=1, le=65536, description="Hash buckets for the exact-duplicate pass; memory per bucket is rows/buckets."
    )

    @model_validator(mode="after")
    def _caption_range(self) -> "BasicFilterConfig":
        if self.max_caption_chars < self.min_caption_chars:
            raise ValueError("max_caption_chars must be >= min_caption_chars")
        return self


class ClipModelConfig(_Strict):
    """Which open_clip model embeds: an architecture name plus exactly one weight source, or a model
    version from the catalog (which knows its architecture)."""

    arch: str | None = Field(None, description="An open_clip architecture name, including the project's "
                             "registered ones (not with `catalog`).")
    pretrained: str | None = Field(None, description="open_clip pretrained tag (needs a reachable hub).")
    checkpoint: str | None = Field(None, description="Path or URI of a local open_clip checkpoint.")
    seed: int | None = Field(None, description="Seeded random initialisation (no weights).")
    catalog: str | None = Field(None, description="A CLIP model version in the catalog: 'clip@latest', "
                                "'clip@<version>' or a version id (see `unclip models`).")

    @model_validator(mode="after")
    def _one_source(self) -> "ClipModelConfig":
        given = [k for k in ("pretrained", "checkpoint", "seed", "catalog") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one of pretrained, checkpoint, seed, catalog (got {given or 'none'})")
        if self.catalog is not None:
            if self.arch is not None:
                raise ValueError("arch comes from the catalog's model version: leave it out with `catalog`")
            if not re.match(r"^[a-z0-9_]+(@[A-Za-z0-9_.-]+)?$|^[a-z0-9_]+-[0-9a-f]+$", self.catalog):
                raise ValueError("catalog: expected 'clip@latest', 'clip@<version>' or a version id")
        elif self.arch is None:
            raise ValueError("arch is required (unless the model comes from the catalog)")
        return self

    @property
    def weights(self) -> str:
        if self.pretrained is not None:
            return f"pretrained:{self.pretrained}"
        if self.checkpoint is not None:
            return f"checkpoint:{self.checkpoint}"
        if self.catalog is not None:
            return f"catalog:{self.catalog}"
        return f"random-init:seed={self.seed}"


class EmbedConfig(_Strict):
    model: ClipModelConfig
    batch_size: int = Field(256, ge=1)
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes decoding images.")
    dtype: Literal["float16", "float32"] = Field("float16", description="Storage type of the embedding columns.")
    device: str = Field("auto", description="'auto' (cuda when available), 'cpu' or 'cuda[:N]'.")
    shards_per_task: int = Field(64, ge=1, description="Shards embedded by one Prefect task run.")
    gpus_per_task: float = Field(
        0.0, ge=0.0, description="GPUs each embed task run asks Ray for (orchestration.task_runner: ray); "
        "0 runs them on CPU workers. Set 1 for a GPU cluster: Ray then waits for (or autoscales) GPU nodes.",
    )


class NearDupConfig(_Strict):
    threshold: float = Field(0.96, gt=0.0, le=1.0, description="Cosine similarity at or above which a later image "
                             "is a near duplicate of an earlier one.")
    cluster_size: int = Field(
        100_000, ge=2, description="Target rows per k-means cell; pairs are searched within a cell, so memory and "
        "time grow with this, not with the dataset."
    )


class SemanticFilterConfig(_Strict):
    min_clip_score: float | None = Field(
        0.2, ge=-1.0, le=1.0, description="Drop pairs whose image-text cosine is below this; null disables."
    )
    near_dup: NearDupConfig | None = NearDupConfig()


class PcaConfig(_Strict):
    """The AR prior's target representation (paper: 319 of 1024 dims, 1024 buckets each)."""

    n_components: int = Field(319, ge=1)
    n_buckets: int = Field(1024, ge=2, le=65536)
    dot_buckets: int = Field(1024, ge=2, le=65536, description="Buckets of the text-image dot-product token.")
    max_rows: int = Field(1_000_000, ge=2, description="At most this many rows (sampled uniformly) are fitted.")
    batch_rows: int = Field(65_536, ge=1, description="Rows per streaming batch; bounds memory with the dimension.")
    seed: int = 0
    refit_min_change: float = Field(
        0.05, ge=0.0, le=1.0,
        description="Refit only when the kept set changed by more than this fraction of the rows the current "
        "PCA was fitted on (rows in new, changed or removed shards); 0 refits on any change.",
    )


class RayConfig(_Strict):
    address: str | None = Field(None, description="Ray cluster address (ray://host:10001 or 'auto'); "
                                "None starts a local Ray.")
    num_cpus_per_task: float = Field(1.0, gt=0, description="CPUs Ray reserves for one shard task run.")


class OrchestrationConfig(_Strict):
    _renamed: ClassVar[dict[str, str]] = {"shards_per_task": "filter_shards_per_task"}

    filter_shards_per_task: int = Field(
        256, ge=1, description="Shards handled by one Prefect task run in the filter stages (bounds task-run count; "
        "embed has its own, embed.shards_per_task)."
    )
    max_parallel_tasks: int = Field(2, ge=1, description="Task runs in flight at once in the shard stages.")
    task_runner: Literal["thread", "process", "ray"] = Field(
        "thread", description="Where the shard stages' task runs execute: a local thread pool, a local process "
        "pool, or Ray through prefect-ray (see `ray`).",
    )
    ray: RayConfig = RayConfig()


class LaunchConfig(_Strict):
    """How a training stage is launched under torch.distributed (``torchrun``)."""

    nnodes: int = Field(1, ge=1, description="Machines taking part.")
    nproc_per_node: int = Field(1, ge=1, description="Processes per machine (one per GPU; any number on CPU).")
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="DDP replicates the model; FSDP shards it.")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="'auto': nccl on GPUs, gloo on CPU.")
    rdzv_endpoint: str | None = Field(None, description="host:port of the rendezvous for nnodes > 1.")
    timeout_minutes: float = Field(60.0, gt=0.0, description="How long a collective waits for every process "
                                   "before the job fails (torch's nccl default is 10): the other ranks wait while "
                                   "rank 0 evaluates.")
    gpu_slots: int = Field(1, ge=1, description="GPUs a training job uses per node (the Job's gpu_count).")

    @model_validator(mode="after")
    def _multi_node(self) -> "LaunchConfig":
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("rdzv_endpoint (host:port) is needed when nnodes > 1")
        return self


class StageTrainConfig(_Strict):
    """The trainer's settings for one training stage (``train.<stage>``): a fixed step budget, AdamW
    with linear warmup and cosine decay, clipping, EMA and checkpointing."""

    steps: int = Field(1000, ge=1, description="Optimiser steps (the budget; not epochs).")
    batch_size: int = Field(
        256, ge=1, description="Samples per optimiser step over all processes and accumulation steps (the "
        "global batch: a recipe means the same on 1 or 64 GPUs). Must divide by processes x grad_accum.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated into one optimiser step.")
    lr: float = Field(5e-4, gt=0.0, le=1.0, description="Peak learning rate (after warmup).")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Final learning rate as a fraction of lr.")
    warmup_steps: int = Field(100, ge=0, description="Linear warmup from 0 to lr over these steps.")
    weight_decay: float = Field(0.1, ge=0.0, description="AdamW decay, on 2-D weights only.")
    betas: tuple[float, float] = Field((0.9, 0.98), description="AdamW betas.")
    eps: float = Field(1e-6, gt=0.0)
    grad_clip: float | None = Field(1.0, gt=0.0, description="Clip the global gradient norm; null disables.")
    ema_decay: float | None = Field(
        0.999, ge=0.0, lt=1.0, description="EMA of the weights (warmed up: min(decay, (1+n)/(10+n)) at "
        "update n); null disables. The released weights are the EMA's when it is on.")
    checkpoint_every: int = Field(500, ge=1, description="Steps between checkpoints (one is also written at "
                                  "exit).")
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints kept; older ones are removed.")
    async_checkpoint: bool = Field(True, description="Write checkpoints from a background thread while training "
                                   "goes on (a snapshot of the state is taken first; one write in flight at most).")
    log_every: int = Field(10, ge=1, description="Steps between TensorBoard scalars and progress updates.")
    eval_every: int | None = Field(
        None, ge=1, description="Steps between held-out evaluations during training (TensorBoard `<stage>/eval/*`, "
        "`eval_history.json`); None: only the evaluation after the last step. Each costs one pass over the "
        "held-out split on rank 0.")
    seed: int = Field(0, description="Seeds the model's initialisation, the data order and augmentation.")
    num_workers: int = Field(1, ge=0, description="DataLoader worker processes decoding images per process.")
    compile: bool = Field(
        False, description="Run the training steps' forward and backward through torch.compile (the optimiser, EMA, "
        "checkpoints and evaluations use the module itself). For GPU runs: 1.5x a 576M decoder's step on an H200 "
        "before the UNet attention fix, unmeasured since, after 215 s of compilation at start (docs/benchmarks.md); "
        "off in the demo, where compiling costs more than it saves.")

    @model_validator(mode="after")
    def _budget(self) -> "StageTrainConfig":
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds steps ({self.steps})")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size ({self.batch_size}) must divide by grad_accum ({self.grad_accum})")
        return self


class ClipTrainConfig(StageTrainConfig):
    """CLIP on the mix of every source (stage ``clip``): open_clip's model, transforms and loss."""

    arch: str = Field("unclip-tiny", description="open_clip architecture (the project's are registered).")
    init: Literal["random", "pretrained", "checkpoint"] = Field(
        "random", description="Start from a seeded random initialisation, an open_clip pretrained tag "
        "(`pretrained`), or a local open_clip checkpoint (`checkpoint`).")
    pretrained: str | None = Field(None, description="open_clip pretrained tag, for init: pretrained.")
    checkpoint: str | None = Field(None, description="Checkpoint path or URI, for init: checkpoint.")
    source_weights: dict[str, float] | None = Field(
        None, description="Sampling probability per source (normalised); null draws every source with equal "
        "probability whatever its size (the paper's 50/50 mix of two sources).")
    shuffle_buffer: int = Field(1000, ge=1, description="Samples in each source's shuffle buffer.")
    eval_pairs: int = Field(5000, ge=2, description="Held-out pairs each evaluation reads (those of the held-out "
                            "shards in name order; recall in galleries of 1,000): the held-out split of a "
                            "650M-pair dataset holds tens of millions.")
    # open_clip's usual weight decay; a short run's EMA decay (DALLE2-pytorch #131: 0.99-0.995)
    weight_decay: float = Field(0.2, ge=0.0, description="AdamW decay, on 2-D weights only.")
    ema_decay: float | None = Field(0.995, ge=0.0, lt=1.0, description="EMA of the weights; null disables.")

    @model_validator(mode="after")
    def _init_source(self) -> "ClipTrainConfig":
        if self.init == "pretrained" and not self.pretrained:
            raise ValueError("init: pretrained needs `pretrained` (an open_clip tag)")
        if self.init == "checkpoint" and not self.checkpoint:
            raise ValueError("init: checkpoint needs `checkpoint` (a path or URI)")
        if self.source_weights is not None:
            bad = {k: v for k, v in self.source_weights.items() if not v >= 0}
            if bad or not sum(self.source_weights.values()) > 0:
                raise ValueError("source_weights must be non-negative with a positive sum")
        return self


class PriorTrainConfig(StageTrainConfig):
    """What both priors share: caption -> CLIP image embedding, trained on the generative sources'
    stored embeddings, evaluated on their held-out rows."""

    flavour: Literal["micro", "tiny", "small", "paper"] = Field("tiny", description="Named size (models/prior.py SIZES).")
    cond_drop: float = Field(0.1, ge=0.0, lt=1.0, description="Fraction of training rows whose caption and text "
                             "embedding are dropped, for classifier-free guidance (the paper's 10%).")
    guidance: float = Field(1.0, ge=0.0, description="Classifier-free guidance scale when sampling; 1 is none.")
    eval_pairs: int = Field(1000, ge=2, description="Held-out pairs the evaluation samples for.")
    lr: float = Field(3e-4, gt=0.0, description="Peak learning rate.")
    weight_decay: float = Field(0.06, ge=0.0, description="AdamW decay, on 2-D weights only.")
    ema_decay: float | None = Field(0.999, ge=0.0, lt=1.0, description="EMA of the weights; null disables.")
    num_workers: int = Field(0, ge=0, description="Unused: the stored embeddings are read in the training process "
                             "(see prefetch_batches).")
    prefetch_batches: int = Field(2, ge=0, description="Batches read, tokenized (and PCA-coded) ahead of the "
                                  "training step in a background thread; 0 prepares each in the step.")


class DiffusionPriorTrainConfig(PriorTrainConfig):
    """The diffusion prior (stage ``prior_diffusion``, ``unclip.models.prior``)."""

    sample_steps: int = Field(64, ge=1, description="DDIM steps when sampling (evaluation, generation).")
    candidates: int = Field(2, ge=1, description="Samples per caption, the one closest to the text embedding "
                            "kept (the paper's 2).")


class ARPriorTrainConfig(PriorTrainConfig):
    """The AR prior (stage ``prior_ar``, ``unclip.models.ar_prior``): the ``pca.n_components`` codes of the dataset
    version's PCA + quantiser (or the run's own ``pca`` stage's), one at a time."""

    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature of the codes; 0 takes the most "
                               "likely code.")
    head: Literal["softmax", "logistic_mixture"] = Field(
        "softmax", description="The codes' output distribution: the paper's softmax over the buckets, or a "
        "discretised mixture of logistics over the ordered buckets, which learns from every row (the demo's; "
        "unclip.models.ar_prior).")
    mixtures: int = Field(4, ge=1, description="Logistics per code, head logistic_mixture.")
    code_features: int = Field(0, ge=0, multiple_of=2, description="Fourier features (cos, sin pairs) of a code's "
                               "bucket position added to its input embedding; 0: a learned table alone.")


class ImageTrainConfig(StageTrainConfig):
    """What the decoder and both upsamplers share: a diffusion UNet (``unclip.models.unet``) trained on
    the generative sources' images from the shards (the decoder with their stored CLIP image
    embeddings), evaluated on their held-out images."""

    flavour: Literal["tiny", "paper"] = Field("tiny", description="Named size (models/unet.py FLAVOURS).")
    image_size: int = Field(64, ge=8, description="The side the model samples at (an upsampler's target; it "
                            "trains on crops a quarter of it). The chain is decoder x4 = upsampler1, x4 = upsampler2 "
                            "(the paper's 64 -> 256 -> 1024).")
    sample_steps: int = Field(50, ge=1, description="DDIM steps when sampling (evaluation, generation).")
    eval_images: int = Field(32, ge=2, description="Held-out images each evaluation uses.")
    eval_batch_size: int = Field(32, ge=1, description="Held-out images per forward pass in evaluation "
                                 "(heldout_mse, the upsamplers' samples): it bounds the evaluation's memory "
                                 "(a few per GPU for the paper's 1024 px upsampler). heldout_mse does not depend "
                                 "on it; the samples' metrics do only through the steps' noise at eta > 0.")
    shuffle_buffer: int = Field(1000, ge=1, description="Samples in the shuffle buffer.")
    lr: float = Field(1e-4, gt=0.0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW decay, on 2-D weights only.")
    ema_decay: float | None = Field(0.9999, ge=0.0, lt=1.0, description="EMA of the weights; null disables.")
    num_workers: int = Field(1, ge=0, description="DataLoader worker processes decoding and cropping images.")


class DecoderTrainConfig(ImageTrainConfig):
    """The decoder (stage ``decoder``): CLIP image embedding + caption -> the chain's first image."""

    image_drop: float = Field(0.1, ge=0.0, lt=1.0, description="Training rows whose CLIP embedding is set to zero "
                              "(the paper's 10%).")
    text_drop: float = Field(0.5, ge=0.0, lt=1.0, description="Training rows whose caption is dropped (the "
                             "paper's 50%).")
    guidance: float = Field(3.0, ge=0.0, description="Classifier-free guidance scale when sampling; 1 is none.")


class UpsamplerTrainConfig(ImageTrainConfig):
    """An upsampler (stages ``upsampler1``, ``upsampler2``): 4x, no text, the low-res image corrupted in
    training; trained on random crops a quarter of ``image_size``, sampled at the full size."""

    degradation: Literal["blur", "bsr", "none"] = Field(
        "blur", description="Corruption of the low-res conditioning image in training (unclip.data.degrade): "
        "Gaussian blur (the paper's first upsampler) or the BSR degradation (its second).")
    residual_scale: float = Field(0.0, ge=0.0, description="0: the paper's, the upsampler diffuses the image. "
                                  "> 0: it diffuses the image's difference from the bicubic upsampling of its "
                                  "low-res input, times this scale (models/unet.py Upsampler).")
    eval_samples: int = Field(4, ge=1, description="Samples drawn per held-out image at each evaluation: "
                              "psnr_mean is the PSNR of their mean (an estimate of the model's posterior mean).")
    sample_eta: float = Field(1.0, ge=0.0, le=1.0, description="DDIM eta of the evaluation's samples; keep it "
                              "at train.eval_generation.upsampler_eta, so the PSNR is that of the samples "
                              "generation draws. Runs before 2026-12-04 sampled at 0 (their psnr is not comparable).")


class EvalPriorsConfig(_Strict):
    """Stage ``eval_priors``: both priors of a run on the same held-out pairs of the generative sources."""

    eval_pairs: int = Field(1000, ge=2, description="Held-out pairs (the same for both priors).")
    guidance_sweep: tuple[float, ...] = Field((1.0, 2.0, 4.0), min_length=1, description="Guidance scales the "
                                        "diffusion prior is also measured at (cosine_true at each).")
    seed: int = Field(0, description="Seed of the sampling noise and the AR prior's dot-product draws.")


class EvalGenerationConfig(_Strict):
    """Stage ``eval_generation``: the run's text-to-image stack on held-out captions of the generative
    sources, under each conditioning (unclip.train.eval_generation)."""

    eval_captions: int = Field(64, ge=2, description="Held-out captions drawn per conditioning mode.")
    metrics_at: Literal["decoder", "upsampler1", "upsampler2"] = Field(
        "upsampler2", description="The stage of the chain whose images are measured (the top by default).")
    grid_captions: int = Field(4, ge=1, description="Captions (rows) of the sample grid.")
    judge_images: int = Field(1000, ge=2, description="Real training images the attribute judge learns from "
                              "(where the images carry the demo's scene_json ground truth).")
    judge_steps: int = Field(600, ge=1, description="Training steps of the attribute judge.")
    prior_guidance: float = Field(1.0, ge=0.0, description="The priors' guidance scale.")
    prior_steps: int = Field(25, ge=1, description="The diffusion prior's DDIM steps.")
    decoder_guidance: float = Field(3.0, ge=0.0, description="The decoder's guidance scale.")
    decoder_steps: int = Field(50, ge=1, description="The decoder's DDIM steps.")
    upsampler_steps: tuple[int, int] = Field((20, 10), description="DDIM steps of upsampler 1 and 2 (the paper: "
                                             "27 and 15).")
    upsampler_eta: float = Field(
        1.0, ge=0.0, le=1.0, description="DDIM eta of both upsamplers' sampling (0: deterministic; 1: DDPM's "
        "variance). Measured on the demo's upsampler 1, 10 steps, real 16 px inputs: eta 1 kept more of the shapes "
        "(judge shape_auc 0.88 against 0.82) at a higher PSNR (27.6 against 26.7 dB); docs/training.md.")
    batch_size: int = Field(16, ge=1, description="Captions sampled together.")
    seed: int = Field(0, description="Seeds the sampling noise and the judge.")


class TrainConfig(_Strict):
    """The training stages: how they launch, the held-out split, and each stage's trainer settings."""

    launch: LaunchConfig = LaunchConfig()
    clip_in_data_pipeline: bool = Field(
        False, description="Run the data pipeline's `clip` stage: when the catalog has no CLIP model version yet, "
        "train CLIP on the basic filter's kept pairs (training split) before embedding and publish it; set "
        "embed.model to {catalog: clip@latest} to embed with it. Off: the stage is skipped.")
    clip: ClipTrainConfig = ClipTrainConfig()
    prior_diffusion: DiffusionPriorTrainConfig = DiffusionPriorTrainConfig()
    prior_ar: ARPriorTrainConfig = ARPriorTrainConfig()
    eval_priors: EvalPriorsConfig = EvalPriorsConfig()
    decoder: DecoderTrainConfig = DecoderTrainConfig()
    upsampler1: UpsamplerTrainConfig = UpsamplerTrainConfig(image_size=256, degradation="blur")
    upsampler2: UpsamplerTrainConfig = UpsamplerTrainConfig(image_size=1024, degradation="bsr")
    eval_generation: EvalGenerationConfig = EvalGenerationConfig()
    eval_fraction: float = Field(
        0.05, gt=0.0, lt=1.0, description="Fraction of a dataset version's shards held out for evaluation "
        "(chosen by a hash of the shard name, so a shard never changes sides as the dataset grows).",
    )

    @model_validator(mode="after")
    def _image_chain(self) -> "TrainConfig":
        sizes = (self.decoder.image_size, self.upsampler1.image_size, self.upsampler2.image_size)
        if sizes[1] != 4 * sizes[0] or sizes[2] != 4 * sizes[1]:
            raise ValueError(f"the image chain decoder -> upsampler1 -> upsampler2 must grow 4x a step, got "
                             f"{' -> '.join(map(str, sizes))} (image_size of train.decoder, .upsampler1, .upsampler2)")
        if sizes[0] % 16:
            raise ValueError(f"train.decoder.image_size ({sizes[0]}) must be a multiple of 16 (the upsamplers "
                             "train on quarter-size crops of sides divisible by their UNet's downsampling)")
        return self


class CatalogConfig(_Strict):
    """Where released dataset versions and training runs are listed."""

    uri: str | None = Field(None, description="Catalog location (path or fsspec URI); default <workdir>/catalog.")
    keep_versions: int = Field(
        10, ge=1, description="Dataset versions whose files are kept; files only older versions use are removed.")
    keep_unfinished_days: float = Field(
        7.0, ge=0.0, description="A training run that stopped unfinished (failed, or killed) keeps its dataset "
        "version's files this long after its last word, so it can still be resumed; a running one keeps them "
        "while it beats.")


class RunConfig(_Strict):
    """Everything a data run needs, apart from its working directory."""

    name: str = Field("unclip", description="The dataset's name in the catalog: [a-z0-9][a-z0-9_-]*.")
    sources: tuple[SourceConfig, ...] = Field(min_length=1)
    ingest: IngestConfig = IngestConfig()
    basic_filter: BasicFilterConfig = BasicFilterConfig()
    embed: EmbedConfig
    semantic_filter: SemanticFilterConfig = SemanticFilterConfig()
    pca: PcaConfig = PcaConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    train: TrainConfig = TrainConfig()
    catalog: CatalogConfig = CatalogConfig()

    # it names a catalog folder and the dataset's locks
    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        return _check_name(v)

    @model_validator(mode="after")
    def _unique_sources(self) -> "RunConfig":
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"source names must be unique, repeated: {dup}")
        return self


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the offending field(s)."""


def _format_validation_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid configuration in {origin}:"]
    for e in err.errors():
        loc = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in e["loc"]).replace(".[", "[")
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"  {loc or '<root>'}: {msg}")
    return "\n".join(lines)


def parse_config(data: dict, origin: str = "<dict>") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, origin)) from None


PROJECT_ROOT = Path(__file__).resolve().parent.parent


def resolve_config_path(config: str | Path) -> str:
    """A relative config path is looked up in the working directory, then in the project root (where
    deployments name ``configs/...``)."""
    path = Path(config)
    if path.is_absolute() or path.exists():
        return str(path)
    return str(PROJECT_ROOT / path) if (PROJECT_ROOT / path).exists() else str(path)


def load_config(path: str | Path, overrides: dict | None = None, variables: dict[str, str] | None = None
                ) -> RunConfig:
    """Load a YAML run configuration, optionally deep-merging ``overrides`` on top.

    ``variables`` are substituted into string values written as ``${name}`` (the CLI passes
    ``workdir``, so a config can place its URL lists inside the working directory).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of fields")
    if overrides:
        data = deep_merge(data, overrides)
    if variables:
        data = _substitute(data, variables)
    return parse_config(data, str(path))


def _substitute(obj, variables: dict[str, str]):
    if isinstance(obj, str):
        for k, v in variables.items():
            obj = obj.replace("${" + k + "}", v)
        return obj
    if isinstance(obj, dict):
        return {k: _substitute(v, variables) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_substitute(v, variables) for v in obj]
    return obj


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def stages_until(until: str | None) -> tuple[str, ...]:
    if until is None:
        return DATA_STAGES
    if until not in DATA_STAGES:
        raise ConfigError(f"--until: unknown stage {until!r}; choose one of {', '.join(DATA_STAGES)}")
    return DATA_STAGES[: DATA_STAGES.index(until) + 1]

