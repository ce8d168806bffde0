"""The AR prior network: teacher forcing, dropped conditioning, codes through the PCA quantiser, sampling."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unclip.data import pca
from unclip.models import ar_prior as ar
from unclip.models.ar_prior import ARPrior, ARPriorConfig

CFG = ARPriorConfig(n_codes=6, n_buckets=16, dot_buckets=8, embed_dim=32, width=32, depth=2, heads=4, text_ctx=8,
                    vocab_size=50)


def _batch(n: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, CFG.n_buckets, (n, CFG.n_codes), generator=g)
    tokens = torch.randint(1, CFG.vocab_size, (n, CFG.text_ctx), generator=g)
    tokens[:, 4:] = 0
    text = F.normalize(torch.randn(n, CFG.embed_dim, generator=g), dim=-1)
    dot = torch.randint(0, CFG.dot_buckets, (n,), generator=g)
    return codes, tokens, text, dot


HEADS = pytest.mark.parametrize("head", ["logistic_mixture", "softmax"])


def _with(head: str) -> ARPriorConfig:
    """CFG with that head; the mixture with Fourier features of the codes going in, as the demo's."""
    return dataclasses.replace(CFG, head=head, code_features=8 if head == "logistic_mixture" else 0)


@HEADS
def test_teacher_forcing_is_causal_and_dropping_hides_the_text(head):
    torch.manual_seed(0)
    model = ARPrior(_with(head)).eval()
    codes, tokens, text, dot = _batch()
    drop = torch.tensor([True, False, True, False, False])
    logits = model(codes[:, :-1], tokens=tokens, text_emb=text, dot=dot, drop=drop)
    assert logits.shape == (5, CFG.n_codes, CFG.n_buckets)
    # log-probabilities over the buckets; the training path gives the targets' own
    torch.testing.assert_close(logits.exp().sum(-1), torch.ones(5, CFG.n_codes))
    own = model(codes[:, :-1], tokens=tokens, text_emb=text, dot=dot, drop=drop, targets=codes)
    torch.testing.assert_close(own, logits.gather(-1, codes[..., None])[..., 0])
    # position i sees codes before i only: changing the last input code changes only the last logits
    changed = codes.clone()
    changed[:, -2] = (changed[:, -2] + 1) % CFG.n_buckets
    other = model(changed[:, :-1], tokens=tokens, text_emb=text, dot=dot, drop=drop)
    torch.testing.assert_close(other[:, :-1], logits[:, :-1])
    assert not torch.allclose(other[:, -1], logits[:, -1])
    # a prefix gives the same logits as the full teacher-forced pass
    torch.testing.assert_close(model(codes[:, :2], tokens=tokens, text_emb=text, dot=dot, drop=drop), logits[:, :3])
    # dropped rows see neither caption nor text embedding, but still the dot-product token
    other = model(codes[:, :-1], tokens=torch.randint(1, CFG.vocab_size, tokens.shape), text_emb=torch.randn_like(text),
                  dot=dot, drop=drop)
    torch.testing.assert_close(other[drop], logits[drop])
    assert not torch.allclose(other[~drop], logits[~drop])
    assert not torch.allclose(model(codes[:, :-1], tokens=tokens, text_emb=text, dot=(dot + 1) % 8, drop=drop)[drop],
                              logits[drop])


@HEADS
def test_training_learns_codes_from_the_caption(head):
    torch.manual_seed(0)
    cfg = _with(head)
    model = ARPrior(cfg)
    codes, tokens, text, dot = _batch(8, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # decayed to zero: at a constant 3e-3 the mixture's loss still swings between 0.1 and 0.9 at step
    # 300, and where it stands then depends on the CPU's rounding
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 300)
    first = None
    for _ in range(300):
        loss, _ = ar.training_loss(model, cfg, codes=codes, tokens=tokens, text_emb=text, dot=dot)
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    model.eval()
    keep = torch.zeros(8, dtype=torch.bool)
    with torch.no_grad():  # the conditional NLL per code, no row's caption dropped
        nll = -model(codes[:, :-1], tokens=tokens, text_emb=text, dot=dot, drop=keep, targets=codes).mean().item()
    assert first > 2.5 and nll < 0.3, (first, nll)
    with torch.no_grad():  # teacher-forced, every code's most likely bucket is the true one
        forced = model(codes[:, :-1], tokens=tokens, text_emb=text, dot=dot, drop=keep)
    assert (forced.argmax(-1) == codes).float().mean() > 0.9
    if head == "softmax":  # greedy sampling too (the mixture's slips to a neighbouring bucket derail these
        # random codes: they are no function of the previous ones, unlike the PCA's)
        greedy = ar.sample(model, tokens=tokens, text_emb=text, dot=dot, temperature=0)
        assert (greedy == codes).float().mean() > 0.9


