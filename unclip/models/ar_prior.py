"""The autoregressive prior: caption -> CLIP image embedding as a sequence of discrete codes
(MISSION "Prior", the AR kind).

The dataset version's PCA + quantiser (``unclip.data.pca.PcaQuantiser``) turns an image embedding
into 319 codes of 1024 values (the principal components in order, each bucketed). A decoder-only
causal Transformer predicts them one by one after a prefix of

    [caption tokens (L), CLIP text embedding, quantised text-image dot product]

so the sequence is ``prefix + codes[:-1]`` and the output at the dot-product token predicts the first
code. For classifier-free guidance the text conditioning (caption and text embedding) is dropped for
``cond_drop`` of the training rows (caption hidden from attention, a learned null vector for the
text embedding); the dot-product token stays. At sampling time the caller draws the dot-product
token from the upper half of its training distribution (``PcaQuantiser.sample_dot_bucket_upper_half``)
and decodes the codes back through the quantiser and the PCA.

The caption tokens are encoded by the prior itself, as in the diffusion prior (see
``unclip.models.prior`` for why). torch only; named sizes in ``FLAVOURS``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unclip.models.prior import SIZES, CaptionTransformer


@dataclass(frozen=True)
class ARPriorConfig:
    n_codes: int = 319  # PCA components kept
    n_buckets: int = 1024  # values per code
    dot_buckets: int = 1024  # values of the dot-product token
    embed_dim: int = 1024  # the CLIP text embedding's width
    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    text_ctx: int = 77
    vocab_size: int = 49408
    cond_drop: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)


FLAVOURS: dict[str, ARPriorConfig] = {name: ARPriorConfig(**size) for name, size in SIZES.items()}


class ARPrior(CaptionTransformer):
    def __init__(self, cfg: ARPriorConfig) -> None:
        super().__init__(cfg)
        w = cfg.width
        self.dot_embedding = nn.Embedding(cfg.dot_buckets, w)
        self.code_embedding = nn.Embedding(cfg.n_buckets, w)
        # positions of [text embedding, dot token, code 0 .. code K-2]
        self.code_positions = nn.Parameter(torch.empty(cfg.n_codes + 1, w))
        self.head = nn.Linear(w, cfg.n_buckets)
        self.init_weights()

    def init_weights(self) -> None:
        super().init_weights()
        nn.init.normal_(self.dot_embedding.weight, std=0.02)
        nn.init.normal_(self.code_embedding.weight, std=0.02)
        nn.init.normal_(self.code_positions, std=0.01)

    def forward(self, codes: torch.Tensor, *, tokens: torch.Tensor, text_emb: torch.Tensor, dot: torch.Tensor,
                drop: torch.Tensor) -> torch.Tensor:
        """codes: [N, k] the first k codes (k < n_codes; teacher forcing gives all but the last);
        tokens: [N, L] caption token ids (0 pads); text_emb: [N, D] CLIP text embedding (unit norm);
        dot: [N] dot-product bucket; drop: [N] bool, text conditioning dropped.
        Returns logits [N, k + 1, n_buckets]: position i predicts code i."""
        k = codes.shape[1]
        if k >= self.cfg.n_codes:
            raise ValueError(f"give at most {self.cfg.n_codes - 1} codes; the last one is only predicted")
        prefix = self.prefix(text_emb, dot, drop)  # [N, 2, W]
        appended = torch.cat([prefix, self.code_tokens(codes, 0)], dim=1)  # [N, k + 2, W]
        return self.head(self.run(tokens, drop, appended)[:, 1:])  # from the dot token on: [N, k + 1, n_buckets]

    def prefix(self, text_emb: torch.Tensor, dot: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        """The tokens after the caption: [text embedding (or the null vector), dot product], [N, 2, W]."""
        cond = self.text_condition(text_emb * math.sqrt(self.cfg.embed_dim), drop)  # [N, W]
        return torch.stack([cond, self.dot_embedding(dot).to(cond.dtype)], dim=1) + self.code_positions[:2].to(cond.dtype)

    def code_tokens(self, codes: torch.Tensor, first: int) -> torch.Tensor:
        """Codes [N, k] that are codes ``first .. first + k - 1`` of the sequence, as tokens [N, k, W]."""
        k = codes.shape[1]
        return self.code_embedding(codes) + self.code_positions[first + 2: first + 2 + k]


def training_loss(model: nn.Module, cfg: ARPriorConfig, *, codes: torch.Tensor, tokens: torch.Tensor,
                  text_emb: torch.Tensor, dot: torch.Tensor,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean cross-entropy per code (nats) with teacher forcing, and the codes' top-1 accuracy."""
    drop = torch.rand(len(codes), generator=generator, device=codes.device) < cfg.cond_drop
    logits = model(codes[:, :-1], tokens=tokens, text_emb=text_emb, dot=dot, drop=drop)  # [N, K, B]
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), codes.reshape(-1))
    acc = (logits.argmax(-1) == codes).float().mean()
    return loss, {"code_acc": float(acc)}


@torch.no_grad()
def sample(model: ARPrior, *, tokens: torch.Tensor, text_emb: torch.Tensor, dot: torch.Tensor, guidance: float = 1.0,
           temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Codes [N, n_codes] drawn one at a time with a key/value cache (one token per block and code
    after the prefix). Guidance on the logits: uncond + s (cond - uncond), the conditional and the
    unconditional rows in one batch. ``temperature`` 0 takes the most likely code."""
    cfg = model.cfg
    n, device = len(tokens), tokens.device
    keep = torch.zeros(n, dtype=torch.bool, device=device)
    if guidance != 1.0:  # rows [cond; uncond]
        tokens, text_emb, dot = torch.cat([tokens, tokens]), torch.cat([text_emb, text_emb]), torch.cat([dot, dot])
        drop = torch.cat([keep, ~keep])
    else:
        drop = keep
    cache: dict = {"room": cfg.n_codes - 1}  # codes 0 .. n_codes - 2 go in after the prefix
    hidden = model.run(tokens, drop, model.prefix(text_emb, dot, drop), cache=cache)[:, -1]  # the dot token's output
    codes = []
    for i in range(cfg.n_codes):
        logits = model.head(hidden)
        if guidance != 1.0:
            cond, uncond = logits.chunk(2)
            logits = uncond + guidance * (cond - uncond)
        if temperature <= 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            nxt = torch.multinomial(F.softmax(logits.float() / temperature, dim=-1), 1, generator=generator)
        codes.append(nxt)
        if i + 1 < cfg.n_codes:
            step = nxt if guidance == 1.0 else torch.cat([nxt, nxt])
            hidden = model.run(None, drop, model.code_tokens(step, i), cache=cache)[:, -1]
    return torch.cat(codes, dim=1)
