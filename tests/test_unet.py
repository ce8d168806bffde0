"""The image models (unclip.models.unet): sizes, shapes, conditioning paths, sampling."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from unclip.models import unet
from unclip.models.diffusion import guided


def _tokens(n: int, length: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tok = torch.zeros(n, length, dtype=torch.long)
    tok[:, 0] = 49406
    tok[:, 1:6] = torch.randint(1, 40000, (n, 5), generator=g)
    tok[:, 6] = 49407
    return tok


def _decoder_kwargs(n: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"tokens": _tokens(n, seed=seed), "image_emb": F.normalize(torch.randn(n, 1024, generator=g), dim=-1),
            "drop_text": torch.zeros(n, dtype=torch.bool), "drop_image": torch.zeros(n, dtype=torch.bool)}


def _randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """The model with its zero-initialised output layers filled in, so its outputs depend on its inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def test_the_paper_sizes_are_counted_on_the_meta_device():
    counts = {}
    for kind, cfg in unet.FLAVOURS["paper"].items():
        with torch.device("meta"):
            counts[kind] = unet.count_parameters(unet.build(kind, cfg.to_dict()))
    print({k: f"{v / 1e6:.0f}M" for k, v in counts.items()})
    # the paper: a 3.5B decoder, 700M and 300M upsamplers
    assert 3.2e9 < counts["decoder"] < 3.8e9
    assert 0.6e9 < counts["upsampler1"] < 0.8e9
    assert 0.25e9 < counts["upsampler2"] < 0.35e9


def test_the_decoder_maps_noise_and_conditioning_to_an_image_and_uses_both():
    torch.manual_seed(0)
    cfg = unet.FLAVOURS["tiny"]["decoder"]
    model = _randomised(unet.Decoder(cfg)).eval()
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 500, 999])
    kw = _decoder_kwargs(3)
    with torch.no_grad():
        out = model(x, t, **kw)
        assert out.shape == x.shape and torch.isfinite(out).all()
        other_image = model(x, t, **{**kw, "image_emb": _decoder_kwargs(3, seed=1)["image_emb"]})
        other_text = model(x, t, **{**kw, "tokens": _tokens(3, seed=1)})
        assert not torch.allclose(out, other_image) and not torch.allclose(out, other_text)
        # a dropped caption and a zeroed embedding make the output independent of them
        dropped = {**kw, "drop_text": torch.ones(3, dtype=torch.bool), "drop_image": torch.ones(3, dtype=torch.bool)}
        a = model(x, t, **dropped)
        b = model(x, t, **{**dropped, "tokens": _tokens(3, seed=2), "image_emb": _decoder_kwargs(3, seed=2)["image_emb"]})
        assert torch.allclose(a, b, atol=1e-6)


