"""The image models: a GLIDE-style diffusion UNet, the decoder and the two upsamplers (MISSION
"Decoder", "Upsamplers").

``UNet`` is guided-diffusion's / GLIDE's architecture, trimmed to what unCLIP uses: residual blocks
(GroupNorm, SiLU, 3x3 convolutions; the timestep embedding enters each block as a scale and shift of
its second normalisation), self-attention at chosen downsampling factors whose keys and values can
include an encoder's context tokens (GLIDE's ``encoder_kv``), strided-convolution downsampling and
nearest-neighbour upsampling, skip connections, zero-initialised output layers. It predicts v
(``UNetConfig.target``, see there why not the noise) with a fixed variance: the learned-variance
heads of GLIDE blew up into NaNs in small open re-implementations (DALLE2-pytorch #138, #311).

- ``Decoder`` (stage ``decoder``): a text Transformer over the caption tokens (its own embedding,
  bidirectional, padding hidden); its pooled output (at the end-of-text token) and the CLIP image
  embedding, each projected, are added to the timestep embedding; the CLIP image embedding is also
  projected into ``clip_tokens`` (4) extra tokens appended to the text Transformer's output
  sequence, which every attention layer attends to. Training sets the CLIP embedding to zero for
  ``image_drop`` (10%) of the rows and drops the caption for ``text_drop`` (50%): the caption's
  tokens are hidden from the attention and its pooled vector replaced by a learned null vector.
- ``Upsampler`` (stages ``upsampler1``, ``upsampler2``): the same UNet without text, whose input is
  the noised image concatenated with the low-resolution image upsampled to its size (guided-
  diffusion's ``SuperResModel``). As in the paper, no attention: only convolutions, so a model
  trained on crops a quarter of the target size samples at the full size.

Named sizes in ``FLAVOURS`` (``tiny`` for the demo and CI; ``paper``: 3.5B decoder, 700M and 300M
upsamplers, counted on the meta device in tests/test_unet.py). torch only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from unclip.models.diffusion import GaussianDiffusion, Target
from unclip.models.prior import Block, timestep_embedding


@dataclass(frozen=True)
class UNetConfig:
    """What every image model shares. ``image_size`` is the side it samples at (an upsampler's full
    target size)."""

    image_size: int = 64
    model_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_res_blocks: int = 2
    attention_ds: tuple[int, ...] = (2, 4, 8)  # downsampling factors with self-attention (none: convolutions only)
    head_channels: int = 64
    dropout: float = 0.0
    timesteps: int = 1000
    schedule: str = "cosine"
    # v (= sqrt(ab) eps - sqrt(1 - ab) x0), not epsilon: at high noise an epsilon model's clean-image
    # estimate is its small noise error divided by sqrt(ab) ~ 0, so a short-trained model's few-step
    # samples never recover (measured on the demo's upsampler 1 after 300 steps: the one-step x0 from
    # t = 900 at 13.0 dB, samples from noise at 8.8 dB against bicubic's 23.0); a v model predicts x0
    # directly there
    target: str = "v"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class DecoderConfig(UNetConfig):
    embed_dim: int = 1024  # the CLIP embedding width
    clip_tokens: int = 4  # context tokens projected from the CLIP image embedding
    text_ctx: int = 77
    vocab_size: int = 49408  # open_clip's tokenizer
    text_width: int = 256
    text_layers: int = 2
    text_heads: int = 4
    image_drop: float = 0.1  # training rows whose CLIP embedding is set to zero
    text_drop: float = 0.5  # training rows whose caption is dropped


@dataclass(frozen=True)
class UpsamplerConfig(UNetConfig):
    """An upsampler's UNet: x4 (its input is a quarter of ``image_size``), trained on crops of a quarter
    of ``image_size``; convolutions only, as in the paper, so it samples at sizes it never trained at."""

    attention_ds: tuple[int, ...] = ()
    # 0: the paper's, the model diffuses the image itself. > 0: it diffuses the image's difference from
    # the bicubic upsampling of its low-res input, times this scale (``Upsampler.to_target``), and a
    # sample is added back to that upsampling (``Upsampler.from_sample``); see ``Upsampler``.
    residual_scale: float = 0.0


# -- named sizes ------------------------------------------------------------------------------------
# The paper's decoder is GLIDE's 64 px model (text Transformer 24 x 2048, UNet width 512) with the CLIP
# conditioning added: 3.43B here against the paper's 3.5B; its upsamplers (700M for 64->256, 300M for
# 256->1024; 678M and 297M here) use convolutions only. The demo's chain is 16 -> 64 -> 256.
FLAVOURS: dict[str, dict[str, UNetConfig]] = {
    "tiny": {
        "decoder": DecoderConfig(image_size=16, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                                 attention_ds=(2, 4), head_channels=32, text_width=64, text_layers=2, text_heads=2),
        "upsampler1": UpsamplerConfig(image_size=64, model_channels=32, channel_mult=(1, 2), num_res_blocks=1),
        "upsampler2": UpsamplerConfig(image_size=256, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                      schedule="linear"),
    },
    "paper": {
        "decoder": DecoderConfig(image_size=64, model_channels=512, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                                 attention_ds=(2, 4, 8), head_channels=64, text_ctx=77, text_width=2048,
                                 text_layers=24, text_heads=32),
        "upsampler1": UpsamplerConfig(image_size=256, model_channels=320, channel_mult=(1, 2, 3, 4),
                                      num_res_blocks=3),
        "upsampler2": UpsamplerConfig(image_size=1024, model_channels=208, channel_mult=(1, 1, 2, 2, 4, 4),
                                      num_res_blocks=2, schedule="linear"),
    },
}


def _groups(channels: int) -> int:
    return math.gcd(32, channels)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, then the timestep embedding as scale and shift of the second GroupNorm
    (guided-diffusion's ``use_scale_shift_norm``), SiLU, dropout, a zero-initialised conv; plus the skip."""

    def __init__(self, ch: int, emb_dim: int, out_ch: int, dropout: float) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(_groups(ch), ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_ch))
        self.out_norm = nn.GroupNorm(_groups(out_ch), out_ch)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(dropout), _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1)))
        self.skip = nn.Identity() if ch == out_ch else nn.Conv2d(ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context=None) -> torch.Tensor:
        h = self.in_layers(x)
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.out_layers(self.out_norm(h) * (1 + scale) + shift)
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the feature map's positions; with a context ([N, L, C] tokens and an
    [N, L] mask of the usable ones), those tokens' keys and values join the positions' (GLIDE)."""

    def __init__(self, ch: int, head_channels: int, context_width: int | None) -> None:
        super().__init__()
        self.heads = max(1, ch // head_channels)
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.context_kv = nn.Linear(context_width, 2 * ch) if context_width else None
        self.proj = _zero(nn.Conv1d(ch, ch, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: tuple | None = None) -> torch.Tensor:
        n, c, hgt, wdt = x.shape
        h = self.heads
        # q, k, v as [N, H, P, C/H] with the channels contiguous: the fused attention kernels (flash,
        # memory-efficient; on CPU too) need the last dim's stride to be 1, and a transposed view of the
        # conv's [N, C, P] output falls back to the unfused math kernel (measured on an H200: 37% of a
        # width-256 decoder's step in that kernel and its backward; docs/benchmarks.md)
        qkv = self.qkv(self.norm(x).reshape(n, c, -1)).reshape(n, 3, h, c // h, -1).transpose(-1, -2).contiguous()
        q, k, v = qkv.unbind(1)
        mask = None
        if self.context_kv is not None and context is not None:
            tokens, usable = context
            ck, cv = self.context_kv(tokens).reshape(n, -1, 2, h, c // h).permute(2, 0, 3, 1, 4).unbind(0)
            k, v = torch.cat([ck, k], dim=-2), torch.cat([cv, v], dim=-2)
            positions = torch.ones(n, hgt * wdt, dtype=torch.bool, device=x.device)
            mask = torch.cat([usable, positions], dim=1)[:, None, None, :]  # [N, 1, 1, L + P]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [N, H, P, C/H]
        return x + self.proj(a.transpose(-1, -2).reshape(n, c, -1)).reshape(n, c, hgt, wdt)


class Downsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context=None) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context=None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class ConvIn(nn.Conv2d):
    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None, context=None) -> torch.Tensor:
        return super().forward(x)


class Level(nn.ModuleList):
    """A sequence of layers that each take (x, emb, context)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context=None) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb, context)
        return x


