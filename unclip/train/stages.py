"""The staged trainings and evaluations that ``retrain`` and ``evaluate`` run, by name.

A stage is a function of a ``StageContext`` (the run, its dataset version's train and held-out
files, the outputs of the stages before it) returning ``{"outputs": {...}, "metrics": {...}}``.
Training issues add theirs with ``register``: a stage with ``gpu=True`` runs as a task carrying the
``gpu`` concurrency tag, and one with a ``module`` runs that module under ``torchrun`` with the
config's ``train.launch`` (nodes, processes per node, DDP/FSDP).

Registered here, on what the data half produces:

- ``pca`` (train): the AR prior's PCA + quantiser fitted on the version's training shards.
- ``eval_pca`` (eval): relative reconstruction error of the run's PCA (or the version's) on the
  held-out shards, alone and with quantisation, and how many codes round-trip.
- ``eval_retrieval`` (eval): image->text and text->image recall@k of the stored CLIP embeddings on
  held-out pairs, in galleries of ``GALLERY`` pairs (``unclip.data.retrieval``, as ``clip``'s own
  evaluation; chance beside them).
- ``clip`` (train, GPU, under torchrun): CLIP on the training split's pairs of every source
  (``unclip.train.clip``), evaluated on the held-out split and released as a model version.
- ``prior_diffusion`` (train, GPU, under torchrun): the diffusion prior on the generative sources'
  stored embeddings (``unclip.train.prior``), evaluated on their held-out rows, released as a model version.
- ``prior_ar`` (train, GPU, under torchrun): the AR prior on the same rows, coded by the run's PCA (its
  ``pca`` stage's, else the dataset version's; ``unclip.train.prior_ar``), released with that PCA.
- ``eval_priors`` (eval): the run's priors side by side on the same held-out pairs, metrics
  ``<prior>/<metric>`` and a table artifact (``unclip.train.eval_priors``).
- ``decoder``, ``upsampler1``, ``upsampler2`` (train, GPU, under torchrun): the image models on the
  generative sources' images from the shards, the decoder with their stored CLIP image embeddings
  (``unclip.train.image``), each evaluated on held-out images and released as a model version.
- ``eval_generation`` (eval): the run's whole stack on held-out captions under each conditioning,
  metrics ``<mode>/<metric>``, a table and a sample grid (``unclip.train.eval_generation``).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np
import pyarrow as pa

from unclip import storage
from unclip.config import RunConfig
from unclip.data import embeddings, pca
from unclip.data.retrieval import GALLERY, RecallCounter

@dataclass
class StageContext:
    run_id: str
    run_dir: str
    config: RunConfig
    release: dict
    train_files: pa.Table  # the release's kept files (FILES_COLUMNS) in the training split
    eval_files: pa.Table  # ... in the held-out split
    previous: dict[str, dict] = field(default_factory=dict)  # stage -> {"outputs", "metrics"}
    catalog: str | None = None
    lineage: dict = field(default_factory=dict)  # dataset, PCA and code versions a model is trained on


@dataclass(frozen=True)
class Stage:
    name: str
    kind: Literal["train", "eval"]
    run: Callable[[StageContext], dict]
    description: str
    gpu: bool = False
    # run as ``torchrun ... -m module --run-dir D --stage NAME --context C.json`` with train.launch when
    # set; the module writes D/NAME/result.json ({"outputs", "metrics"}) from rank 0
    module: str | None = None


REGISTRY: dict[str, Stage] = {}
# what ``unclip demo`` trains and evaluates after the data pipeline (which trained CLIP and fitted the PCA)
DEMO_TRAIN_STAGES = ("prior_diffusion", "prior_ar", "decoder", "upsampler1", "upsampler2", "eval_generation",
                     "eval_priors")  # in the order a run takes them (the registry's)


def register(stage: Stage) -> Stage:
    REGISTRY[stage.name] = stage
    return stage


def names(kind: str | None = None) -> list[str]:
    return [n for n, s in REGISTRY.items() if kind is None or s.kind == kind]


CAPTION_STAGES = ("prior_diffusion", "prior_ar", "decoder")  # read the captions' tokens
GENERATIVE_STAGES = (*CAPTION_STAGES, "upsampler1", "upsampler2")  # train on the generative sources' rows


def default_retrain_stages() -> list[str]:
    """What ``retrain`` runs when not told: every stage but ``clip``. The run's priors and image models
    train on the dataset version's stored embeddings, made by the CLIP the version names; a CLIP trained
    in the same run would reach them only after a refresh re-embeds with it (``embed.model: {catalog:
    clip@latest}``), and would become ``clip@latest`` for that refresh whatever its size. Name ``clip``
    to train one."""
    return [n for n in names() if n != "clip"]


def check(ctx: StageContext, names: list[str]) -> None:
    """Before a run's first stage, what would otherwise fail a stage only when it starts (after the
    stages before it, maybe weeks of training, and again on every resume, which keeps the run's
    config): every problem of every stage in ``names``, in one ``ConfigError``."""
    import torch

    from unclip.config import ConfigError
    from unclip.train import image, prior, prior_ar
    from unclip.train.trainer import check_batch_split

    cfg, launch = ctx.config, ctx.config.train.launch
    world = launch.nnodes * launch.nproc_per_node
    # the checks the stages themselves make when they start, each a ValueError
    checks: list[Callable[[], object]] = []
    for name in names:
        section = getattr(cfg.train, name, None)
        if REGISTRY[name].module and section is not None:
            checks.append(lambda name=name, section=section: check_batch_split(
                name, section, world, f" (train.launch: {launch.nnodes} node(s) x {launch.nproc_per_node})"))
        if name in GENERATIVE_STAGES:
            checks.append(lambda name=name: prior.prior_data(cfg, ctx.train_files, ctx.eval_files, name))
        if name in image.STAGES:
            checks.append(lambda name=name, section=section: image.check_image_size(name, section, ctx.release))
        if name == "prior_ar" and "pca" not in names:
            checks.append(lambda: prior_ar.pca_for(ctx.previous, ctx.release))
    if any(n in CAPTION_STAGES for n in names):
        checks.append(lambda: prior.caption_tokenizer(ctx.release, ctx.catalog, cfg))
    problems: list[str] = []
    for check_one in checks:
        try:
            check_one()
        except ValueError as err:
            problems.append(str(err))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    # (with CUDA every process takes the GPU of its local rank, whatever the backend: distributed.init)
    if gpus and launch.nproc_per_node > gpus and any(REGISTRY[n].module for n in names):
        problems.append(f"train.launch.nproc_per_node {launch.nproc_per_node}: this machine has {gpus} GPU(s)")
    if problems:
        raise ConfigError("the run's stages cannot run as configured:\n- " + "\n- ".join(problems))


def split_files(files: pa.Table, eval_fraction: float) -> tuple[pa.Table, pa.Table]:
    """Held-out shards chosen by a hash of the shard name, so stable as the dataset grows, and at
    least one held-out shard of each source that has two or more (so every source, the generative
    one included, can be evaluated however small). That fallback shard is the source's lowest hash
    and can change as a small source grows; a ``retrain`` run records its held-out shards and keeps
    them on resume and evaluation."""
    shards = files.column("shard").to_pylist()
    score = np.array([int(hashlib.sha256(s.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF for s in shards])
    held = score < eval_fraction
    groups = np.array(files.column("source").to_pylist() if "source" in files.column_names else [""] * len(shards),
                      dtype=object)
    for source in dict.fromkeys(groups):
        mine = np.flatnonzero(groups == source)
        if len(mine) >= 2 and not held[mine].any():
            held[mine[int(np.argmin(score[mine]))]] = True
    return files.filter(pa.array(~held)), files.filter(pa.array(held))


def _file_rows(files: pa.Table) -> list[tuple[str, int]]:
    return list(zip(files.column("kept").to_pylist(), files.column("rows").to_pylist()))


def _stage_pca(ctx: StageContext) -> dict:
    from unclip.tasks import pca as pca_tasks

    if ctx.train_files.num_rows == 0:
        raise ValueError("pca: the training split of the dataset version is empty")
    fitted = pca_tasks.fit_and_save_pca.fn(_file_rows(ctx.train_files), ctx.run_dir, ctx.config.pca,
                                  ctx.train_files.select(["shard", "digest", "rows"]))
    pca_tasks.publish_pca(fitted)
    return {"outputs": {"pca": fitted["uri"], "report": fitted["report_uri"], "plot": fitted["plot_uri"]},
            "metrics": {"pca_version": fitted["version"], **fitted["report"]}}


def _stage_eval_pca(ctx: StageContext) -> dict:
    uri = (ctx.previous.get("pca") or {}).get("outputs", {}).get("pca") or ctx.release.get("pca")
    if not uri:
        raise ValueError("eval_pca: neither this run nor its dataset version has a PCA")
    model = pca.PcaQuantiser.load(io.BytesIO(storage.read_bytes(uri)))
    sq = err_pca = err_q = 0.0
    n = exact = 0
    for (x,) in embeddings.iter_embedding_batches(_file_rows(ctx.eval_files), batch_rows=ctx.config.pca.batch_rows,
                                           max_rows=ctx.config.pca.max_rows, seed=0, columns=("image_emb",)):
        x = x.astype(np.float32)
        z = model.project(x)
        codes = model.encode(x)
        sq += float((x * x).sum())
        err_pca += float(((z @ model.components + model.mean - x) ** 2).sum())
        err_q += float(((model.decode(codes) - x) ** 2).sum())
        exact += int((model.quantiser.encode(model.quantiser.decode(codes)) == codes).all(axis=1).sum())
        n += len(x)
    if n == 0:
        raise ValueError("eval_pca: the held-out split is empty")
    return {"outputs": {"pca": uri}, "metrics": {
        "heldout_rows": n, "heldout_relative_mse_pca": err_pca / sq,
        "heldout_relative_mse_pca_quantised": err_q / sq, "codes_round_trip": exact / n}}


def _stage_eval_retrieval(ctx: StageContext) -> dict:
    files = sorted(ctx.eval_files.column("kept").to_pylist())
    if not files:
        raise ValueError("eval_retrieval: the held-out split is empty")
    recall = RecallCounter()
    for batch in storage.parquet_dataset(files).to_batches(columns=["image_emb", "text_emb"], batch_size=GALLERY):
        recall.add(*(embeddings.to_numpy(batch.column(c)) for c in ("image_emb", "text_emb")))
    try:
        return {"outputs": {}, "metrics": recall.result()}
    except ValueError as e:
        raise ValueError(f"eval_retrieval: {e}") from None


def _stage_clip(ctx: StageContext) -> dict:
    """In-process CLIP training (``retrain`` launches ``unclip.train.clip`` under torchrun instead)."""
    from unclip.train import clip as clip_train

    done = clip_train.train_clip(ctx.config.train.clip, ctx.train_files, ctx.eval_files,
                                 storage.join(ctx.run_dir, "clip"), lineage=ctx.lineage)
    return {"outputs": {"model": done.release["uri"], "checkpoint": done.result.checkpoint},
            "metrics": done.metrics, "model": {"kind": "clip", **done.release}}


def _stage_prior_diffusion(ctx: StageContext) -> dict:
    """In-process diffusion prior training (``retrain`` launches ``unclip.train.prior`` under torchrun)."""
    from unclip.train import prior as prior_train

    return prior_train.train_diffusion_prior(ctx.config, ctx.train_files, ctx.eval_files,
                                             storage.join(ctx.run_dir, "prior_diffusion"), release=ctx.release,
                                             catalog_uri=ctx.catalog, lineage=ctx.lineage)


def _stage_prior_ar(ctx: StageContext) -> dict:
    """In-process AR prior training (``retrain`` launches ``unclip.train.prior_ar`` under torchrun)."""
    from unclip.train import prior_ar

    return prior_ar.train_ar_prior(ctx.config, ctx.train_files, ctx.eval_files, storage.join(ctx.run_dir, "prior_ar"),
                                   release=ctx.release, previous=ctx.previous, catalog_uri=ctx.catalog,
                                   lineage=ctx.lineage)


def _image_stage(name: str) -> Callable[[StageContext], dict]:
    def run(ctx: StageContext) -> dict:
        """In-process training of an image model (``retrain`` launches ``unclip.train.image`` under torchrun)."""
        from unclip.train import image

        return image.train_image_model(name, ctx.config, ctx.train_files, ctx.eval_files,
                                       storage.join(ctx.run_dir, name), release=ctx.release, catalog_uri=ctx.catalog,
                                       lineage=ctx.lineage)
    return run


def _stage_eval_priors(ctx: StageContext) -> dict:
    import torch

    from unclip.tasks.common import publish_table
    from unclip.train import eval_priors

    done = eval_priors.evaluate_priors(ctx.config, ctx.eval_files, ctx.previous, storage.join(ctx.run_dir, "eval_priors"),
                                       device="cuda" if torch.cuda.is_available() else "cpu")
    if done["rows"]:
        publish_table("eval_priors", "table", done["rows"], f"run {ctx.run_id}: both priors on the same held-out pairs")
    return {"outputs": done["outputs"], "metrics": done["metrics"]}


def _stage_eval_generation(ctx: StageContext) -> dict:
    import torch

    from unclip.tasks.common import publish_image, publish_table
    from unclip.train import eval_generation

    done = eval_generation.evaluate_generation(ctx.config, ctx.train_files, ctx.eval_files, ctx.previous,
                                               storage.join(ctx.run_dir, "eval_generation"), release=ctx.release,
                                               catalog_uri=ctx.catalog,
                                               device="cuda" if torch.cuda.is_available() else "cpu")
    if done["rows"]:
        publish_table("eval_generation", "table", done["rows"], f"run {ctx.run_id}: text-to-image by conditioning "
                      "(real: held-out images, the reference)")
    if done["grid"]:
        publish_image("eval_generation", "grid", done["grid"], f"run {ctx.run_id}: held-out captions; the real image, "
                      "then each conditioning at the decoder's size and the top of the chain")
    return {"outputs": done["outputs"], "metrics": done["metrics"]}


# in pipeline order (``retrain`` runs the chosen stages in this order)
register(Stage("clip", "train", _stage_clip, "CLIP (open_clip) on the mix of every source, released as a model "
               "version", gpu=True, module="unclip.train.clip"))
register(Stage("pca", "train", _stage_pca, "PCA (319 of 1024) + 1024-bucket quantiser for the AR prior"))
register(Stage("prior_diffusion", "train", _stage_prior_diffusion, "the diffusion prior (caption -> CLIP image "
               "embedding) on the generative sources, released as a model version", gpu=True,
               module="unclip.train.prior"))
register(Stage("prior_ar", "train", _stage_prior_ar, "the AR prior (caption -> the PCA codes of the CLIP image "
               "embedding) on the generative sources, released as a model version with its PCA", gpu=True,
               module="unclip.train.prior_ar"))
register(Stage("decoder", "train", _image_stage("decoder"), "the decoder (CLIP image embedding + caption -> "
               "image, a GLIDE-style diffusion UNet) on the generative sources' images, released as a model version",
               gpu=True, module="unclip.train.image"))
register(Stage("upsampler1", "train", _image_stage("upsampler1"), "upsampler 1 (x4, the low-res image blurred "
               "in training) on the generative sources' images, released as a model version", gpu=True,
               module="unclip.train.image"))
register(Stage("upsampler2", "train", _image_stage("upsampler2"), "upsampler 2 (x4, the low-res image "
               "BSR-degraded in training) on the generative sources' images, released as a model version",
               gpu=True, module="unclip.train.image"))
register(Stage("eval_generation", "eval", _stage_eval_generation, "text -> image on held-out captions under each "
               "conditioning (a prior, the text embedding, the caption alone): CLIP score, Frechet distance on CLIP "
               "features, colour and shape accuracy (demo), a sample grid", gpu=True))
register(Stage("eval_pca", "eval", _stage_eval_pca, "held-out reconstruction error of the PCA + quantiser"))
register(Stage("eval_retrieval", "eval", _stage_eval_retrieval, "held-out image<->text recall@k of the CLIP"))
register(Stage("eval_priors", "eval", _stage_eval_priors, "both priors of the run on the same held-out pairs "
               "(cosines, retrieval, likelihood, a guidance sweep)", gpu=True))  # samples on the GPU when there is one
