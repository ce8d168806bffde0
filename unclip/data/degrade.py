"""The upsamplers' low-resolution conditioning image: a high-resolution crop, downsampled, degraded.

unCLIP (Ramesh et al. 2022), section 2.1: the two diffusion upsamplers (64->256 and 256->1024) are
conditioned on the upsampled low-resolution image, and to make them robust to the previous stage's
artefacts that image is slightly corrupted in training, with Gaussian blur for the first upsampler
and the more diverse "BSR degradation" (Zhang et al. 2021) for the second. This module makes it from
a training crop, one sample at a time, with every random draw taken from the ``torch.Generator``
passed in (never torch's global RNG, Python's ``random`` or numpy's), so a resumed training run
degrades each sample exactly as the interrupted one would have.

``BlurDegradation`` (first upsampler): downsample, then with probability ``p`` an isotropic Gaussian
blur whose sigma, in low-resolution pixels, is drawn uniformly from ``sigma``; the defaults are
DALLE2-pytorch's (``blur_prob=0.5``, ``blur_sigma=0.6``, with a range below it).

``BSRDegradation`` (second upsampler) follows BSRGAN (Zhang et al. 2021, "Designing a Practical
Degradation Model for Deep Blind Image Super-Resolution", ``degradation_bsrgan``): blur, a resize to
an intermediate size (scale factor uniform in [1, 2 * factor] of the high-resolution size, so it
can pass below the final size), a resize to the final size, Gaussian noise, JPEG compression and
camera sensor noise, in a random order, except that the intermediate resize precedes the final one.
So each op acts at the resolution it finds: noise added before a resize is attenuated by it, JPEG
blocks made at high resolution shrink. Each resize is bilinear or bicubic, with or without
antialiasing (OpenCV's linear and cubic, which BSRGAN uses, alias; its area mode and Matlab's
``imresize`` do not); the image is clamped to [-1, 1] after every op. The defaults:

- ``blur_sigma=(0.1, 1.0)`` low-resolution pixels. BSRGAN draws sigma from [0, 2 + 0.2 * sf]
  pixels of the image as it finds it: up to 2.8 low-resolution pixels when the blur comes after
  the downsampling, 0.7 when before; latent diffusion's "light" variant divides it by 4. Sigma is
  given here in low-resolution pixels (scaled to the current size when the blur acts), so that its
  strength does not depend on the drawn order, and capped at 1.0, beyond which little is left of
  the detail a 4x upsampler's input carries.
- ``noise_sigma=(2/255, 25/255)`` and ``jpeg_quality=(30, 95)``: BSRGAN's ``add_Gaussian_noise``
  and ``add_JPEG_noise`` ranges, drawn uniformly. The noise is per channel or, with probability one
  half, the same in every channel (BSRGAN: 40% per channel, 40% grey, 20% channel-correlated).
- ``sensor_shot=(1e-4, 0.012)`` and ``sensor_read=(1e-4, 0.015)``, both drawn log-uniformly: the
  shot-noise range of Brooks et al. 2019 ("Unprocessing Images for Learned Raw Denoising"), the
  noise model inside BSRGAN's camera-sensor step, and the read-noise standard deviation that their
  fitted log-log line gives at its two ends (drawn independently of the shot noise here).
- ``p=0.9`` for each of blur, noise, JPEG and sensor noise (BSRGAN's JPEG probability); the two
  resizes always happen.

Simplified from BSRGAN, and why: sensor noise is a Poisson-Gaussian approximation applied to the
[0, 1] sRGB image (variance ``shot * x + read**2``), with no reverse ISP pipeline (unprocessing to
raw, mosaic, white balance, gamma and back) -- that needs camera colour matrices and per-camera
tone curves, and latent diffusion's copy of BSRGAN's code skips it (``isp_model=None``). The blur is
one isotropic Gaussian, not two draws that are half the time anisotropic; the resize has no "blur
with a shifted kernel, then nearest downsampling" branch; there is no extra JPEG at the end (BSRGAN
models photographs saved as JPEG, while the second upsampler's input at sampling time is the first
upsampler's output, never compressed). Plain torch and torchvision: ``interpolate`` resizes,
``torchvision.transforms.v2.functional.gaussian_blur`` blurs, ``torchvision.io`` encodes real JPEG.
Images are float tensors in [-1, 1], ``[3, H, W]`` or ``[N, 3, H, W]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.io import decode_jpeg, encode_jpeg
from torchvision.transforms.v2 import functional as TF

_RESIZE_MODES = ("bilinear", "bicubic")


def _check_range(name: str, lo: float, hi: float, *, low: float = 0.0) -> None:
    if not low <= lo <= hi:
        raise ValueError(f"{name} must satisfy {low} <= lo <= hi, got ({lo}, {hi})")


def _check_p(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be a probability in [0, 1], got {p}")


@dataclass(frozen=True)
class BlurDegradation:
    """The first upsampler's corruption: a Gaussian blur of the downsampled image, half the time.

    ``sigma`` is in low-resolution pixels and drawn uniformly; ``p`` is the probability that the
    blur is applied at all, so the upsampler also sees clean inputs, as it will at sampling time.
    """

    sigma: tuple[float, float] = (0.4, 0.6)
    p: float = 0.5

    def __post_init__(self) -> None:
        _check_range("sigma", *self.sigma, low=1e-3)
        _check_p(self.p)


@dataclass(frozen=True)
class BSRDegradation:
    """The second upsampler's corruption: BSRGAN's shuffled blur, resizes, noise and JPEG.

    The module docstring gives the source of each default. ``blur_sigma`` is in low-resolution
    pixels; ``noise_sigma`` and the sensor terms are in [0, 1] intensity units (the sensor noise's
    variance is ``shot * x + read**2``); the sensor ranges are drawn log-uniformly, so a lower bound
    of 0 is only allowed together with an upper bound of 0 (that term switched off).
    """

    blur_sigma: tuple[float, float] = (0.1, 1.0)
    noise_sigma: tuple[float, float] = (2 / 255, 25 / 255)
    jpeg_quality: tuple[int, int] = (30, 95)
    sensor_shot: tuple[float, float] = (1e-4, 0.012)
    sensor_read: tuple[float, float] = (1e-4, 0.015)
    p: float = 0.9

    def __post_init__(self) -> None:
        _check_range("blur_sigma", *self.blur_sigma, low=1e-3)
        _check_range("noise_sigma", *self.noise_sigma)
        _check_range("jpeg_quality", *self.jpeg_quality, low=1)
        if self.jpeg_quality[1] > 100:
            raise ValueError(f"jpeg_quality must be at most 100, got {self.jpeg_quality}")
        for name in ("sensor_shot", "sensor_read"):
            lo, hi = getattr(self, name)
            _check_range(name, lo, hi)
            if lo == 0.0 and hi > 0.0:
                raise ValueError(f"{name} is drawn log-uniformly: its lower bound must be > 0")
        _check_p(self.p)


Degradation = BlurDegradation | BSRDegradation


# --- random draws, all from the caller's generator ------------------------------------------


def _rand(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator, device=generator.device))


def _chance(p: float, generator: torch.Generator) -> bool:
    return _rand(generator) < p


def _uniform(lo: float, hi: float, generator: torch.Generator) -> float:
    return lo + (hi - lo) * _rand(generator)


def _log_uniform(lo: float, hi: float, generator: torch.Generator) -> float:
    if lo == hi:
        return lo
    return math.exp(_uniform(math.log(lo), math.log(hi), generator))


def _randint(lo: int, hi: int, generator: torch.Generator) -> int:
    """An integer uniform in [lo, hi], both ends included."""
    return int(torch.randint(lo, hi + 1, (), generator=generator, device=generator.device))


def _randn_like(img: Tensor, generator: torch.Generator, *, channels: int | None = None) -> Tensor:
    """Standard normal noise shaped like ``img`` (with ``channels`` channels if given), drawn on the
    generator's device so the numbers depend only on the seed, then moved to the image."""
    shape = list(img.shape)
    if channels is not None:
        shape[-3] = channels
    noise = torch.randn(shape, generator=generator, device=generator.device)
    return noise.to(device=img.device, dtype=img.dtype)