class UNet(nn.Module):
    """The diffusion UNet: ``forward(x, t, *, emb=None, context=None)`` -> [N, out, H, W].

    ``emb`` is added to the timestep embedding ([N, 4 * model_channels]); ``context`` is
    ``(tokens [N, L, context_width], usable [N, L] bool)`` for the attention layers."""

    def __init__(self, cfg: UNetConfig, *, in_channels: int = 3, out_channels: int = 3,
                 context_width: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        ch = cfg.model_channels
        emb_dim = 4 * ch
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.input_blocks = nn.ModuleList([Level([ConvIn(in_channels, ch, 3, padding=1)])])
        skips, ds = [ch], 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * cfg.model_channels, cfg.dropout)]
                ch = mult * cfg.model_channels
                if ds in cfg.attention_ds:
                    layers.append(AttentionBlock(ch, cfg.head_channels, context_width))
                self.input_blocks.append(Level(layers))
                skips.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(Level([Downsample(ch)]))
                skips.append(ch)
                ds *= 2
        middle: list[nn.Module] = [ResBlock(ch, emb_dim, ch, cfg.dropout)]
        if cfg.attention_ds:
            middle.append(AttentionBlock(ch, cfg.head_channels, context_width))
        middle.append(ResBlock(ch, emb_dim, ch, cfg.dropout))
        self.middle_block = Level(middle)
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), emb_dim, mult * cfg.model_channels, cfg.dropout)]
                ch = mult * cfg.model_channels
                if ds in cfg.attention_ds:
                    layers.append(AttentionBlock(ch, cfg.head_channels, context_width))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(Level(layers))
        self.out = nn.Sequential(nn.GroupNorm(_groups(ch), ch), nn.SiLU(), _zero(nn.Conv2d(ch, out_channels, 3, padding=1)))

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.cfg.channel_mult) - 1)

    def unet(self, x: torch.Tensor, t: torch.Tensor, *, emb: torch.Tensor | None = None,
             context: tuple | None = None) -> torch.Tensor:
        if x.shape[-1] % self.downsampling or x.shape[-2] % self.downsampling:
            raise ValueError(f"image sides {tuple(x.shape[-2:])} must be multiples of {self.downsampling}")
        e = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(x.dtype))
        if emb is not None:
            e = e + emb
        hs = []
        h = x
        for block in self.input_blocks:
            h = block(h, e, context)
            hs.append(h)
        h = self.middle_block(h, e, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), e, context)
        return self.out(h)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t)

    def fsdp_blocks(self) -> list[nn.Module]:
        return [*self.input_blocks[1:], self.middle_block, *self.output_blocks]

    def diffusion(self) -> GaussianDiffusion:
        return GaussianDiffusion.from_schedule(self.cfg.schedule, self.cfg.timesteps, target=Target(self.cfg.target),
                                               clip_x0=True)


