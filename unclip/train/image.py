"""Training the image models (stages ``decoder``, ``upsampler1``, ``upsampler2``; MISSION "Decoder",
"Upsamplers").

All three train on the generative sources' training split (``for_generative``, the paper's DALL-E
data), reading the images from the dataset version's webdataset shards (``unclip.data.pairs``, with
its exact resume) and, for the decoder, the CLIP image embeddings the embed stage stored beside each
row in the kept Parquet, joined by key (no CLIP runs here). The networks are ``unclip.models.unet``;
the diffusion is ``unclip.models.diffusion``; the shared trainer does the rest.

- decoder: the shard image resized to ``image_size``; its caption (tokenized with the tokenizer of the
  CLIP that embedded it) and its CLIP image embedding; the embedding zeroed for ``image_drop`` of the
  rows, the caption dropped for ``text_drop``.
- upsamplers: the shard image resized to the upsampler's ``image_size``, a random crop a quarter of
  that side, and the crop's low-res version (x4 smaller) corrupted by ``degradation``
  (``unclip.data.degrade``: Gaussian blur for the first, BSR for the second), all seeded per sample.

Held-out evaluation (every ``eval_every`` steps and of the released weights), on the first
``eval_images`` held-out images at the model's full size:

- ``heldout_mse``: the noise-prediction error at fixed timesteps with fixed noise (comparable across
  steps and runs); the decoder also ``heldout_mse_zero_image``, the same with the CLIP embedding
  zeroed (what the embedding tells the model);
- upsamplers, from ``eval_samples`` DDIM samples per image from its clean low-res image: ``psnr`` of
  one sample against the real image, ``psnr_bicubic`` of the low-res image upsampled bicubically,
  ``psnr_mean`` of the samples' mean, and ``psnr_posterior_mean`` that of the mean of infinitely many
  (a mean of k has the squared error |mu - x|^2 + var / k: solved from k and from single samples);
  ``detail`` and ``detail_bicubic``, the energy of what lies above the low-res image's band (the image
  minus its own x4 down-and-up resampling) as a fraction of the real image's (1: as detailed as the
  real image; bicubic has almost none).

  A sample is a draw from the images a low-res image may come from: a perfect sampler's squared error
  is twice that of their mean, so its PSNR is 3 dB *below* the mean's, and below bicubic's too where
  bicubic upsampling is near that mean. Read ``psnr`` with ``detail`` (a sampler that adds no detail
  stays at bicubic), and ``psnr_posterior_mean`` against ``psnr_bicubic`` (what the model knows
  beyond bicubic).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch import nn

from unclip import storage
from unclip.config import DecoderTrainConfig, ImageTrainConfig, RunConfig, UpsamplerTrainConfig
from unclip.data import degrade, pairs
from unclip.models import unet
from unclip.models.diffusion import GaussianDiffusion
from unclip.models.prior import trim_tokens
from unclip.train import distributed, prior
from unclip.train.trainer import Trainer

STAGES = ("decoder", "upsampler1", "upsampler2")
META_FILE = "unet.json"
FACTOR = 4  # each upsampler's scale, and the crop: a quarter of its side
EVAL_TIMESTEPS = 8  # the fixed timesteps of heldout_mse, evenly over the process


# -- images ------------------------------------------------------------------------------------------
def to_tensor(img: Image.Image) -> torch.Tensor:
    """A PIL RGB image -> float [3, H, W] in [-1, 1]."""
    a = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy())
    return a.permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_pil(x: torch.Tensor) -> Image.Image:
    """float [3, H, W] in [-1, 1] -> a PIL RGB image."""
    a = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(a, "RGB")


def square(img: Image.Image, size: int) -> Image.Image:
    """The centre square of ``img`` resized to ``size`` (PIL's bicubic filter, antialiased when reducing)."""
    w, h = img.size
    s = min(w, h)
    if (w, h) != (s, s):
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return img if s == size else img.resize((size, size), Image.Resampling.BICUBIC)


class DecoderPreprocess:
    """Shard image -> [3, size, size] in [-1, 1]."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return to_tensor(square(img, self.size))


class UpsamplerPreprocess:
    """Shard image -> {"image": a random crop of side ``size // FACTOR`` of the image at ``size``,
    "low_res": that crop ``FACTOR`` times smaller, corrupted by ``degradation``}; the randomness is
    drawn from torch's default generator, which the training stream seeds per sample."""

    def __init__(self, size: int, degradation: degrade.Degradation | None, *, crop: bool = True) -> None:
        self.size, self.degradation, self.crop = size, degradation, crop

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        x = to_tensor(square(img, self.size))
        if self.crop:
            c = self.size // FACTOR
            top, left = (int(v) for v in torch.randint(0, self.size - c + 1, (2,)))
            x = x[:, top:top + c, left:left + c]
        g = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 62, ())))
        return {"image": x, "low_res": degrade.low_res(x, FACTOR, self.degradation, g)}


