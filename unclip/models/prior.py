"""The diffusion prior: caption -> CLIP image embedding (MISSION "Prior", the diffusion kind).

A decoder-only causal Transformer over the sequence

    [caption tokens (L), CLIP text embedding, timestep embedding, noised CLIP image embedding, query]

whose output at the final, learned query token predicts the un-noised image embedding (MSE on x0,
through ``unclip.models.diffusion``). The unit-norm CLIP embeddings are multiplied by sqrt(dim)
before noising, so each dimension has about unit variance like the noise.

The caption tokens are encoded by the prior's own token embedding and its causal Transformer, not by
the frozen CLIP text tower's per-token outputs. The stored dataset holds the pooled CLIP text
embedding (in the sequence as its own token) but no per-token states: storing them would cost
77 x 1024 values a pair (about 100 TB at 650M pairs in float16), and computing them would run the
CLIP text tower beside every training step. The prior learns what it needs from the tokens itself.

For classifier-free guidance the conditioning is dropped for a fraction ``cond_drop`` of the
training rows: their caption tokens are hidden from attention and their text embedding replaced by
a learned null vector. Sampling draws ``candidates`` embeddings per caption (two in the paper) and
keeps the one with the highest dot product with the text embedding.

torch only; named sizes in ``FLAVOURS`` (``tiny`` for the demo and CI, ``paper`` about 1B).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unclip.models.diffusion import GaussianDiffusion, Target


@dataclass(frozen=True)
class DiffusionPriorConfig:
    embed_dim: int = 1024  # the CLIP embedding width
    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    text_ctx: int = 77  # caption tokens (open_clip's context length)
    vocab_size: int = 49408  # open_clip's tokenizer
    timesteps: int = 1000
    schedule: str = "cosine"
    cond_drop: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)


# the named sizes of both priors (``tiny`` for the demo's diffusion prior and CI); the paper's are about 1B parameters each (18 blocks of width 2048:
# 1.05B for the diffusion prior with its token embedding)
SIZES: dict[str, dict[str, int]] = {
    "micro": {"width": 128, "depth": 2, "heads": 4},  # the demo's AR prior (2 CPU cores)
    "tiny": {"width": 256, "depth": 4, "heads": 4},
    "small": {"width": 512, "depth": 8, "heads": 8},
    "paper": {"width": 2048, "depth": 18, "heads": 32},
}
FLAVOURS: dict[str, DiffusionPriorConfig] = {name: DiffusionPriorConfig(**size) for name, size in SIZES.items()}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps, [N] -> [N, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class Block(nn.Module):
    """Pre-norm Transformer block with masked self-attention."""

    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, kv: dict | None = None, pos: int = 0) -> torch.Tensor:
        # x: [N, S, W]; allowed: [N, 1, S, pos + S] bool, True where a query may attend to a key;
        # kv: this block's key and value buffers [N, H, capacity, W/H] when decoding step by step (made
        # at the first call): x's keys and values are written at positions pos.., x attends to all before
        n, s, w = x.shape
        q, k, v = self.qkv(self.ln_1(x)).reshape(n, s, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        if kv is not None:
            if "k" not in kv:  # allocated at the first write, in the dtype the projections give
                kv["k"] = k.new_empty(*k.shape[:2], kv["capacity"], k.shape[3])
                kv["v"] = v.new_empty(*k.shape[:2], kv["capacity"], k.shape[3])
            kv["k"][:, :, pos:pos + s] = k
            kv["v"][:, :, pos:pos + s] = v
            k, v = kv["k"][:, :, :pos + s], kv["v"][:, :, :pos + s]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # [N, H, S, W/H]
        x = x + self.proj(a.transpose(1, 2).reshape(n, s, w))
        return x + self.mlp(self.ln_2(x))


class CaptionTransformer(nn.Module):
    """The trunk both priors share: a causal pre-norm Transformer over the caption tokens (the prior's
    own token embedding; padding and dropped captions hidden as keys) and the tokens a prior appends
    after them, whose positions are the prior's own (fixed whatever the caption's length, so a
    batch's captions can be cut to its longest, ``trim_tokens``, without changing anything)."""

    def __init__(self, cfg: DiffusionPriorConfig | Any) -> None:
        # cfg: either prior's config; both name vocab_size, text_ctx, embed_dim, width, depth, heads, mlp_ratio
        super().__init__()
        if cfg.width % cfg.heads:
            raise ValueError(f"width {cfg.width} does not split into {cfg.heads} heads")
        self.cfg = cfg
        self.depth = cfg.depth
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.text_ctx, cfg.width))
        self.text_proj = nn.Linear(cfg.embed_dim, cfg.width)
        self.null_text = nn.Parameter(torch.empty(cfg.width))  # the text embedding's stand-in when conditioning is dropped
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.ln_final = nn.LayerNorm(cfg.width)

    def init_weights(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.null_text, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for b in self.blocks:  # residual branches scaled down with depth (GPT-2)
            nn.init.normal_(b.proj.weight, std=0.02 / math.sqrt(2 * self.depth))
            nn.init.normal_(b.mlp[2].weight, std=0.02 / math.sqrt(2 * self.depth))

    def fsdp_blocks(self) -> list[nn.Module]:
        return list(self.blocks)

    def text_condition(self, text_emb: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        """[N, D] text embeddings -> [N, W] tokens; the learned null vector where ``drop``."""
        cond = self.text_proj(text_emb)
        return torch.where(drop[:, None], self.null_text.to(cond.dtype).expand_as(cond), cond)

    def run(self, tokens: torch.Tensor | None, drop: torch.Tensor, appended: torch.Tensor,
            cache: dict | None = None) -> torch.Tensor:
        """tokens: [N, L] caption ids (0 pads); drop: [N] bool; appended: [N, R, W] the prior's tokens
        (positions included). Returns the normalised outputs at the appended positions, [N, R, W].

        ``cache`` decodes step by step: pass ``{"room": n}`` (the tokens still to come) on the first
        call, which runs the caption and ``appended`` and keeps every block's keys and values in
        buffers with room for ``n`` more; each later call passes ``tokens=None`` and only the new
        appended tokens, which attend to everything before them."""
        if cache is not None and "blocks" in cache:
            return self._run_cached(appended, cache)
        n, length = tokens.shape
        caption = self.token_embedding(tokens) + self.positional_embedding[:length].to(appended.dtype)  # [N, L, W]
        x = torch.cat([caption, appended], dim=1)  # [N, S = L + R, W]
        s = x.shape[1]
        # causal; caption padding (and dropped captions) hidden as keys; a query always sees itself
        key_ok = torch.cat([(tokens != 0) & ~drop[:, None],
                            torch.ones(n, appended.shape[1], dtype=torch.bool, device=tokens.device)], 1)
        causal = torch.ones(s, s, dtype=torch.bool, device=tokens.device).tril()
        allowed = (causal[None] & key_ok[:, None, :]) | torch.eye(s, dtype=torch.bool, device=tokens.device)[None]
        blocks: list[dict | None] = [None] * len(self.blocks)
        if cache is not None:
            room = int(cache.get("room", 0))
            blocks = [{"capacity": s + room} for _ in self.blocks]
            cache.update(blocks=blocks, length=s, key_ok=torch.cat(
                [key_ok, torch.ones(n, room, dtype=torch.bool, device=tokens.device)], 1))
        for block, kv in zip(self.blocks, blocks):
            x = block(x, allowed[:, None], kv)
        return self.ln_final(x[:, length:])

    def _run_cached(self, appended: torch.Tensor, cache: dict) -> torch.Tensor:
        r = appended.shape[1]
        before = cache["length"]
        if before + r > cache["key_ok"].shape[1]:
            raise ValueError(f"the key/value cache has room for {cache['key_ok'].shape[1] - before} more tokens, "
                             f"not {r}: give a larger 'room' on the first call")
        causal = torch.ones(r, before + r, dtype=torch.bool, device=appended.device).tril(diagonal=before)
        allowed = (causal[None] & cache["key_ok"][:, None, : before + r])[:, None]  # [N, 1, r, before + r]
        x = appended
        for block, kv in zip(self.blocks, cache["blocks"]):
            x = block(x, allowed, kv, before)
        cache["length"] = before + r
        return self.ln_final(x)


class DiffusionPrior(CaptionTransformer):
    def __init__(self, cfg: DiffusionPriorConfig) -> None:
        super().__init__(cfg)
        w = cfg.width
        self.special_positions = nn.Parameter(torch.empty(4, w))  # [text embedding, time, x_t, query]
        self.time_mlp = nn.Sequential(nn.Linear(w, 4 * w), nn.SiLU(), nn.Linear(4 * w, w))
        self.x_proj = nn.Linear(cfg.embed_dim, w)
        self.query = nn.Parameter(torch.empty(w))
        self.out = nn.Linear(w, cfg.embed_dim)
        self.init_weights()

    def init_weights(self) -> None:
        super().init_weights()
        nn.init.normal_(self.special_positions, std=0.01)
        nn.init.normal_(self.query, std=0.02)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, *, tokens: torch.Tensor | None = None,
                text_emb: torch.Tensor | None = None, drop: torch.Tensor | None = None,
                prefix: dict | None = None) -> torch.Tensor:
        """x_t: [N, D] noised (scaled) image embedding; t: [N] timesteps; tokens: [N, L] caption token
        ids (0 pads); text_emb: [N, D] scaled CLIP text embedding; drop: [N] bool, conditioning
        dropped. Or, in place of the last three, ``prefix``: what ``self.prefix`` made of them.
        Returns the predicted clean (scaled) image embedding, [N, D]."""
        if prefix is not None:  # the caption and the text embedding ran once: only the last 3 tokens run
            prefix["length"] = prefix["prefix_length"]  # the previous step's 3 tokens are written over
            return self.out(self.run(None, prefix["drop"], self._step_tokens(x_t, t, prefix["dtype"]), prefix)[:, -1])
        text = self._text_token(text_emb, drop)  # [N, 1, W]
        special = torch.cat([text, self._step_tokens(x_t, t, text.dtype)], dim=1)  # [N, 4, W]
        return self.out(self.run(tokens, drop, special)[:, -1])  # the query's output: [N, D]

    def _text_token(self, text_emb: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        """The text embedding's token (the null vector where dropped), with its position, [N, 1, W]."""
        cond = self.text_condition(text_emb, drop)
        return (cond + self.special_positions[0].to(cond.dtype))[:, None]

    def _step_tokens(self, x_t: torch.Tensor, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The tokens that change with the denoising step: time, x_t and the query, [N, 3, W]."""
        return torch.cat([
            self.time_mlp(timestep_embedding(t, self.cfg.width).to(dtype))[:, None],
            self.x_proj(x_t)[:, None],
            self.query.to(dtype).expand(len(x_t), 1, -1),
        ], dim=1) + self.special_positions[1:].to(dtype)

    @torch.no_grad()
    def prefix(self, *, tokens: torch.Tensor, text_emb: torch.Tensor, drop: torch.Tensor) -> dict:
        """Runs the caption tokens and the text-embedding token once and keeps every block's keys and
        values: the sequence is causal and they come first, so they are the same at every denoising
        step. ``forward(x_t, t, prefix=...)`` then runs only the 3 tokens after them (sampling with a
        20-token caption: about 6x fewer tokens a step)."""
        text = self._text_token(text_emb, drop)
        cache: dict = {"room": 3}
        self.run(tokens, drop, text, cache)
        cache.update(prefix_length=cache["length"], drop=drop, dtype=text.dtype)
        return cache

    # -- the diffusion around it ----------------------------------------------------------------------
    def diffusion(self) -> GaussianDiffusion:
        return GaussianDiffusion.from_schedule(self.cfg.schedule, self.cfg.timesteps, target=Target.X0)

    @property
    def scale(self) -> float:
        return math.sqrt(self.cfg.embed_dim)


def trim_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Caption tokens [N, L] cut after the batch's last non-pad column (the prior's output does not
    change; a 77-token context of 15-token captions costs 5x the attention and MLP work)."""
    used = (tokens != 0).any(dim=0).nonzero()
    return tokens[:, : int(used.max()) + 1] if len(used) else tokens[:, :1]


def empty_captions(tokens: torch.Tensor) -> torch.Tensor:
    """bool [N]: the rows of caption tokens [N, L] (CLIP's BPE, 0 pads) that hold nothing between start
    and end of text, as an empty or blank caption tokenizes."""
    return (tokens != 0).sum(dim=-1) <= 2


def training_loss(model: nn.Module, cfg: DiffusionPriorConfig, diffusion: GaussianDiffusion, *,
                  image_emb: torch.Tensor, text_emb: torch.Tensor, tokens: torch.Tensor,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The mean x0-MSE of a batch. ``model`` is the prior or its DDP/FSDP wrapper; the embeddings are
    the stored unit-norm ones, scaled here; the conditioning of ``cfg.cond_drop`` of the rows is dropped."""
    scale = math.sqrt(cfg.embed_dim)
    n, device = len(image_emb), image_emb.device
    drop = torch.rand(n, generator=generator, device=device) < cfg.cond_drop
    t = diffusion.sample_timesteps(n, device=device, generator=generator)
    noise = torch.randn(image_emb.shape, generator=generator, device=device, dtype=image_emb.dtype)
    loss = diffusion.training_loss(model, image_emb * scale, t, noise=noise,
                                   model_kwargs={"tokens": tokens, "text_emb": text_emb * scale, "drop": drop})
    return loss.mean()


@torch.no_grad()
def sample(model: DiffusionPrior, *, text_emb: torch.Tensor, tokens: torch.Tensor, guidance: float = 1.0,
           steps: int = 64, candidates: int = 2, generator: torch.Generator | None = None,
           diffusion: GaussianDiffusion | None = None) -> torch.Tensor:
    """Unit-norm predicted image embeddings [N, D]: ``candidates`` DDIM samples per caption (``steps``
    respaced steps, guidance scale ``guidance``), keeping the one closest to the text embedding."""
    cfg = model.cfg
    n = len(text_emb)
    process = (diffusion or model.diffusion()).respaced(steps)
    scale = math.sqrt(cfg.embed_dim)
    rep_text = text_emb.repeat(candidates, 1) * scale
    rep_tokens = trim_tokens(tokens).repeat(candidates, 1)
    keep = torch.zeros(n * candidates, dtype=torch.bool, device=text_emb.device)
    # the caption and the text embedding run once (``DiffusionPrior.prefix``), then each step runs 3
    # tokens a row; with guidance the rows are doubled, the conditional ones first (as guided() does)
    if guidance == 1.0:
        prefix = model.prefix(tokens=rep_tokens, text_emb=rep_text, drop=keep)
    else:
        prefix = model.prefix(tokens=rep_tokens.repeat(2, 1), text_emb=rep_text.repeat(2, 1),
                              drop=torch.cat([keep, torch.ones_like(keep)]))

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if guidance == 1.0:
            return model(x, t, prefix=prefix)
        cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), prefix=prefix).chunk(2)
        return uncond + guidance * (cond - uncond)

    x = process.sample(fn, (n * candidates, cfg.embed_dim), generator=generator, device=text_emb.device,
                       dtype=text_emb.dtype)
    x = F.normalize(x.float(), dim=-1).reshape(candidates, n, -1)  # [C, N, D]
    best = (x * F.normalize(text_emb.float(), dim=-1)[None]).sum(-1).argmax(0)  # [N]
    return x[best, torch.arange(n, device=x.device)]