class Decoder(UNet):
    """CLIP image embedding (+ caption) -> image: ``forward(x_t, t, *, tokens, image_emb, drop_text,
    drop_image)``; ``image_emb`` are the stored unit-norm CLIP embeddings (scaled by sqrt(dim) here)."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__(cfg, context_width=cfg.text_width)
        w, emb_dim = cfg.text_width, 4 * cfg.model_channels
        if w % cfg.text_heads:
            raise ValueError(f"text width {w} does not split into {cfg.text_heads} heads")
        self.token_embedding = nn.Embedding(cfg.vocab_size, w)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.text_ctx, w))
        self.text_blocks = nn.ModuleList(Block(w, cfg.text_heads, 4) for _ in range(cfg.text_layers))
        self.text_ln = nn.LayerNorm(w)
        self.text_to_emb = nn.Linear(w, emb_dim)
        self.null_text = nn.Parameter(torch.empty(w))  # the pooled caption's stand-in when it is dropped
        self.clip_to_emb = nn.Linear(cfg.embed_dim, emb_dim)
        self.clip_to_tokens = nn.Linear(cfg.embed_dim, cfg.clip_tokens * w)
        # Unit-scale token embeddings (nn.Embedding's own init), not CLIP's 0.02: in this pre-norm stack the
        # residual stream starts as the embeddings, and at 0.02 the blocks' learned biases outgrow them
        # within ~200 steps, after which the final LayerNorm leaves almost nothing of the caption (measured
        # on the tiny decoder: two captions differing in their colour word pooled 0.004 of a norm apart
        # after 200 steps, against 0.07 at 1.0; the demo decoder's samples ignored their captions, a wrong
        # one serving as well as the right one). tests/test_unet.py; docs/training.md.
        nn.init.normal_(self.token_embedding.weight, std=1.0)
        nn.init.normal_(self.positional_embedding, std=0.5)
        nn.init.normal_(self.null_text, std=0.02)

    def encode_text(self, tokens: torch.Tensor, drop_text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Caption tokens [N, L] (0 pads) -> (per-token outputs [N, L, W], usable [N, L], pooled [N, W]).
        Dropped captions have no usable token and the null vector as their pooled output."""
        n, length = tokens.shape
        x = self.token_embedding(tokens) + self.positional_embedding[:length].to(self.token_embedding.weight.dtype)
        usable = (tokens != 0) & ~drop_text[:, None]
        # bidirectional over the caption's tokens; a token always sees itself (dropped rows see nothing else)
        allowed = (usable[:, None, :] | torch.eye(length, dtype=torch.bool, device=tokens.device)[None])[:, None]
        for block in self.text_blocks:
            x = block(x, allowed)
        x = self.text_ln(x)
        pooled = x[torch.arange(n, device=x.device), tokens.argmax(dim=-1)]  # the end-of-text token (highest id)
        pooled = torch.where(drop_text[:, None], self.null_text.to(x.dtype).expand_as(pooled), pooled)
        return x, usable, pooled

    def forward(self, x: torch.Tensor, t: torch.Tensor, *, tokens: torch.Tensor, image_emb: torch.Tensor,
                drop_text: torch.Tensor, drop_image: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        text, usable, pooled = self.encode_text(tokens, drop_text)
        z = torch.where(drop_image[:, None], torch.zeros_like(image_emb), image_emb) * math.sqrt(cfg.embed_dim)
        clip_tokens = self.clip_to_tokens(z.to(text.dtype)).reshape(len(x), cfg.clip_tokens, cfg.text_width)
        context = (torch.cat([text, clip_tokens], dim=1),
                   torch.cat([usable, torch.ones(len(x), cfg.clip_tokens, dtype=torch.bool, device=x.device)], 1))
        emb = self.text_to_emb(pooled) + self.clip_to_emb(z.to(pooled.dtype))
        return self.unet(x, t, emb=emb.to(x.dtype), context=context)

    def fsdp_blocks(self) -> list[nn.Module]:
        return [*self.text_blocks, *super().fsdp_blocks()]


class Upsampler(UNet):
    """Low-res image -> image ``factor`` times larger: ``forward(x_t, t, *, low_res)``, the low-res
    image ([N, 3, h, w] in [-1, 1]) upsampled bicubically to x_t's size and concatenated to it.

    With ``cfg.residual_scale`` > 0 the diffused quantity is not the image but ``residual_scale * (image -
    bicubic(low_res))``, the detail the bicubic upsampling lacks (a departure from the paper, for short
    trainings): a model that has learned little then adds little to the bicubic image, where one
    diffusing the image itself draws its whole picture from noise. Measured on the demo: see
    docs/training.md. Callers go through ``to_target`` (training) and ``from_sample`` (sampling), which
    are the identity at scale 0.
    """

    def __init__(self, cfg: UpsamplerConfig) -> None:
        super().__init__(cfg, in_channels=6)

    @staticmethod
    def base(low_res: torch.Tensor, size) -> torch.Tensor:
        """The low-res image upsampled bicubically to ``size`` (H, W), clamped to [-1, 1]."""
        return F.interpolate(low_res, size=tuple(size), mode="bicubic", align_corners=False).clamp(-1, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, *, low_res: torch.Tensor) -> torch.Tensor:
        return self.unet(torch.cat([x, self.base(low_res.to(x.dtype), x.shape[-2:])], dim=1), t)

    def diffusion(self) -> GaussianDiffusion:
        if not self.cfg.residual_scale:
            return super().diffusion()
        # a residual is bounded per pixel by its bicubic image, not by [-1, 1]: no clamp of the
        # predicted x0 (``from_sample`` clamps the image)
        return GaussianDiffusion.from_schedule(self.cfg.schedule, self.cfg.timesteps, target=Target(self.cfg.target))

    def to_target(self, image: torch.Tensor, low_res: torch.Tensor) -> torch.Tensor:
        """What the diffusion is trained to produce for ``image`` given ``low_res``."""
        scale = self.cfg.residual_scale
        return image if not scale else (image - self.base(low_res.to(image.dtype), image.shape[-2:])) * scale

    def from_sample(self, x: torch.Tensor, low_res: torch.Tensor) -> torch.Tensor:
        """The image a diffusion sample ``x`` stands for (the inverse of ``to_target``), in [-1, 1]."""
        scale = self.cfg.residual_scale
        return x if not scale else (self.base(low_res.to(x.dtype), x.shape[-2:]) + x / scale).clamp(-1, 1)


def build(kind: str, cfg_dict: dict) -> UNet:
    """A ``Decoder`` or an ``Upsampler`` from its stage name and ``to_dict()``."""
    if kind == "decoder":
        return Decoder(DecoderConfig.from_dict(cfg_dict))
    return Upsampler(UpsamplerConfig.from_dict(cfg_dict))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