# --- deterministic ops ----------------------------------------------------------------------


def _resize(img: Tensor, size: tuple[int, int], mode: str, *, antialias: bool) -> Tensor:
    batched = img.unsqueeze(0) if img.ndim == 3 else img
    out = F.interpolate(batched, size=size, mode=mode, align_corners=False, antialias=antialias)
    return (out.squeeze(0) if img.ndim == 3 else out).clamp(-1.0, 1.0)


def _low_size(img: Tensor, factor: int) -> tuple[int, int]:
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    h, w = img.shape[-2] // factor, img.shape[-1] // factor
    if h < 1 or w < 1:
        raise ValueError(f"a {tuple(img.shape[-2:])} image is too small to downsample by {factor}")
    return h, w


def downsample(img: Tensor, factor: int) -> Tensor:
    """Antialiased bicubic downsampling to exactly ``(H // factor, W // factor)``, clamped to
    [-1, 1] (bicubic overshoots at edges)."""
    return _resize(img, _low_size(img, factor), "bicubic", antialias=True)


def upsample(img: Tensor, factor: int, mode: str = "bicubic") -> Tensor:
    """Upsampling to ``(H * factor, W * factor)``, clamped to [-1, 1]: the upsampler's extra input
    channels (guided-diffusion's ``SuperResModel`` interpolates bilinearly, Karlo bicubically)."""
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    size = (img.shape[-2] * factor, img.shape[-1] * factor)
    batched = img.unsqueeze(0) if img.ndim == 3 else img
    align = None if mode in ("nearest", "nearest-exact", "area") else False
    out = F.interpolate(batched, size=size, mode=mode, align_corners=align)
    return (out.squeeze(0) if img.ndim == 3 else out).clamp(-1.0, 1.0)


