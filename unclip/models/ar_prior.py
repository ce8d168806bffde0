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

The codes are ordered (bucket b of a component lies between buckets b - 1 and b + 1), and the
paper's plain softmax over 1024 buckets (``head="softmax"``, the default) ignores that: each bucket's
output row learns only from the rows that fell in it, so on little data it cannot generalise (the
demo has under one training row per bucket and component; there it overfits and its held-out NLL
rises above uniform). ``head="logistic_mixture"`` (the demo's) is a mixture of ``mixtures``
logistics over the buckets' normal scores (the quantile buckets mapped through the inverse normal
CDF), discretised to the buckets as in PixelCNN++: the network predicts each component's location
and spread, which is a regression and learns from every row; it is still a distribution over the
same 1024 buckets (NLL, guidance, temperature and sampling are unchanged). ``code_features`` embeds
the codes going in the same spirit: a learned table plus a projection of Fourier features of the
bucket's position, so that neighbouring buckets start out near each other.

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
    head: str = "softmax"  # the paper's; or "logistic_mixture" (module docstring)
    mixtures: int = 4  # logistics per code (head "logistic_mixture")
    code_features: int = 0  # Fourier features of a code's bucket position in its input embedding (0: none)

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"head {self.head!r}: one of {sorted(HEADS)}")
        if self.code_features % 2:
            raise ValueError(f"code_features {self.code_features}: an even number (cos and sin pairs)")

    def to_dict(self) -> dict:
        return asdict(self)


_OPEN_END = 1e4  # far beyond any normal score (the outer edges of 1024 buckets are at -/+3.1)