def test_attention_with_context_matches_its_definition_and_runs_on_the_fused_kernel():
    """The UNet's attention is softmax(q k^T / sqrt(d)) v over the positions and the usable context
    tokens, and it reaches a fused kernel (flash; a transposed q, k, v would fall back to the unfused
    math kernel, which has no such restriction and is several times slower on a GPU)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    n, c, side, heads, ctx_w, length = 2, 64, 4, 2, 24, 5
    block = _randomised(unet.AttentionBlock(c, c // heads, ctx_w)).eval()
    x, tokens = torch.randn(n, c, side, side), torch.randn(n, length, ctx_w)
    usable = torch.ones(n, length, dtype=torch.bool)
    usable[0, 2:] = False
    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        got = block(x, None, (tokens, usable))

        d = c // heads
        q, k, v = block.qkv(block.norm(x).reshape(n, c, -1)).reshape(n, 3, heads, d, -1).unbind(1)  # [N, H, d, P]
        ck, cv = block.context_kv(tokens).transpose(1, 2).reshape(n, 2, heads, d, length).unbind(1)
        k, v = torch.cat([ck, k], -1), torch.cat([cv, v], -1)
        scores = torch.einsum("nhdp,nhdl->nhpl", q, k) / d**0.5
        allowed = torch.cat([usable, torch.ones(n, side * side, dtype=torch.bool)], 1)[:, None, None, :]
        w = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        a = torch.einsum("nhpl,nhdl->nhdp", w, v).reshape(n, c, -1)
        want = x + block.proj(a).reshape(n, c, side, side)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_a_fresh_model_predicts_zero_noise():
    # guided-diffusion's zero-initialised output layer: training starts from the mean prediction
    model = unet.Upsampler(unet.FLAVOURS["tiny"]["upsampler1"])
    out = model(torch.randn(2, 3, 16, 16), torch.tensor([3, 7]), low_res=torch.randn(2, 3, 4, 4))
    assert torch.count_nonzero(out) == 0


def test_an_upsampler_trains_on_crops_and_samples_at_the_full_size():
    model = _randomised(unet.Upsampler(unet.FLAVOURS["tiny"]["upsampler2"])).eval()
    with torch.no_grad():
        crop = model(torch.randn(2, 3, 64, 64), torch.tensor([1, 2]), low_res=torch.randn(2, 3, 16, 16))
        full = model(torch.randn(1, 3, 256, 256), torch.tensor([1]), low_res=torch.randn(1, 3, 64, 64))
    assert crop.shape == (2, 3, 64, 64) and full.shape == (1, 3, 256, 256)
    assert not any(isinstance(m, unet.AttentionBlock) for m in model.modules())  # convolutions only, as in the paper
    with pytest.raises(ValueError, match="multiples"):
        model(torch.randn(1, 3, 33, 33), torch.tensor([1]), low_res=torch.randn(1, 3, 8, 8))


def test_a_residual_upsampler_diffuses_the_detail_that_bicubic_upsampling_lacks():
    cfg = unet.FLAVOURS["tiny"]["upsampler1"]
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 16, 16, generator=g) * 1.6 - 0.8
    low = F.interpolate(image, size=(4, 4), mode="area")
    plain = unet.Upsampler(cfg)
    assert torch.equal(plain.to_target(image, low), image) and torch.equal(plain.from_sample(image, low), image)
    model = unet.Upsampler(dataclasses.replace(cfg, residual_scale=4.0))
    target = model.to_target(image, low)
    up = F.interpolate(low, size=(16, 16), mode="bicubic", align_corners=False).clamp(-1, 1)
    assert torch.allclose(target, 4.0 * (image - up))
    assert torch.allclose(model.from_sample(target, low), image, atol=1e-6)  # the inverse, back in [-1, 1]
    assert torch.equal(model.from_sample(torch.zeros_like(image), low), up)  # no detail: the bicubic image


def test_decoder_sampling_is_deterministic_under_a_seed_and_guidance_runs_one_doubled_batch():
    torch.manual_seed(0)
    model = _randomised(unet.Decoder(unet.FLAVOURS["tiny"]["decoder"])).eval()
    process = model.diffusion().respaced(4)
    kw = _decoder_kwargs(2)
    uncond = {"drop_text": torch.ones(2, dtype=torch.bool), "drop_image": torch.ones(2, dtype=torch.bool)}
    calls = []

    def counted(x, t, **k):
        calls.append(len(x))
        return model(x, t, **k)

    def draw(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return process.sample(guided(counted, 3.0, uncond_kwargs=uncond), (2, 3, 16, 16), generator=g,
                              model_kwargs=kw, sampler="ddim", eta=1.0)

    a, b, c = draw(0), draw(0), draw(1)
    assert a.shape == (2, 3, 16, 16) and a.abs().max() <= 1.0 + 1e-5  # the last step returns the clipped x0
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert calls == [4] * 12  # 3 draws x 4 steps, conditional and unconditional halves together


def test_fsdp_blocks_cover_the_heavy_layers():
    with torch.device("meta"):
        model = unet.Decoder(unet.FLAVOURS["paper"]["decoder"])
    covered = {id(p) for b in model.fsdp_blocks() for p in b.parameters()}
    outside = sum(p.numel() for p in model.parameters() if id(p) not in covered)
    # the token embedding, the projections and the in/out convolutions stay at the root
    assert outside < 0.1 * unet.count_parameters(model)


@pytest.mark.slow
def test_training_keeps_the_captions_content_in_the_text_encoder():
    # Caption only (no CLIP embedding), one demo object at the centre, the demo's captions, the demo
    # decoder's lr and batch. With CLIP's 0.02 token-embedding init the text blocks' learned biases
    # outgrew the embeddings: after 200 steps two captions differing only in their colour word were
    # pooled 0.004 of a norm apart, and the decoder's prediction was the same for both. At 1.0: 0.07,
    # and by step 400 the caption sets the colour (docs/training.md, "The decoder's caption path").
    import numpy as np
    import open_clip

    from unclip.data import demo_source as ds
    from unclip.models.prior import trim_tokens
    from unclip.train import image, trainer

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    scenes, pics = [], []
    for _ in range(600):
        sc = ds.centred_scene(rng, radius=0.25)
        scenes.append(sc)
        pics.append(ds._render(sc, rng))
    pre = image.DecoderPreprocess(16)
    x = torch.stack([pre(p) for p in pics])
    tokens = open_clip.tokenize([ds.dalle_caption(sc, rng) for sc in scenes])
    model = unet.Decoder(dataclasses.replace(unet.FLAVOURS["tiny"]["decoder"], embed_dim=8))
    diffusion = model.diffusion()
    opt = torch.optim.AdamW(trainer.param_groups(model, 0.0), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    n = 32
    for _ in range(200):
        idx = torch.randint(0, len(x), (n,), generator=g)
        kw = {"tokens": trim_tokens(tokens[idx]), "image_emb": torch.zeros(n, 8),
              "drop_text": torch.zeros(n, dtype=torch.bool), "drop_image": torch.ones(n, dtype=torch.bool)}
        loss = diffusion.training_loss(model, x[idx], diffusion.sample_timesteps(n), model_kwargs=kw).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    probe = trim_tokens(open_clip.tokenize([f"A large {c} circle in the centre." for c in ("red", "blue")]))
    with torch.no_grad():
        pooled = model.encode_text(probe, torch.zeros(2, dtype=torch.bool))[2]
    apart = float((pooled[0] - pooled[1]).norm() / pooled[0].norm())
    assert apart > 0.02, apart