def test_the_mixture_head_knows_neighbouring_buckets():
    # what the mixture head is for: trained on one bucket, it puts more mass on that bucket's
    # neighbours than on far buckets; the softmax head learns nothing about them
    torch.manual_seed(0)
    h = torch.randn(64, 16)
    target = torch.full((64,), 40)
    mass = {}
    for head in (ar.LogisticMixtureHead(16, 128, 2), ar.SoftmaxHead(16, 128)):
        opt = torch.optim.Adam(head.parameters(), lr=3e-2)
        for _ in range(100):
            loss = -head.log_prob(h, target).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            mass[type(head).__name__] = head(h).exp().mean(0)
    m, s = mass["LogisticMixtureHead"], mass["SoftmaxHead"]
    assert m[40] > 0.2 and m[38:43].sum() > 0.6 and m[[39, 41]].min() > 10 * m[[10, 70]].max(), m[35:46]
    assert s[[39, 41]].max() < 2 * s[[10, 70]].max(), s[35:46]


def test_sampling_shapes_determinism_and_guidance():
    torch.manual_seed(0)
    model = ARPrior(CFG).eval()
    _, tokens, text, dot = _batch(3)
    a = ar.sample(model, tokens=tokens, text_emb=text, dot=dot, guidance=2.0, generator=torch.Generator().manual_seed(3))
    b = ar.sample(model, tokens=tokens, text_emb=text, dot=dot, guidance=2.0, generator=torch.Generator().manual_seed(3))
    assert a.shape == (3, CFG.n_codes) and a.dtype == torch.long and torch.equal(a, b)
    assert int(a.min()) >= 0 and int(a.max()) < CFG.n_buckets


@HEADS
def test_cached_decoding_matches_full_passes(head):
    # the key/value cache changes nothing: at every step the cached logits equal a full teacher-forced
    # pass over the same codes, for captions of different lengths and dropped rows
    torch.manual_seed(0)
    model = ARPrior(_with(head)).eval()
    codes, tokens, text, dot = _batch(4)
    tokens[0, 2:] = 0  # captions of 2, 4, 4 and 7 tokens
    tokens[3, 4:7] = torch.tensor([5, 6, 7])
    drop = torch.tensor([False, True, False, False])
    with torch.no_grad():
        full = model(codes[:, :-1], tokens=tokens, text_emb=text, dot=dot, drop=drop)  # [N, K, B]
        cache = {"room": CFG.n_codes - 1}
        steps = [model.head(model.run(tokens, drop, model.prefix(text, dot, drop), cache=cache)[:, -1])]
        for i in range(CFG.n_codes - 1):
            steps.append(model.head(model.run(None, drop, model.code_tokens(codes[:, i:i + 1], i), cache=cache)[:, -1]))
        torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="room"):
            model.run(None, drop, model.code_tokens(codes[:, :1], 0), cache=cache)
    # greedy sampling (one batch of conditional and unconditional rows under guidance) is the argmax
    # of the guided full passes over its own codes
    keep = torch.zeros(4, dtype=torch.bool)
    for guidance in (1.0, 3.0):
        got = ar.sample(model, tokens=tokens, text_emb=text, dot=dot, guidance=guidance, temperature=0)
        with torch.no_grad():
            cond = model(got[:, :-1], tokens=tokens, text_emb=text, dot=dot, drop=keep)
            uncond = model(got[:, :-1], tokens=tokens, text_emb=text, dot=dot, drop=~keep)
        assert torch.equal((uncond + guidance * (cond - uncond)).argmax(-1), got), guidance


def test_codes_round_trip_through_the_pca_quantiser():
    # the AR prior's vocabulary is the dataset version's quantiser: encode -> codes -> decode
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((8, 64))
    img = rng.standard_normal((2000, 8)) @ basis + 0.01 * rng.standard_normal((2000, 64))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt = img + 0.3 * rng.standard_normal(img.shape) / 8
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)

    def batches(columns=("image_emb", "text_emb")):
        return iter([(img, txt)])

    model, _ = pca.fit_pca_quantiser(batches, n_components=8, n_buckets=64, dot_buckets=16, seed=0)
    codes = model.encode(img[:100])
    assert codes.shape == (100, 8) and codes.max() < 64
    back = model.decode(codes)
    cos = (back * img[:100]).sum(1) / np.linalg.norm(back, axis=1)
    assert cos.mean() > 0.98
    np.testing.assert_array_equal(model.encode(model.decode(codes)), codes)
    # the conditioning token: the dot product's bucket, drawn from the upper half at sampling time
    dots = model.encode_dot((img * txt).sum(1))
    upper = model.sample_dot_bucket_upper_half(np.random.default_rng(1), 500)
    assert upper.min() >= model.median_dot_bucket and dots.max() < 16


def test_the_paper_ar_prior_on_the_meta_device():
    with torch.device("meta"):
        paper = ARPrior(ar.FLAVOURS["paper"])
    n = sum(p.numel() for p in paper.parameters())
    print(f"paper AR prior: {n / 1e6:.1f}M parameters")
    assert 0.9e9 < n < 1.3e9