class LogisticMixtureHead(nn.Module):
    """Hidden states -> log-probabilities of the ``n_buckets`` codes: a mixture of logistics over the
    buckets' normal scores, each bucket's mass the mixture's CDF between its edges."""

    def __init__(self, width: int, n_buckets: int, mixtures: int) -> None:
        super().__init__()
        self.params = nn.Linear(width, 3 * mixtures)  # logit weight, location, log scale per logistic
        inner = torch.special.ndtri(torch.arange(1, n_buckets, dtype=torch.float64) / n_buckets)
        # [B + 1] every bucket's edges; the outer buckets' open ends as finite ones (an infinite edge
        # makes the scale's gradient 0 * inf)
        edges = torch.cat([inner.new_full((1,), -_OPEN_END), inner, inner.new_full((1,), _OPEN_END)])
        self.register_buffer("edges", edges.float(), persistent=False)

    def _mixture(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # float32 even under autocast: bf16 would round a location to about two buckets' width
        with torch.autocast(h.device.type, enabled=False):
            w, loc, log_scale = self.params(h.float()).chunk(3, dim=-1)
        return F.log_softmax(w, dim=-1), loc, torch.exp(-log_scale.clamp(min=-7.0, max=5.0))

    @staticmethod
    def _log_mass(lo: torch.Tensor, hi: torch.Tensor, log_w: torch.Tensor, loc: torch.Tensor,
                  inv: torch.Tensor) -> torch.Tensor:
        """log sum_m w_m (sigmoid(b_m) - sigmoid(a_m)), a_m, b_m the edges scaled by component m, in log
        space: sigmoid(b) - sigmoid(a) = sigmoid(b) sigmoid(-a) (1 - exp(a - b)), exact far in either
        tail, where the plain difference of two float32 sigmoids is 0 and has no gradient."""
        a, b = (lo - loc) * inv, (hi - loc) * inv
        log_mass = F.logsigmoid(b) + F.logsigmoid(-a) + torch.log(-torch.expm1(a - b))
        return torch.logsumexp(log_mass + log_w, dim=-1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """[..., W] -> [..., n_buckets] log-probabilities."""
        log_w, loc, inv = self._mixture(h)
        edges = self.edges[:, None]  # [B + 1, 1] against the components [..., 1, M]
        return self._log_mass(edges[:-1], edges[1:], log_w[..., None, :], loc[..., None, :], inv[..., None, :])

    def log_prob(self, h: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """[..., W] and [...] codes -> [...] their log-probabilities (only their buckets' edges)."""
        log_w, loc, inv = self._mixture(h)
        return self._log_mass(self.edges[codes][..., None], self.edges[codes + 1][..., None], log_w, loc, inv)


class SoftmaxHead(nn.Linear):
    """The paper's head: one logit per bucket."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(super().forward(h).float(), dim=-1)

    def log_prob(self, h: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        return self(h).gather(-1, codes[..., None])[..., 0]


HEADS = {"logistic_mixture", "softmax"}

FLAVOURS: dict[str, ARPriorConfig] = {name: ARPriorConfig(**size) for name, size in SIZES.items()}


class ARPrior(CaptionTransformer):
    def __init__(self, cfg: ARPriorConfig) -> None:
        super().__init__(cfg)
        w = cfg.width
        self.dot_embedding = nn.Embedding(cfg.dot_buckets, w)
        self.code_embedding = nn.Embedding(cfg.n_buckets, w)
        if cfg.code_features:  # cos, sin of pi f (b + 1/2) / B for f = 1 .. F/2: smooth in the bucket b
            b = (torch.arange(cfg.n_buckets, dtype=torch.float64) + 0.5) / cfg.n_buckets
            angle = math.pi * b[:, None] * torch.arange(1, cfg.code_features // 2 + 1, dtype=torch.float64)
            self.register_buffer("code_fourier", torch.cat([angle.cos(), angle.sin()], dim=1).float(), persistent=False)
            self.code_fourier_proj = nn.Linear(cfg.code_features, w)
        # positions of [text embedding, dot token, code 0 .. code K-2]
        self.code_positions = nn.Parameter(torch.empty(cfg.n_codes + 1, w))
        if cfg.head == "softmax":
            self.head = SoftmaxHead(w, cfg.n_buckets)
        else:
            self.head = LogisticMixtureHead(w, cfg.n_buckets, cfg.mixtures)
        self.init_weights()

    def init_weights(self) -> None:
        super().init_weights()
        nn.init.normal_(self.dot_embedding.weight, std=0.02)
        nn.init.normal_(self.code_embedding.weight, std=0.02)
        nn.init.normal_(self.code_positions, std=0.01)

    def forward(self, codes: torch.Tensor, *, tokens: torch.Tensor, text_emb: torch.Tensor, dot: torch.Tensor,
                drop: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """codes: [N, k] the first k codes (k < n_codes; teacher forcing gives all but the last);
        tokens: [N, L] caption token ids (0 pads); text_emb: [N, D] CLIP text embedding (unit norm);
        dot: [N] dot-product bucket; drop: [N] bool, text conditioning dropped.
        Returns log-probabilities [N, k + 1, n_buckets]: position i predicts code i; or, given
        ``targets`` [N, k + 1], only theirs, [N, k + 1] (training: the mixture head never builds the
        whole distribution)."""
        k = codes.shape[1]
        if k >= self.cfg.n_codes:
            raise ValueError(f"give at most {self.cfg.n_codes - 1} codes; the last one is only predicted")
        prefix = self.prefix(text_emb, dot, drop)  # [N, 2, W]
        appended = torch.cat([prefix, self.code_tokens(codes, 0)], dim=1)  # [N, k + 2, W]
        hidden = self.run(tokens, drop, appended)[:, 1:]  # from the dot token on: [N, k + 1, W]
        return self.head(hidden) if targets is None else self.head.log_prob(hidden, targets)

    def prefix(self, text_emb: torch.Tensor, dot: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        """The tokens after the caption: [text embedding (or the null vector), dot product], [N, 2, W]."""
        cond = self.text_condition(text_emb * math.sqrt(self.cfg.embed_dim), drop)  # [N, W]
        return torch.stack([cond, self.dot_embedding(dot).to(cond.dtype)], dim=1) + self.code_positions[:2].to(cond.dtype)

    def code_tokens(self, codes: torch.Tensor, first: int) -> torch.Tensor:
        """Codes [N, k] that are codes ``first .. first + k - 1`` of the sequence, as tokens [N, k, W]."""
        k = codes.shape[1]
        x = self.code_embedding(codes) + self.code_positions[first + 2: first + 2 + k]
        if self.cfg.code_features:
            x = x + self.code_fourier_proj(self.code_fourier[codes])
        return x


def training_loss(model: nn.Module, cfg: ARPriorConfig, *, codes: torch.Tensor, tokens: torch.Tensor,
                  text_emb: torch.Tensor, dot: torch.Tensor,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean negative log-likelihood per code (nats) with teacher forcing."""
    drop = torch.rand(len(codes), generator=generator, device=codes.device) < cfg.cond_drop
    log_prob = model(codes[:, :-1], tokens=tokens, text_emb=text_emb, dot=dot, drop=drop, targets=codes)  # [N, K]
    return -log_prob.mean(), {}


@torch.no_grad()
def sample(model: ARPrior, *, tokens: torch.Tensor, text_emb: torch.Tensor, dot: torch.Tensor, guidance: float = 1.0,
           temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Codes [N, n_codes] drawn one at a time with a key/value cache (one token per block and code
    after the prefix). Guidance on the log-probabilities: uncond + s (cond - uncond), the conditional and the
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