def degradation(cfg: UpsamplerTrainConfig) -> degrade.Degradation | None:
    return {"blur": degrade.BlurDegradation(), "bsr": degrade.BSRDegradation(), "none": None}[cfg.degradation]


# -- the task ----------------------------------------------------------------------------------------
class ImageTask:
    """The trainer's task for one of the image stages (``decoder``, ``upsampler1``, ``upsampler2``)."""

    def __init__(self, stage: str, cfg: DecoderTrainConfig | UpsamplerTrainConfig, train_files: pa.Table,
                 eval_files: pa.Table | None,
                 tokenizer=None, *, text_ctx: int = 77) -> None:
        if stage not in STAGES:
            raise ValueError(f"unknown image stage {stage!r}; one of {STAGES}")
        if stage == "decoder" and tokenizer is None:
            raise ValueError("the decoder needs the captions' tokenizer")
        self.name, self.cfg = stage, cfg
        self.train_files, self.eval_files = train_files, eval_files
        self.tokenizer, self.text_ctx = tokenizer, text_ctx
        self.decoder = stage == "decoder"
        self.diffusion: GaussianDiffusion | None = None
        self.net: nn.Module | None = None  # the model build_model made, unwrapped
        self.positions: dict[int, int] = {}
        self.consumed = 0
        self._held: dict | None = None

    def model_config(self) -> dict:
        base = unet.FLAVOURS[self.cfg.flavour][self.name]
        fields: dict[str, Any] = {"image_size": self.cfg.image_size}
        if self.decoder:
            fields.update(text_ctx=self.text_ctx, image_drop=self.cfg.image_drop, text_drop=self.cfg.text_drop)
        else:
            fields.update(residual_scale=self.cfg.residual_scale)
        return {"stage": self.name, "flavour": self.cfg.flavour, "unet": dataclasses.replace(base, **fields).to_dict()}

    def build_model(self, model_config: dict) -> nn.Module:
        model = unet.build(self.name, model_config["unet"])
        self.diffusion = model.diffusion()
        self.net = model  # unwrapped, for the upsamplers' to_target / from_sample (its config only)
        return model

    def preprocess(self, *, train: bool):
        if self.decoder:
            return DecoderPreprocess(self.cfg.image_size)
        return UpsamplerPreprocess(self.cfg.image_size, degradation(self.cfg) if train else None, crop=train)

    def batches(self, micro_batch: int, start: int, ctx: distributed.DistContext) -> Iterator[dict]:
        workers = self.cfg.num_workers
        data = pairs.TrainPairs(self.train_files, preprocess=self.preprocess(train=True),
                                tokenizer=self.tokenizer if self.decoder else None, batch_size=micro_batch,
                                rank=ctx.rank, world_size=ctx.world_size, num_workers=workers, seed=self.cfg.seed,
                                shuffle_buffer=self.cfg.shuffle_buffer, positions=self.positions,
                                rotation=self.consumed % max(1, workers),
                                embeddings=("image_emb",) if self.decoder else (),
                                decode_min_side=self.cfg.image_size)
        for batch in pairs.train_loader(data, workers):
            self.positions[batch["worker"]] = batch["position"]
            self.consumed += 1
            yield batch

    def model_inputs(self, batch: dict, device, *, drop: bool) -> tuple[torch.Tensor, dict]:
        """(x0, the model's keyword arguments) of a batch; ``drop``: the training drops of the decoder's
        conditioning, drawn from torch's generator (none when False)."""
        if not self.decoder:
            image = batch["image"]["image"].to(device, non_blocking=True)
            low = batch["image"]["low_res"].to(device, non_blocking=True)
            return self.net.to_target(image, low), {"low_res": low}
        x0 = batch["image"].to(device, non_blocking=True)
        n = len(x0)
        if drop:
            drop_text = torch.rand(n, device=device) < self.cfg.text_drop
            drop_image = torch.rand(n, device=device) < self.cfg.image_drop
        else:
            drop_text = drop_image = torch.zeros(n, dtype=torch.bool, device=device)
        return x0, {"tokens": trim_tokens(batch["text"]).to(device, non_blocking=True),
                    "image_emb": batch["image_emb"].to(device, non_blocking=True),
                    "drop_text": drop_text, "drop_image": drop_image}

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        device = next(model.parameters()).device
        x0, kwargs = self.model_inputs(batch, device, drop=True)
        t = self.diffusion.sample_timesteps(len(x0), device=device)
        return self.diffusion.training_loss(model, x0, t, model_kwargs=kwargs).mean(), {}

    def state_dict(self) -> dict:
        return {"positions": dict(self.positions), "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.positions = {int(k): v for k, v in state["positions"].items()}
        self.consumed = int(state["consumed"])

    # -- evaluation --------------------------------------------------------------------------------
    def held_out(self) -> dict:
        if self._held is None:
            self._held = pairs.held_out_images(self.eval_files, self.cfg.eval_images, self.preprocess(train=False),
                                               embeddings=("image_emb",) if self.decoder else ())
            if self.decoder:
                self._held["text"] = self.tokenizer(self._held["caption"])
        return self._held

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if self.eval_files is None or not self.eval_files.num_rows:
            return {}
        device = next(model.parameters()).device
        held = self.held_out()
        x0, kwargs = self.model_inputs(held, device, drop=False)
        diffusion = self.diffusion or model.diffusion()
        bs = self.cfg.eval_batch_size
        out = {"heldout_images": len(x0), "heldout_mse": heldout_mse(model, diffusion, x0, kwargs, batch_size=bs)}
        if self.decoder:
            zero = {**kwargs, "drop_image": torch.ones_like(kwargs["drop_image"])}
            out["heldout_mse_zero_image"] = heldout_mse(model, diffusion, x0, zero, batch_size=bs)
        else:
            g = torch.Generator(device=device).manual_seed(self.cfg.seed)
            sampler = diffusion.respaced(self.cfg.sample_steps)
            samples = [upsample(model, sampler, kwargs["low_res"], g, eta=self.cfg.sample_eta, batch_size=bs)
                       for _ in range(self.cfg.eval_samples)]
            real = held["image"]["image"].to(device)
            bicubic = degrade.upsample(kwargs["low_res"], FACTOR)
            mean = torch.stack(samples).mean(0)
            out.update(psnr=psnr(samples[0], real), psnr_bicubic=psnr(bicubic, real), psnr_mean=psnr(mean, real),
                       detail=detail(samples[0], real), detail_bicubic=detail(bicubic, real))
            k = len(samples)
            if k > 1:  # E|mean of k - x|^2 = |mu - x|^2 + var / k: solved for |mu - x|^2 with k and with 1
                one = sum(mse(s, real) for s in samples) / k
                out["psnr_posterior_mean"] = -10 * math.log10(max((k * mse(mean, real) - one) / (k - 1), 1e-12))
        return out


def upsample(model: nn.Module, sampler: GaussianDiffusion, low_res: torch.Tensor, g: torch.Generator, *,
             eta: float, batch_size: int) -> torch.Tensor:
    """An upsampler's DDIM samples [n, 3, H, W] in [-1, 1] from ``low_res`` [n, 3, H/4, W/4], in batches
    of ``batch_size`` (what bounds the memory: the paper's 1024 px upsampler holds tens of GB of
    activations per 32 images). The start noise of all ``n`` is drawn first, then each batch's step
    noise (eta > 0), from the one generator: with ``batch_size >= n`` the draws are those of one batch,
    and at eta 0 the samples do not depend on ``batch_size``."""
    n, side = len(low_res), low_res.shape[-1] * FACTOR
    noise = torch.randn((n, 3, side, side), generator=g, device=low_res.device)
    parts = []
    for i in range(0, n, batch_size):
        low = low_res[i:i + batch_size]
        x = sampler.sample(model, low.shape[:1] + noise.shape[1:], noise=noise[i:i + batch_size], generator=g,
                           eta=eta, model_kwargs={"low_res": low})
        parts.append(model.from_sample(x, low).clamp(-1, 1))
    return torch.cat(parts)


def heldout_mse(model: nn.Module, diffusion: GaussianDiffusion, x0: torch.Tensor, kwargs: dict, *,
                seed: int = 0, batch_size: int = 64) -> float:
    """The training loss (uniform over the timesteps) estimated at ``EVAL_TIMESTEPS`` stratified ones
    (the middles of equal slices), each image at each, with noise from a fixed seed: the same number
    for the same weights whatever the run or the step."""
    g = torch.Generator(device=x0.device).manual_seed(seed)
    ts = ((torch.arange(EVAL_TIMESTEPS) + 0.5) * diffusion.num_steps / EVAL_TIMESTEPS).long().to(x0.device)
    total, n = 0.0, 0
    for t in ts:
        noise = torch.randn(x0.shape, generator=g, device=x0.device)
        for i in range(0, len(x0), batch_size):
            part = {k: v[i:i + batch_size] for k, v in kwargs.items()}
            x = x0[i:i + batch_size]
            loss = diffusion.training_loss(model, x, t.expand(len(x)), noise=noise[i:i + batch_size], model_kwargs=part)
            total += float(loss.sum())
            n += len(x)
    return total / n


def detail(x: torch.Tensor, ref: torch.Tensor) -> float:
    """The energy of ``x`` above the x4-lower band (``x`` minus its bicubic down-and-up resampling) over
    that of ``ref``, over the whole batch: 1 is as much fine detail as ``ref``."""
    def high(img: torch.Tensor) -> torch.Tensor:
        img = img.float().clamp(-1, 1)
        return img - degrade.upsample(degrade.downsample(img, FACTOR), FACTOR)

    return float(high(x).pow(2).mean() / high(ref).pow(2).mean().clamp_min(1e-12))


def mse(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean squared error of images in [-1, 1] on the [0, 1] scale, over the whole batch."""
    return float((((x.float().clamp(-1, 1) - ref.float()) / 2) ** 2).mean())


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (on the [0, 1] scale), over the whole batch."""
    return 10 * math.log10(1.0 / max(mse(x, ref), 1e-12))


# -- releases -----------------------------------------------------------------------------------------
def load_release(folder: str) -> tuple[unet.UNet, dict]:
    """A released decoder or upsampler in eval mode, and its ``unet.json``."""
    from safetensors.torch import load

    meta = storage.read_json(storage.join(folder, META_FILE))
    model = unet.build(meta["kind"], meta["unet"])
    model.load_state_dict(load(storage.read_bytes(storage.join(folder, prior.WEIGHTS_FILE))))
    return model.eval(), meta


def shard_image_size(release: dict) -> int | None:
    """The side the dataset version's images were stored at (ingest.image_size), when recorded."""
    return (((release.get("config") or {}).get("ingest") or {}).get("image_size"))


def check_image_size(stage: str, cfg: ImageTrainConfig, release: dict) -> None:
    """A ValueError when the dataset version's images are smaller than the stage's ``image_size``."""
    stored = shard_image_size(release)
    if stored is not None and stored < cfg.image_size:
        raise ValueError(f"train.{stage}.image_size {cfg.image_size}: the dataset version's images are {stored} px "
                         "(ingest.image_size); ingest at the top of the chain's size")


def train_image_model(stage: str, config: RunConfig, train_files: pa.Table, eval_files: pa.Table, out_dir: str, *,
                      release: dict, catalog_uri: str | None, lineage: dict | None = None, strategy: str = "ddp",
                      ctx: distributed.DistContext | None = None) -> dict | None:
    """Train one image stage on the generative sources' training rows, then (rank 0) evaluate the EMA
    weights on their held-out rows and write the release folder. Returns the stage result."""
    cfg: ImageTrainConfig = getattr(config.train, stage)
    train, held = prior.prior_data(config, train_files, eval_files, stage)
    check_image_size(stage, cfg, release)
    arch, tokenizer, text_ctx = None, None, 77
    if stage == "decoder":
        arch, tokenizer = prior.caption_tokenizer(release, catalog_uri, config)
        text_ctx = getattr(tokenizer, "context_length", 77)
    task = ImageTask(stage, cfg, train, held, tokenizer, text_ctx=text_ctx)
    trainer = Trainer(task, cfg, out_dir, lineage=lineage, strategy=strategy, ctx=ctx)
    result = trainer.run()
    return prior.finish(trainer, result, out_dir, arch, stage, train, meta=META_FILE) if trainer.main else None


def main() -> None:
    """``torchrun ... -m unclip.train.image --run-dir D --stage decoder|upsampler1|upsampler2 --context C.json``."""
    distributed.stage_main("decoder", "Train the decoder or an upsampler (stages decoder, upsampler1, upsampler2) "
                           "under torchrun.", _from_context)


def _from_context(config: RunConfig, context: dict, out: str, dist: distributed.DistContext) -> dict | None:
    return train_image_model(context["stage"], config, storage.read_parquet(context["train_files"]),
                             storage.read_parquet(context["eval_files"]), out,
                             release=context.get("release_record") or {}, catalog_uri=context.get("catalog"),
                             lineage=context.get("lineage"), strategy=config.train.launch.strategy, ctx=dist)


if __name__ == "__main__":
    main()