def gaussian_blur(img: Tensor, sigma: float) -> Tensor:
    """An isotropic Gaussian blur of standard deviation ``sigma`` pixels, with reflect padding.

    The kernel spans ``ceil(3 * sigma)`` pixels each side, cut to ``size - 1`` on images smaller
    than that (reflect padding cannot exceed the image; the truncated kernel is renormalised). It is
    applied as two one-dimensional passes, which a torchvision kernel of width 1 along the other
    axis makes exact: many times cheaper than one 2-D kernel at the sigmas a 1024-pixel crop gets.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    reach = math.ceil(3.0 * sigma)
    kx = 2 * min(reach, img.shape[-1] - 1) + 1
    ky = 2 * min(reach, img.shape[-2] - 1) + 1
    out = TF.gaussian_blur(img, kernel_size=[kx, 1], sigma=[sigma, sigma])
    return TF.gaussian_blur(out, kernel_size=[1, ky], sigma=[sigma, sigma])


def _to_uint8(img: Tensor) -> Tensor:
    return ((img.detach().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8).cpu()


def jpeg_bytes(img: Tensor, quality: int) -> bytes:
    """The JPEG file (libjpeg through ``torchvision.io.encode_jpeg``) of one ``[3, H, W]`` image,
    quantised to 8 bits; ``quality`` in [1, 100]."""
    if img.ndim != 3:
        raise ValueError(f"jpeg_bytes takes one [3, H, W] image, got shape {tuple(img.shape)}")
    return bytes(encode_jpeg(_to_uint8(img), quality=quality).numpy())


def jpeg(img: Tensor, quality: int) -> Tensor:
    """A round trip through real JPEG bytes at ``quality``: 8-bit quantisation, chroma subsampling,
    8x8 DCT blocks. Any size works, down to 1x1; batches are coded image by image."""
    if img.ndim == 4:
        return torch.stack([jpeg(one, quality) for one in img])
    decoded = decode_jpeg(encode_jpeg(_to_uint8(img), quality=quality))
    return (decoded.to(device=img.device, dtype=img.dtype) / 127.5 - 1.0).clamp(-1.0, 1.0)


def gaussian_noise(
    img: Tensor, sigma: float, generator: torch.Generator, *, gray: bool = False
) -> Tensor:
    """Additive white Gaussian noise of standard deviation ``sigma`` in [0, 1] intensity units
    (``2 * sigma`` in the image's [-1, 1] units), per channel, or the same in every channel when
    ``gray``; clamped to [-1, 1]."""
    noise = _randn_like(img, generator, channels=1 if gray else None)
    return (img + (2.0 * sigma) * noise).clamp(-1.0, 1.0)


def sensor_noise(img: Tensor, shot: float, read: float, generator: torch.Generator) -> Tensor:
    """Signal-dependent camera-sensor noise, the Gaussian approximation of Poisson shot noise plus
    Gaussian read noise: at intensity ``x`` in [0, 1] the noise variance is ``shot * x + read**2``
    (Foi et al. 2008; Brooks et al. 2019), independent per channel; clamped to [-1, 1]."""
    x = (img.clamp(-1.0, 1.0) + 1.0) / 2.0
    std = (shot * x + read**2).sqrt()
    return ((x + std * _randn_like(img, generator)) * 2.0 - 1.0).clamp(-1.0, 1.0)


# --- the two degradations -------------------------------------------------------------------


def _per_sample(fn: Callable[[Tensor], Tensor], hi: Tensor) -> Tensor:
    """Applies a single-image degradation to ``[3, H, W]`` or to each image of ``[N, 3, H, W]``
    (each sample draws its own parameters, in batch order)."""
    if hi.ndim == 4:
        return torch.stack([fn(one) for one in hi])
    if hi.ndim != 3:
        raise ValueError(f"expected [3, H, W] or [N, 3, H, W], got shape {tuple(hi.shape)}")
    return fn(hi)


def blur_low_res(
    hi: Tensor, factor: int, cfg: BlurDegradation, generator: torch.Generator
) -> Tensor:
    """The first upsampler's conditioning image: ``hi`` downsampled by ``factor``, then blurred with
    probability ``cfg.p`` at a sigma (low-resolution pixels) drawn uniformly from ``cfg.sigma``."""

    def one(img: Tensor) -> Tensor:
        low = downsample(img, factor)
        if _chance(cfg.p, generator):
            low = gaussian_blur(low, _uniform(*cfg.sigma, generator)).clamp(-1.0, 1.0)
        return low

    return _per_sample(one, hi)


def _random_resize(img: Tensor, size: tuple[int, int], generator: torch.Generator) -> Tensor:
    mode = _RESIZE_MODES[_randint(0, len(_RESIZE_MODES) - 1, generator)]
    return _resize(img, size, mode, antialias=_chance(0.5, generator))


def bsr_low_res(hi: Tensor, factor: int, cfg: BSRDegradation, generator: torch.Generator) -> Tensor:
    """The second upsampler's conditioning image: BSRGAN's ops in a random order (module docstring),
    ending at exactly ``(H // factor, W // factor)`` in [-1, 1]."""
    low_h, low_w = _low_size(hi, factor)

    def one(img: Tensor) -> Tensor:
        ops = ["blur", "resize_mid", "resize_final", "noise", "jpeg", "sensor"]
        perm = torch.randperm(len(ops), generator=generator, device=generator.device)
        order = [ops[i] for i in perm.tolist()]
        mid, final = order.index("resize_mid"), order.index("resize_final")
        if mid > final:  # the intermediate size is a stop on the way, so it comes first
            order[mid], order[final] = order[final], order[mid]
        for op in order:
            if op == "resize_mid":
                scale = _uniform(1.0, 2.0 * factor, generator)
                size = (max(1, round(img.shape[-2] / scale)), max(1, round(img.shape[-1] / scale)))
                img = _random_resize(img, size, generator)
            elif op == "resize_final":
                img = _random_resize(img, (low_h, low_w), generator)
            elif not _chance(cfg.p, generator):
                continue
            elif op == "blur":
                # sigma is in low-resolution pixels: scale it to the resolution the blur finds
                sigma = _uniform(*cfg.blur_sigma, generator) * img.shape[-2] / low_h
                img = gaussian_blur(img, sigma).clamp(-1.0, 1.0)
            elif op == "noise":
                sigma = _uniform(*cfg.noise_sigma, generator)
                img = gaussian_noise(img, sigma, generator, gray=_chance(0.5, generator))
            elif op == "jpeg":
                img = jpeg(img, _randint(*cfg.jpeg_quality, generator))
            else:
                shot = _log_uniform(*cfg.sensor_shot, generator)
                read = _log_uniform(*cfg.sensor_read, generator)
                img = sensor_noise(img, shot, read, generator)
        return img

    return _per_sample(one, hi)


def low_res(
    hi: Tensor,
    factor: int,
    cfg: BlurDegradation | BSRDegradation | None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The conditioning image for an upsampler with degradation ``cfg``; ``None`` is the clean
    antialiased downsample (evaluation, or an upsampler trained without corruption), which needs no
    generator."""
    if cfg is None:
        return downsample(hi, factor)
    if generator is None:
        raise ValueError(f"{type(cfg).__name__} draws random parameters: pass a torch.Generator")
    if isinstance(cfg, BlurDegradation):
        return blur_low_res(hi, factor, cfg, generator)
    if isinstance(cfg, BSRDegradation):
        return bsr_low_res(hi, factor, cfg, generator)
    raise TypeError(f"unknown degradation config {type(cfg).__name__}")
