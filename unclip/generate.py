"""Text-to-image generation with the released stack, and what its bipartite latent gives (MISSION
"What the bipartite latent gives"): caption -> prior -> CLIP image embedding -> decoder -> upsampler 1
-> upsampler 2.

``Stack.load`` takes the latest released model of each kind from the catalog (or those of one
training run) and the CLIP that embedded their dataset version (for the captions' text embeddings
and tokens, and to embed a given image). Every sampler takes an explicit ``torch.Generator``, so a
seed gives the same images.

- ``Stack.generate``: captions -> images at every resolution of the chain; the conditioning can be a
  prior's sample (``prior_diffusion``, ``prior_ar``), the CLIP text embedding given in place of the
  image embedding (``text_embedding``) or the caption alone with a zero embedding (``caption_only``),
  the paper's ablation;
- ``Stack.variations``: DDIM with eta > 0 from (z_i, x_T) of a given image, x_T found by DDIM inversion
  of the decoder conditioned on z_i;
- ``Stack.interpolate``: slerp between two images' CLIP image embeddings, decoded with fixed noise;
- ``Stack.text_diff``: slerp from an image's z_i toward z_d = norm(z_t - z_t0), the difference of the
  new caption's and the base caption's text embeddings, with the image's inverted x_T fixed.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from unclip import catalog, storage
from unclip.models import ar_prior as ar_model
from unclip.models import prior as prior_model
from unclip.models.diffusion import guided
from unclip.models.prior import empty_captions, trim_tokens
from unclip.train.image import square, to_pil, to_tensor

MODES = ("prior_diffusion", "prior_ar", "text_embedding", "caption_only")
IMAGE_STAGES = ("decoder", "upsampler1", "upsampler2")
# The decoder guidance of the operations that start from an image's inverted noise (variations, text
# diffs): inversion and decoding must share it to give the image back, and unguided is where DDIM
# inversion is stable. On the demo's decoder (25 steps, 16 of its source images) decoding the inverted
# noise at eta 0 gave the image back with MSE 0.0015 at guidance 1 (0.0001 at 100 steps), 0.0051 at 2,
# 0.033 at 5, where 3 of 16 images came back wrong (MSE up to 0.22), and 0.033 inverting at 1 and
# decoding at 5 (bench/inversion.py; docs/training.md, "Generation").
INVERSION_GUIDANCE = 1.0


@dataclass(frozen=True)
class Settings:
    """Sampling settings (the paper's decoder and upsamplers sample in 250, 27 and 15 steps)."""

    prior_guidance: float = 1.0
    prior_steps: int = 25
    candidates: int = 2
    ar_temperature: float = 1.0
    decoder_guidance: float = 3.0
    decoder_steps: int = 50
    upsampler_steps: tuple[int, int] = (20, 10)
    upsampler_eta: float = 1.0  # both upsamplers' DDIM eta (EvalGenerationConfig.upsampler_eta)
    eta: float = 0.0  # the decoder's DDIM eta (variations use their own, > 0)
    batch_size: int = 16

    @classmethod
    def of(cls, cfg) -> Settings:
        """The settings of an ``eval_generation`` config (unclip.config.EvalGenerationConfig or its dict)."""
        get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
        d = cls()
        return cls(prior_guidance=float(get("prior_guidance", d.prior_guidance)),
                   prior_steps=int(get("prior_steps", d.prior_steps)),
                   decoder_guidance=float(get("decoder_guidance", d.decoder_guidance)),
                   decoder_steps=int(get("decoder_steps", d.decoder_steps)),
                   upsampler_steps=tuple(int(v) for v in get("upsampler_steps", d.upsampler_steps)),
                   # a run recorded before the setting existed sampled its upsamplers deterministically
                   upsampler_eta=float(get("upsampler_eta", 0.0)),
                   batch_size=int(get("batch_size", d.batch_size)))

    @classmethod
    def of_run(cls, where: str, run_id: str | None) -> tuple[Settings, str]:
        """The settings training run ``run_id`` evaluated its stack with (its ``train.eval_generation``
        config), and where they came from; the defaults when the catalog has no such run."""
        if run_id:
            try:
                run = catalog.get_run(where, run_id)
            except catalog.CatalogError:
                run = {}
            # the settings its eval_generation ran with (an ``evaluate`` may have used another config),
            # else the run's config (runs recorded before stages kept their settings)
            cfg = (((run.get("stages") or {}).get("eval_generation") or {}).get("settings")
                   or (((run.get("config") or {}).get("train") or {}).get("eval_generation")))
            if cfg:
                return cls.of(cfg), f"run {run_id}'s eval_generation"
        return cls(), "defaults"


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between unit vectors (rows), t in [0, 1]."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    omega = torch.arccos((a * b).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    so = torch.sin(omega)
    return F.normalize(torch.sin((1 - t) * omega) / so * a + torch.sin(t * omega) / so * b, dim=-1)


def from_pil(img: Image.Image, size: int) -> torch.Tensor:
    """A PIL image -> float [3, size, size] in [-1, 1] (centre square, bicubic)."""
    return to_tensor(square(img.convert("RGB"), size))


def _model_record(where: str, kind: str, run_id: str | None) -> dict:
    if run_id is None:
        return catalog.resolve_model(where, f"{kind}@latest")
    try:  # the version the run recorded: the same weights published by an earlier run keep that run's record
        version = (catalog.get_run(where, run_id).get("models") or {}).get(kind)
    except catalog.CatalogError:
        version = None
    if version:
        return catalog.resolve_model(where, f"{kind}@{version}")
    mine = [m for m in catalog.models(where, kind) if m.get("run_id") == run_id]
    if not mine:
        raise catalog.CatalogError(f"run {run_id!r} released no {kind!r} model in {where}")
    return mine[-1]


def _dataset_release(where: str, version: str) -> dict:
    for name in catalog.dataset_names(where):
        for r in catalog.datasets(where, name):
            if r["version"] == version:
                return r
    raise catalog.CatalogError(f"dataset version {version!r} is not in {where}")


def clip_config(where: str | None, release: dict):
    """The ClipModelConfig of the CLIP that embedded a dataset version: its catalog model version when
    it has one, else the embed config it was made with."""
    from unclip.config import ClipModelConfig

    version = release.get("clip_model_version")
    if version and where:
        rec = catalog.resolve_model(where, version)
        return ClipModelConfig(arch=rec["arch"], checkpoint=rec["weights"])
    return ClipModelConfig.model_validate(((release.get("config") or {}).get("embed") or {})["model"])


def clip_version(release: dict) -> str:
    """What names the CLIP of a dataset version in a stack's lineage: its catalog model version, else
    the embed config's architecture and weights (an open_clip model the catalog did not release)."""
    if release.get("clip_model_version"):
        return release["clip_model_version"]
    return _clip_name(((release.get("config") or {}).get("embed") or {}).get("model") or {})


def _clip_name(model: dict) -> str:
    """``arch:weights`` of an embed config's model (``arch:seed-N`` for a seeded random one)."""
    return f"{model.get('arch')}:{model.get('checkpoint') or model.get('pretrained') or 'seed-' + str(model.get('seed'))}"


@dataclass
class Stack:
    """The released models of the chain, on one device, in eval mode."""

    models: dict[str, torch.nn.Module]
    records: dict[str, dict]  # kind -> the catalog's model record
    clip: Any
    tokenizer: Any
    extras: dict[str, Any] = field(default_factory=dict)  # the AR prior's PCA
    device: torch.device = torch.device("cpu")

    @classmethod
    def load(cls, where: str, *, run_id: str | None = None, kinds: tuple[str, ...] = ("prior_diffusion", *IMAGE_STAGES),
             device: str | torch.device = "cpu") -> Stack:
        """The latest released model of each of ``kinds`` (of run ``run_id`` when given) from catalog
        ``where``, with the CLIP of the decoder's dataset version."""
        records = {kind: _model_record(where, kind, run_id) for kind in kinds}
        anchor = records.get("decoder") or next(iter(records.values()))
        release = _dataset_release(where, anchor["dataset_version"])
        stack = cls.from_folders({k: r["uri"] for k, r in records.items()}, clip_config(where, release),
                                 clip_version=clip_version(release), device=device)
        stack.records.update(records)  # the catalog's records, their versions included
        return stack

    @classmethod
    def from_folders(cls, folders: dict[str, str], clip_cfg, *, versions: dict[str, str] | None = None,
                     clip_version: str | None = None, device: str | torch.device = "cpu") -> Stack:
        """The models in release folders (kind -> folder) and the CLIP of ``clip_cfg`` (a ClipModelConfig).
        ``versions`` (kind -> model version) and ``clip_version`` name them in the stack's lineage
        (``Stack.versions``); a folder without one is named by its URI."""
        from unclip.data import clip as clip_data
        from unclip.data.pca import PcaQuantiser
        from unclip.train import image, prior, prior_ar

        device = torch.device(device)
        models, records, extras = {}, {}, {}
        for kind, uri in folders.items():
            if kind.startswith("prior"):
                model, _ = prior.load_release(uri)
                if kind == "prior_ar":
                    extras["pca"] = PcaQuantiser.load(io.BytesIO(storage.read_bytes(storage.join(uri, prior_ar.PCA_FILE))))
            else:
                model, _ = image.load_release(uri)
            models[kind] = model.to(device)
            records[kind] = {"uri": uri, "version": (versions or {}).get(kind, uri)}
        clip, _, tokenizer = clip_data.load_clip(clip_cfg, device)
        records["clip"] = {"version": clip_version or _clip_name(clip_cfg.model_dump())}
        return cls(models, records, clip, tokenizer, extras, device)

    @property
    def versions(self) -> dict[str, str]:
        """kind -> model version of every model the stack draws with, its CLIP included."""
        return {k: r["version"] for k, r in self.records.items()}

    def size(self, stage: str) -> int:
        return self.models[stage].cfg.image_size

    # -- CLIP ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(caption tokens [N, L], unit-norm CLIP text embeddings [N, D]) on the device."""
        tokens = self.tokenizer(captions).to(self.device)
        return tokens, F.normalize(self.clip.encode_text(tokens).float(), dim=-1)

    @torch.no_grad()
    def image_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm CLIP image embeddings of images [N, 3, H, W] in [-1, 1] (resized and normalised
        as the CLIP's preprocessing does)."""
        side = self.clip.visual.image_size
        side = side[0] if isinstance(side, (tuple, list)) else side
        x = F.interpolate(images.float().to(self.device), size=(side, side), mode="bicubic", antialias=True,
                          align_corners=False).clamp(-1, 1)
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        mean = torch.tensor(getattr(self.clip.visual, "image_mean", None) or OPENAI_DATASET_MEAN,
                            device=self.device)[:, None, None]
        std = torch.tensor(getattr(self.clip.visual, "image_std", None) or OPENAI_DATASET_STD,
                           device=self.device)[:, None, None]
        return F.normalize(self.clip.encode_image(((x + 1) / 2 - mean) / std).float(), dim=-1)

    # -- the chain ----------------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, mode: str, tokens: torch.Tensor, text_emb: torch.Tensor, s: Settings,
              g: torch.Generator) -> torch.Tensor:
        """The CLIP image embeddings the decoder is given under ``mode`` (zeros for caption_only)."""
        if mode == "prior_diffusion":
            return prior_model.sample(self.models[mode], text_emb=text_emb, tokens=tokens, guidance=s.prior_guidance,
                                      steps=s.prior_steps, candidates=s.candidates, generator=g)
        if mode == "prior_ar":
            pca = self.extras["pca"]
            dot = torch.from_numpy(pca.sample_dot_bucket_upper_half(
                np.random.default_rng(int(torch.randint(0, 2 ** 62, (), generator=g, device=g.device))),
                len(tokens)).astype(np.int64))
            codes = ar_model.sample(self.models[mode], tokens=trim_tokens(tokens), text_emb=text_emb,
                                    dot=dot.to(self.device), guidance=s.prior_guidance, temperature=s.ar_temperature,
                                    generator=g)
            return F.normalize(torch.from_numpy(pca.decode(codes.cpu().numpy())).float(), dim=-1).to(self.device)
        if mode == "text_embedding":
            return text_emb
        if mode == "caption_only":
            return torch.zeros_like(text_emb)
        raise ValueError(f"unknown conditioning {mode!r}; one of {MODES}")

    def _decoder_fn(self, tokens: torch.Tensor, z: torch.Tensor, guidance: float, *, drop_image: bool = False):
        """(the guided decoder, its kwargs). A row whose caption is empty (its tokens hold nothing between
        start and end of text) gets the null text the decoder was trained with on its dropped rows, not
        the tokens of an empty string, which it never saw."""
        n = len(z)
        tokens = trim_tokens(tokens).to(self.device)
        kwargs = {"tokens": tokens, "image_emb": z, "drop_text": empty_captions(tokens),
                  "drop_image": torch.full((n,), drop_image, dtype=torch.bool, device=self.device)}
        ones = torch.ones(n, dtype=torch.bool, device=self.device)
        return guided(self.models["decoder"], guidance, uncond_kwargs={"drop_text": ones, "drop_image": ones}), kwargs

    @torch.no_grad()
    def decode(self, z: torch.Tensor, tokens: torch.Tensor, s: Settings, g: torch.Generator, *,
               noise: torch.Tensor | None = None, eta: float | None = None, caption_only: bool = False,
               guidance: float | None = None) -> torch.Tensor:
        """CLIP image embeddings + caption tokens -> the decoder's images [N, 3, s, s] in [-1, 1], at
        ``guidance`` (default ``s.decoder_guidance``)."""
        model = self.models["decoder"]
        fn, kwargs = self._decoder_fn(tokens, z, s.decoder_guidance if guidance is None else guidance,
                                      drop_image=caption_only)
        side = self.size("decoder")
        return model.diffusion().respaced(s.decoder_steps).sample(
            fn, (len(z), 3, side, side), noise=noise, model_kwargs=kwargs, generator=g, device=self.device,
            sampler="ddim", eta=s.eta if eta is None else eta)

    @torch.no_grad()
    def upsample(self, stage: str, low: torch.Tensor, steps: int, g: torch.Generator, eta: float, *,
                 shared_noise: bool = False) -> torch.Tensor:
        """Low-res images -> the upsampler's (DDIM with ``eta``); ``shared_noise``: every image starts
        from the same noise (frames of one interpolation)."""
        model = self.models[stage]
        side = self.size(stage)
        noise = None
        if shared_noise:
            noise = torch.randn((1, 3, side, side), generator=g, device=self.device).repeat(len(low), 1, 1, 1)
        x = model.diffusion().respaced(steps).sample(model, (len(low), 3, side, side), generator=g, eta=eta,
                                                     noise=noise, device=self.device, model_kwargs={"low_res": low})
        return model.from_sample(x, low)

    def chain(self, first: torch.Tensor, s: Settings, g: torch.Generator, *, top: str = "upsampler2",
              fixed_noise: bool = False) -> list[torch.Tensor]:
        """The decoder's images and their upsampled versions, up to stage ``top``. ``fixed_noise``: the
        upsamplers draw every image from the same noise with deterministic DDIM, so images that differ
        only in their embedding (an interpolation's frames) differ only by it."""
        out = [first]
        for i, stage in enumerate(("upsampler1", "upsampler2")):
            if stage not in self.models or IMAGE_STAGES.index(stage) > IMAGE_STAGES.index(top):
                break
            out.append(self.upsample(stage, out[-1], s.upsampler_steps[i], g, 0.0 if fixed_noise else s.upsampler_eta,
                                     shared_noise=fixed_noise))
        return out

    def generate(self, captions: list[str], *, mode: str = "prior_diffusion", s: Settings = Settings(),
                 seed: int = 0, top: str = "upsampler2") -> list[torch.Tensor]:
        """Images for ``captions`` under conditioning ``mode``: one [N, 3, side, side] tensor per
        resolution of the chain, up to ``top``; batches of ``s.batch_size``, one seeded generator."""
        g = torch.Generator(device=self.device).manual_seed(seed)
        # the upsamplers' own stream: their settings (eta, steps) leave the decoder's images as they are
        g_up = torch.Generator(device=self.device).manual_seed(int(np.random.SeedSequence([seed, 1]).generate_state(1)[0]))
        outs: list[list[torch.Tensor]] = []
        for i in range(0, len(captions), s.batch_size):
            tokens, text_emb = self.text(captions[i:i + s.batch_size])
            z = self.embed(mode, tokens, text_emb, s, g)
            first = self.decode(z, tokens, s, g, caption_only=mode == "caption_only")
            outs.append(self.chain(first, s, g_up, top=top))
        return [torch.cat([o[k] for o in outs]).cpu() for k in range(len(outs[0]))]

    # -- the bipartite latent -----------------------------------------------------------------------
    @torch.no_grad()
    def invert(self, image: torch.Tensor, caption: str, s: Settings, *,
               guidance: float = INVERSION_GUIDANCE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z_i, x_T, tokens) of one image [3, H, W]: its CLIP image embedding, and the decoder noise that
        deterministic DDIM maps to it, conditioned on z_i and ``caption`` (none when it is empty) at
        ``guidance``, in ``s.decoder_steps``: decoding x_T at eta 0 with the same conditioning and guidance
        gives the image back, up to the inversion's discretisation error."""
        z = self.image_embedding(image[None])
        tokens, _ = self.text([caption])
        x0 = F.interpolate(image[None].float().to(self.device), size=(self.size("decoder"),) * 2, mode="bicubic",
                           antialias=True, align_corners=False).clamp(-1, 1)
        fn, kwargs = self._decoder_fn(tokens, z, guidance)
        x_t = self.models["decoder"].diffusion().respaced(s.decoder_steps).ddim_invert(fn, x0, model_kwargs=kwargs)
        return z, x_t, tokens

    def variations(self, image: torch.Tensor, n: int, *, caption: str = "", eta: float = 0.8, s: Settings = Settings(),
                   seed: int = 0, guidance: float = INVERSION_GUIDANCE) -> list[torch.Tensor]:
        """``n`` variations of an image: DDIM with ``eta`` > 0 from its (z_i, x_T), inverted and decoded
        at ``guidance``."""
        z, x_t, tokens = self.invert(image, caption, s, guidance=guidance)
        g = torch.Generator(device=self.device).manual_seed(seed)
        first = self.decode(z.repeat(n, 1), tokens.repeat(n, 1), s, g, noise=x_t.repeat(n, 1, 1, 1), eta=eta,
                            guidance=guidance)
        return [t.cpu() for t in self.chain(first, s, g)]

    def interpolate(self, a: torch.Tensor, b: torch.Tensor, n: int, *, caption: str = "", s: Settings = Settings(),
                    seed: int = 0) -> list[torch.Tensor]:
        """``n`` images along the slerp between two images' CLIP embeddings, with the same DDIM noise."""
        za, zb = self.image_embedding(torch.stack([a, b])).chunk(2)
        z = torch.cat([slerp(za, zb, t) for t in np.linspace(0, 1, n)])
        g = torch.Generator(device=self.device).manual_seed(seed)
        side = self.size("decoder")
        noise = torch.randn((1, 3, side, side), generator=g, device=self.device).repeat(n, 1, 1, 1)
        tokens, _ = self.text([caption] * n)
        first = self.decode(z, tokens, s, g, noise=noise, eta=0.0)
        return [t.cpu() for t in self.chain(first, s, g, fixed_noise=True)]

    def text_diff(self, image: torch.Tensor, new_caption: str, n: int, *, base_caption: str = "",
                  s: Settings = Settings(), seed: int = 0, max_angle: float = 0.5,
                  guidance: float = INVERSION_GUIDANCE) -> list[torch.Tensor]:
        """``n`` images from the image's z_i toward z_d = norm(z_t - z_t0) (slerp fractions 0 ..
        ``max_angle``), each decoded from the image's inverted x_T at the inversion's ``guidance``, so only
        the embedding moves (the first frame is the image)."""
        z, x_t, tokens = self.invert(image, base_caption, s, guidance=guidance)
        _, texts = self.text([new_caption, base_caption])
        zd = F.normalize(texts[:1] - texts[1:], dim=-1)
        zs = torch.cat([slerp(z, zd, t) for t in np.linspace(0, max_angle, n)])
        g = torch.Generator(device=self.device).manual_seed(seed)
        first = self.decode(zs, tokens.repeat(n, 1), s, g, noise=x_t.repeat(n, 1, 1, 1), eta=0.0,
                            guidance=guidance)
        return [t.cpu() for t in self.chain(first, s, g, fixed_noise=True)]


def grid(rows: list[list[Image.Image]], labels: list[str] | None = None, *, pad: int = 2, label_width: int = 0,
         header: list[str] | None = None) -> Image.Image:
    """Images in a grid (rows of equal-sized cells, each scaled to the largest), with an optional text
    label left of each row and a header above each column."""
    from PIL import ImageDraw

    cell = max(max(im.size) for row in rows for im in row)
    cols = max(len(r) for r in rows)
    top = 28 if header else 0
    width = label_width + cols * (cell + pad) + pad
    out = Image.new("RGB", (width, top + len(rows) * (cell + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for j, text in enumerate(header or []):
        _wrap_text(draw, text, (label_width + pad + j * (cell + pad), 2), cell)
    for i, row in enumerate(rows):
        y = top + pad + i * (cell + pad)
        if labels and label_width:
            _wrap_text(draw, labels[i], (4, y + 2), label_width - 8)
        for j, im in enumerate(row):
            out.paste(im.resize((cell, cell), Image.Resampling.NEAREST), (label_width + pad + j * (cell + pad), y))
    return out


def _wrap_text(draw, text: str, xy: tuple[int, int], width: int, line_height: int = 11) -> None:
    words, line, y = text.split(), "", xy[1]
    for w in words:
        trial = f"{line} {w}".strip()
        if draw.textlength(trial) > width and line:
            draw.text((xy[0], y), line, fill=(0, 0, 0))
            line, y = w, y + line_height
        else:
            line = trial
    if line:
        draw.text((xy[0], y), line, fill=(0, 0, 0))


def write_images(images: list[torch.Tensor], out_dir: str, entries: list[dict], stem: str) -> list[dict]:
    """The top resolution's images as PNG files ``<stem>-<i>.png`` in ``out_dir``, and their index
    entries (``entries[i]`` plus ``file`` and ``size``)."""
    top = images[-1]
    written = []
    for i, (x, entry) in enumerate(zip(top, entries)):
        name = f"{stem}-{i:03d}.png"
        buf = io.BytesIO()
        to_pil(x).save(buf, format="PNG")
        storage.write_bytes(storage.join(out_dir, name), buf.getvalue())
        written.append({**entry, "file": name, "size": int(x.shape[-1])})
    return written
