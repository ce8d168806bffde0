"""The upsamplers' low-resolution conditioning images (unclip.data.degrade): each op does what it
claims (blur removes high frequencies, JPEG makes 8x8 blocks and fewer bytes at lower quality, both
noises have their configured variance), sizes and ranges hold, and every draw comes from the
generator passed in."""

from __future__ import annotations

import random

import pytest
import torch

from unclip.data.degrade import (
    BlurDegradation,
    BSRDegradation,
    blur_low_res,
    bsr_low_res,
    downsample,
    gaussian_blur,
    gaussian_noise,
    jpeg,
    jpeg_bytes,
    low_res,
    sensor_noise,
    upsample,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread, as in the DataLoader workers where this code runs: on these tiny tensors
    more threads only add overhead, and on a busy machine they stall each other many times over."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(3, h, w, generator=_gen(seed)) * 2 - 1


def _gradient(h: int = 64, w: int = 64) -> torch.Tensor:
    """A smooth colour image: a ramp with a slow ripple, no edges anywhere."""
    y = torch.linspace(-0.8, 0.8, h)[:, None]
    x = torch.linspace(-0.8, 0.8, w)[None, :]
    g = 0.5 * x + 0.4 * y + 0.1 * torch.sin(3 * x + 2 * y)
    return torch.stack([g, 0.8 * g, -g]).clamp(-1, 1)


def _flat(x01: float, size: int = 256) -> torch.Tensor:
    """A flat grey image at intensity ``x01`` in [0, 1], in the [-1, 1] convention."""
    return torch.full((3, size, size), 2 * x01 - 1)


def _high_freq_energy(img: torch.Tensor) -> float:
    """The spectrum's energy outside the low band, frequencies below 1/8 cycle per pixel."""
    spec = torch.fft.fftshift(torch.fft.fft2(img), dim=(-2, -1)).abs() ** 2
    h, w = img.shape[-2:]
    low = spec[..., 3 * h // 8 : 5 * h // 8, 3 * w // 8 : 5 * w // 8].sum()
    return float(spec.sum() - low)


def _blockiness(img: torch.Tensor) -> float:
    """Mean absolute horizontal step across 8x8 block boundaries over that within blocks."""
    steps = (img[..., 1:] - img[..., :-1]).abs().mean(dim=(0, 1))
    at_boundary = torch.arange(steps.numel()) % 8 == 7
    return float(steps[at_boundary].mean() / steps[~at_boundary].mean())


def test_downsample_and_upsample_sizes():
    img = _random_image(64, 48)
    assert downsample(img, 4).shape == (3, 16, 12)
    assert downsample(_random_image(67, 65), 4).shape == (3, 16, 16)
    assert downsample(img.expand(2, -1, -1, -1), 4).shape == (2, 3, 16, 12)
    low = downsample(img, 4)
    for mode in ("bicubic", "bilinear", "nearest"):
        up = upsample(low, 4, mode)
        assert up.shape == (3, 64, 48)
        assert up.abs().max() <= 1
    assert upsample(low.unsqueeze(0), 4).shape == (1, 3, 64, 48)
    assert downsample(img, 4).abs().max() <= 1
    flat = _flat(0.3, 32)
    torch.testing.assert_close(downsample(flat, 4), flat[:, :8, :8])
    with pytest.raises(ValueError):
        downsample(_random_image(3, 3), 4)


def test_blur_lowers_high_frequency_energy():
    img = _random_image(64, 64)
    checker = ((torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2 * 2 - 1).float()
    for image in (img, checker.expand(3, -1, -1)):
        before = _high_freq_energy(image)
        mild, strong = gaussian_blur(image, 0.6), gaussian_blur(image, 2.0)
        assert _high_freq_energy(mild) < 0.5 * before
        assert _high_freq_energy(strong) < 0.01 * before
    torch.testing.assert_close(gaussian_blur(_flat(0.7, 16), 1.5), _flat(0.7, 16))
    # batches, and kernels wider than the image (reflect padding is cut to fit)
    assert gaussian_blur(img.expand(2, -1, -1, -1), 1.0).shape == (2, 3, 64, 64)
    assert gaussian_blur(_random_image(2, 3), 5.0).shape == (3, 2, 3)


def test_jpeg_blocks_and_bytes():
    smooth = _gradient()
    assert _blockiness(smooth) < 1.1
    low_q, high_q = jpeg(smooth, 10), jpeg(smooth, 95)
    assert _blockiness(low_q) > 2.5
    assert _blockiness(low_q) > 2 * _blockiness(high_q)
    assert (high_q - smooth).abs().mean() < (low_q - smooth).abs().mean()

    textured = _random_image(64, 64)
    sizes = [len(jpeg_bytes(textured, q)) for q in (20, 50, 90)]
    assert sizes == sorted(sizes) and sizes[0] < 0.5 * sizes[-1]
    encoded = jpeg_bytes(textured, 50)
    assert encoded[:2] == b"\xff\xd8" and encoded[-2:] == b"\xff\xd9"
    assert jpeg_bytes(textured, 50) == encoded  # libjpeg is deterministic

    for h, w in ((1, 1), (4, 4), (16, 16), (5, 11)):
        out = jpeg(_random_image(h, w), 30)
        assert out.shape == (3, h, w) and out.abs().max() <= 1
    batch = torch.stack([smooth, textured])
    torch.testing.assert_close(jpeg(batch, 40)[1], jpeg(textured, 40))


@pytest.mark.parametrize(
    ("x01", "shot", "read"), [(0.5, 0.01, 0.0), (0.25, 0.0, 0.03), (0.5, 0.01, 0.02)]
)
def test_sensor_noise_variance(x01, shot, read):
    out = sensor_noise(_flat(x01), shot, read, _gen(0))
    var = float(((out + 1) / 2).var())
    assert var == pytest.approx(shot * x01 + read**2, rel=0.03)


def test_sensor_noise_grows_with_signal():
    dark, bright = (sensor_noise(_flat(x), 0.01, 0.0, _gen(1)) for x in (0.1, 0.4))
    assert float(bright.var()) == pytest.approx(4 * float(dark.var()), rel=0.05)


@pytest.mark.parametrize("gray", [False, True])
def test_gaussian_noise_sigma(gray):
    sigma = 10 / 255
    out = gaussian_noise(_flat(0.5), sigma, _gen(0), gray=gray)
    assert float(((out + 1) / 2).std()) == pytest.approx(sigma, rel=0.015)
    assert torch.equal(out[0], out[2]) == gray


def test_blur_low_res():
    hi = _random_image(64, 64)
    cfg = BlurDegradation()
    for image, size in ((hi, 16), (hi[:, :16, :16], 4)):
        out = blur_low_res(image, 4, cfg, _gen(0))
        assert out.shape == (3, size, size) and out.abs().max() <= 1
    assert torch.equal(blur_low_res(hi, 4, cfg, _gen(3)), blur_low_res(hi, 4, cfg, _gen(3)))
    outs = [blur_low_res(hi, 4, cfg, _gen(seed)) for seed in range(8)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    assert torch.equal(blur_low_res(hi, 4, BlurDegradation(p=0.0), _gen(0)), downsample(hi, 4))
    always = BlurDegradation(p=1.0)
    assert not torch.equal(blur_low_res(hi, 4, always, _gen(0)), downsample(hi, 4))
    assert blur_low_res(torch.stack([hi, hi]), 4, always, _gen(0)).shape == (2, 3, 16, 16)


def test_bsr_low_res():
    cfg = BSRDegradation()
    hi = _random_image(64, 64)
    for image, size in ((hi, 16), (hi[:, :16, :16], 4)):
        # enough seeds to visit most orders, tiny intermediate sizes included
        for seed in range(12):
            out = bsr_low_res(image, 4, cfg, _gen(seed))
            assert out.shape == (3, size, size) and out.abs().max() <= 1
    assert torch.equal(bsr_low_res(hi, 4, cfg, _gen(5)), bsr_low_res(hi, 4, cfg, _gen(5)))
    assert not torch.equal(bsr_low_res(hi, 4, cfg, _gen(5)), bsr_low_res(hi, 4, cfg, _gen(6)))
    assert bsr_low_res(_random_image(32, 48), 4, cfg, _gen(0)).shape == (3, 8, 12)
    batch = bsr_low_res(torch.stack([hi, hi]), 4, cfg, _gen(0))
    assert batch.shape == (2, 3, 16, 16) and not torch.equal(batch[0], batch[1])
    # with every optional op off only the two resizes remain: close to a clean downsample
    resized = bsr_low_res(_gradient(), 4, BSRDegradation(p=0.0), _gen(0))
    assert (resized - downsample(_gradient(), 4)).abs().mean() < 0.05


def test_only_the_generator_is_used():
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    hi = _random_image(32, 32)
    bsr_low_res(hi, 4, BSRDegradation(p=1.0), _gen(0))
    blur_low_res(hi, 4, BlurDegradation(p=1.0), _gen(0))
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == python_state


def test_low_res_dispatch():
    hi = _random_image(32, 32)
    torch.testing.assert_close(low_res(hi, 4, None), downsample(hi, 4))
    blur = BlurDegradation(p=1.0)
    assert torch.equal(low_res(hi, 4, blur, _gen(2)), blur_low_res(hi, 4, blur, _gen(2)))
    bsr = BSRDegradation()
    assert torch.equal(low_res(hi, 4, bsr, _gen(2)), bsr_low_res(hi, 4, bsr, _gen(2)))
    with pytest.raises(ValueError):
        low_res(hi, 4, bsr)


@pytest.mark.parametrize(
    "make",
    [
        lambda: BlurDegradation(p=1.5),
        lambda: BlurDegradation(sigma=(0.6, 0.4)),
        lambda: BSRDegradation(jpeg_quality=(30, 101)),
        lambda: BSRDegradation(sensor_shot=(0.0, 0.01)),
        lambda: BSRDegradation(noise_sigma=(-0.1, 0.1)),
    ],
)
def test_configs_reject_bad_values(make):
    with pytest.raises(ValueError):
        make()
