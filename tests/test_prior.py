"""The diffusion prior network: shapes, dropped conditioning, a training step, sampling, sizes."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unclip.models import prior as dp
from unclip.models.prior import DiffusionPrior, DiffusionPriorConfig

CFG = DiffusionPriorConfig(embed_dim=32, width=32, depth=2, heads=4, text_ctx=8, vocab_size=50, timesteps=100)


def _batch(n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, CFG.embed_dim, generator=g), dim=-1)
    txt = F.normalize(img + 0.5 * torch.randn(n, CFG.embed_dim, generator=g), dim=-1)
    tokens = torch.randint(1, CFG.vocab_size, (n, CFG.text_ctx), generator=g)
    tokens[:, 5:] = 0  # padding
    return img, txt, tokens


def test_forward_shapes_and_dropped_conditioning_ignores_the_caption():
    torch.manual_seed(0)
    model = DiffusionPrior(CFG).eval()
    img, txt, tokens = _batch()
    t = torch.tensor([0, 10, 20, 50, 80, 99])
    drop = torch.tensor([True, False, True, False, False, False])
    out = model(img, t, tokens=tokens, text_emb=txt, drop=drop)
    assert out.shape == img.shape and torch.isfinite(out).all()
    other_tokens = torch.randint(1, CFG.vocab_size, tokens.shape)
    out2 = model(img, t, tokens=other_tokens, text_emb=torch.randn_like(txt), drop=drop)
    # rows with dropped conditioning see neither caption nor text embedding; the others do
    torch.testing.assert_close(out2[drop], out[drop])
    assert not torch.allclose(out2[~drop], out[~drop])
    # a batch cut to its longest caption gives the same outputs
    torch.testing.assert_close(model(img, t, tokens=dp.trim_tokens(tokens), text_emb=txt, drop=drop), out)
    assert dp.trim_tokens(tokens).shape == (6, 5)
    # padding is not read: a different embedding for the pad id changes nothing
    with torch.no_grad():
        model.token_embedding.weight[0] += 1.0
    torch.testing.assert_close(model(img, t, tokens=tokens, text_emb=txt, drop=drop), out)


def test_one_training_step_updates_every_parameter():
    torch.manual_seed(0)
    model = DiffusionPrior(CFG)
    diffusion = model.diffusion()
    img, txt, tokens = _batch(16)
    cfg = DiffusionPriorConfig(**{**CFG.to_dict(), "cond_drop": 0.5})
    loss = dp.training_loss(model, cfg, diffusion, image_emb=img, text_emb=txt, tokens=tokens,
                            generator=torch.Generator().manual_seed(1))
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_training_fits_a_caption_to_embedding_map():
    # a few hundred steps on 8 fixed pairs: the x0 prediction from noise must move toward the right image
    torch.manual_seed(0)
    model = DiffusionPrior(CFG)
    diffusion = model.diffusion()
    img, txt, tokens = _batch(8, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        loss = dp.training_loss(model, CFG, diffusion, image_emb=img, text_emb=txt, tokens=tokens, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    pred = dp.sample(model, text_emb=txt, tokens=tokens, steps=20, generator=torch.Generator().manual_seed(0))
    cos = (pred * img).sum(-1)
    assert cos.mean().item() > 0.8, cos
    assert cos.mean().item() > (txt * img).sum(-1).mean().item()


def test_sampling_shapes_determinism_and_best_of_candidates():
    torch.manual_seed(0)
    model = DiffusionPrior(CFG).eval()
    _, txt, tokens = _batch(3)
    a = dp.sample(model, text_emb=txt, tokens=tokens, guidance=3.0, steps=10, generator=torch.Generator().manual_seed(7))
    b = dp.sample(model, text_emb=txt, tokens=tokens, guidance=3.0, steps=10, generator=torch.Generator().manual_seed(7))
    c = dp.sample(model, text_emb=txt, tokens=tokens, guidance=3.0, steps=10, generator=torch.Generator().manual_seed(8))
    assert a.shape == (3, CFG.embed_dim) and torch.equal(a, b) and not torch.equal(a, c)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(3))
    # best of 4 is at least as close to the text as one candidate drawn the same way
    one = dp.sample(model, text_emb=txt, tokens=tokens, steps=10, candidates=1, generator=torch.Generator().manual_seed(7))
    four = dp.sample(model, text_emb=txt, tokens=tokens, steps=10, candidates=4, generator=torch.Generator().manual_seed(7))
    assert ((four * txt).sum(-1) >= (one * txt).sum(-1) - 1e-6).all()


def test_the_cached_caption_prefix_gives_the_full_pass_and_the_same_samples():
    import math

    from unclip.models.diffusion import guided

    torch.manual_seed(0)
    model = DiffusionPrior(CFG).eval()
    img, txt, tokens = _batch()
    drop = torch.tensor([True, False, True, False, False, False])
    with torch.no_grad():
        prefix = model.prefix(tokens=tokens, text_emb=txt, drop=drop)
        for t in (torch.full((6,), 99), torch.tensor([0, 10, 20, 50, 80, 99]), torch.zeros(6, dtype=torch.long)):
            x = torch.randn_like(img)  # each step writes over the previous step's tokens, not after them
            torch.testing.assert_close(model(x, t, prefix=prefix),
                                       model(x, t, tokens=tokens, text_emb=txt, drop=drop), rtol=1e-5, atol=1e-5)
    # sample() with the prefix against DDIM over the full model through guided(), same noise
    scale = math.sqrt(CFG.embed_dim)
    for g in (1.0, 3.0):
        a = dp.sample(model, text_emb=txt, tokens=tokens, guidance=g, steps=8, candidates=1,
                      generator=torch.Generator().manual_seed(5))
        keep = torch.zeros(6, dtype=torch.bool)
        full = model.diffusion().respaced(8).sample(
            guided(model, g, uncond_kwargs={"drop": torch.ones_like(keep)}), (6, CFG.embed_dim),
            generator=torch.Generator().manual_seed(5),
            model_kwargs={"tokens": dp.trim_tokens(tokens), "text_emb": txt * scale, "drop": keep})
        torch.testing.assert_close(a, F.normalize(full, dim=-1), rtol=1e-4, atol=1e-4)


def test_named_sizes_and_the_paper_prior_on_the_meta_device():
    with torch.device("meta"):
        paper = DiffusionPrior(dp.FLAVOURS["paper"])
    n = sum(p.numel() for p in paper.parameters())
    print(f"paper diffusion prior: {n / 1e6:.1f}M parameters")
    assert 0.9e9 < n < 1.3e9  # the paper: about 1B
    tiny = DiffusionPrior(dp.FLAVOURS["tiny"])
    assert sum(p.numel() for p in tiny.parameters()) < 30e6
