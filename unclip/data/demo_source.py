"""The built-in demo's data: procedural image-caption pairs from two sources, with planted bad rows.

There is no internet here, so the demo makes the paper's two training sources itself (Ramesh et al.,
2022, section 2.3 and appendix C: "CLIP data" for CLIP only, "DALL-E data" for the whole generative
stack). Every image is a rendered scene of coloured shapes (shape, colour, size, count, position on a
3x3 grid), so a caption can be TRUE and a small model can learn it:

- ``dalle``: clean descriptive captions ("Two small red circles on the left and a large blue square at
  the top right."), ``for_generative: true``;
- ``clip``: web alt-text: terse, varied templates, file-name noise, and a fixed seeded fraction
  (``CLIP_NOISE_FRACTION``) only partly right or describing another image, ``for_generative: false``.

A sprinkling of bad rows is planted in both sources (``BAD_KINDS``): each fails exactly one check of
the pipeline, with the (stage, reason) code from ``unclip.drops`` recorded in ``plan.parquet`` so the
end-to-end tests can compare what the pipeline dropped with what was planted. The images, bodies and
pages are files under ``out_dir/www``, served by ``unclip.data.demo_server``; behaviour that a static
file cannot express (status codes, redirects, opt-out header, slow and endless bodies) is a route of
that server, chosen by the URL's first path segment.

Layout written (all atomically, all deterministic in the arguments)::

    out_dir/spec.json                       arguments, port, extra lists, "complete" marker
    out_dir/plan.parquet                    one row per URL-list row: the expected outcome
    out_dir/lists/<source>/part-NNNNN.parquet   url, caption, scene_json
    out_dir/www/...                         what the server serves

Exact duplicates and near-duplicates are planted in the SAME source as their original and later in
its (file name, row) order, so "the copy that sorts first is kept" keeps the original whatever order
the config lists the sources in (the demo lists them as ``SOURCES``: clip, then dalle).
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import random
import shutil
import socket
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from unclip import drops

if TYPE_CHECKING:
    from unclip.config import RunConfig
    from unclip.data.demo_server import DemoServer

SOURCES: tuple[str, ...] = ("clip", "dalle")
FOR_GENERATIVE = {"clip": False, "dalle": True}
SPEC_VERSION = 1

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
          "cross": "crosses", "diamond": "diamonds"}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 30, 30), "orange": (240, 130, 20), "yellow": (235, 215, 30), "green": (40, 160, 50),
    "blue": (30, 70, 210), "purple": (130, 50, 170), "black": (15, 15, 15), "white": (245, 245, 245),
}
# 3x3 grid cells, (row, col) -> the phrase that follows the object in a caption.
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "at the top left", (0, 1): "at the top", (0, 2): "at the top right",
    (1, 0): "on the left", (1, 1): "in the centre", (1, 2): "on the right",
    (2, 0): "at the bottom left", (2, 1): "at the bottom", (2, 2): "at the bottom right",
}
POSITIONS_2X2: dict[tuple[int, int], str] = {
    (0, 0): "at the top left", (0, 1): "at the top right", (1, 0): "at the bottom left", (1, 1): "at the bottom right",
}
POSITIONS_BY_GRID = {3: POSITIONS, 2: POSITIONS_2X2}  # _sample_scene's grid sizes
NUMBER_WORDS = {1: "a", 2: "two", 3: "three"}

CLIP_NOISE_FRACTION = 0.10  # of clip's ok rows: 60% of these partly right, 40% about another image
# valid originals: long side in this range (raised to min_side if needed); at least the top of the demo's
# image chain (16 -> 64 -> 256 px, configs/demo.yaml), so the upsamplers learn from real detail
SIDE_RANGE = (256, 384)
# Near square: ingest pads to a square (resize_mode border), and the bottom of the chain is 16 px, where
# a 2:1 picture would keep 8 rows of content and objects of a pixel.
MAX_VALID_ASPECT = 1.25
BOMB_SIDE = 12_000
ROWS_PER_BAD = 500  # one planted row of each kind (variant) per this many rows, at least one
MIN_SIZE = 100  # below this the ~25 planted rows would crowd out the valid ones


@dataclass(frozen=True)
class BadKind:
    """One kind of planted row and the drop the pipeline must record for it."""

    name: str
    stage: str | None
    reason: str | None  # None: model-dependent, not asserted
    variants: tuple[str, ...] = ("",)
    how: str = ""


BAD_KINDS: tuple[BadKind, ...] = (
    BadKind("dead_link", "ingest", "http_404", how="GET /status/404/... answers 404"),
    BadKind("server_error", "ingest", "http_500", how="GET /status/500/... answers 500, every time"),
    BadKind("corrupt_bytes", "ingest", drops.DECODE_ERROR, how="random bytes in a .jpg (image/jpeg)"),
    BadKind("truncated_image", "ingest", drops.DECODE_ERROR, ("png", "jpeg"), how="an image cut at half length"),
    BadKind("non_image", "ingest", drops.DECODE_ERROR, how="an HTML page (text/html)"),
    BadKind("decompression_bomb", "ingest", drops.PIXEL_CAP, how="a 12000x12000 grey PNG of zeros, ~140 kB"),
    BadKind("oversized_body", "ingest", drops.BODY_TOO_LARGE,
            how="GET /big/...: 2*max_body_bytes streamed chunked, no Content-Length"),
    BadKind("slow_server", "ingest", drops.TIMEOUT, how="GET /slow/...: one byte per interval for 3*timeout_s"),
    BadKind("opt_out", "ingest", drops.OPT_OUT, how="GET /optout/...: a valid image with X-Robots-Tag: noai"),
    BadKind("url_scheme", "ingest", drops.URL_SCHEME, ("ftp", "file"), how="ftp:// and file:// URLs"),
    BadKind("url_private", "ingest", drops.URL_PRIVATE, how="http://10.x / 192.168.x / 172.16.x"),
    BadKind("url_link_local", "ingest", drops.URL_LINK_LOCAL, how="http://169.254.169.254/latest/meta-data/..."),
    BadKind("url_loopback", "ingest", drops.URL_LOOPBACK, how="http://127.0.0.2:<port>/img/..."),
    BadKind("redirect_loopback", "ingest", drops.URL_LOOPBACK, how="302 from the demo server to 127.0.0.2"),
    BadKind("redirect_link_local", "ingest", drops.URL_LINK_LOCAL, how="302 from the demo server to 169.254.169.254"),
    BadKind("tiny_image", "basic_filter", drops.MIN_SIDE, how="a square image of side min(20, min_side - 1)"),
    BadKind("extreme_aspect", "basic_filter", drops.ASPECT_RATIO,
            how="short side max(40, min_side), long side 2*max_aspect_ratio*short + 16"),
    BadKind("empty_caption", "basic_filter", drops.CAPTION_EMPTY, ("empty", "whitespace"), how="'' and ' \\t '"),
    BadKind("long_caption", "basic_filter", drops.CAPTION_TOO_LONG, how="a true caption padded past max_caption_chars"),
    BadKind("duplicate_exact", "basic_filter", drops.DUPLICATE_EXACT,
            how="the bytes of an earlier ok row of the same source, another URL"),
    BadKind("near_duplicate", "semantic_filter", None, ("reencoded", "shifted"),
            how="an earlier ok row re-encoded (JPEG quality) or shifted by a pixel; depends on the CLIP model"),
)
KIND_BY_NAME = {k.name: k for k in BAD_KINDS}
# Valid rows that reach their image through a 302 on 127.0.0.1 (exercise the per-hop policy's "allowed").
OK_REDIRECT = "redirect"

LIST_SCHEMA = pa.schema([("url", pa.string()), ("caption", pa.string()), ("scene_json", pa.string())])
PLAN_SCHEMA = pa.schema([
    ("source", pa.string()), ("file", pa.string()), ("row", pa.int64()), ("url", pa.string()),
    ("caption", pa.string()), ("kind", pa.string()), ("variant", pa.string()),
    ("expected_stage", pa.string()), ("expected_reason", pa.string()),
    ("caption_noise", pa.string()),  # clip only: "none", "partial" or "other_image"
    ("duplicate_of", pa.string()),  # url of the original, for duplicate_exact and near_duplicate
    ("served_path", pa.string()),  # the file under www/ behind the url, if any
])


def rows_per_kind(size: int) -> int:
    return max(1, round(size / ROWS_PER_BAD))


def planted_counts(size: int) -> dict[str, int]:
    """How many rows of each kind (and of the ok-through-redirect variant) a generation of ``size`` plants."""
    n = rows_per_kind(size)
    out = {k.name: max(n, len(k.variants)) for k in BAD_KINDS}
    out["ok:" + OK_REDIRECT] = n
    return out


def expected_drop_counts(size: int) -> dict[tuple[str, str], int]:
    """(stage, reason) -> planted rows, for the kinds whose reason does not depend on a model."""
    out: dict[tuple[str, str], int] = {}
    counts = planted_counts(size)
    for k in BAD_KINDS:
        if k.reason is not None:
            out[(k.stage, k.reason)] = out.get((k.stage, k.reason), 0) + counts[k.name]
    return out


# --------------------------------------------------------------------------------------- scenes

def _contrast_ok(rgb: tuple[int, int, int], bg: tuple[int, int, int]) -> bool:
    return math.dist(rgb, bg) >= 120.0


def _jitter_colour(rng: np.random.Generator, base: tuple[int, int, int]) -> list[int]:
    return [min(255, max(0, c + int(d))) for c, d in zip(base, rng.integers(-14, 15, size=3))]


def _sample_dims(rng: np.random.Generator, min_side: int, max_aspect: float) -> tuple[int, int]:
    lo = max(SIDE_RANGE[0], min_side)
    hi = max(SIDE_RANGE[1], lo)
    long = int(rng.integers(lo, hi + 1))
    ratio = float(rng.uniform(1.0, min(MAX_VALID_ASPECT, max_aspect)))
    short = max(lo, min(long, int(round(long / ratio))))
    while long / short > max_aspect:  # rounding can cross a tight limit by a pixel
        short += 1
    return (long, short) if rng.random() < 0.5 else (short, long)


def _sample_scene(rng: np.random.Generator, width: int, height: int, fmt: str, max_kinds: int = 3,
                  grid: int = 3) -> dict:
    if grid not in POSITIONS_BY_GRID:
        raise ValueError(f"grid {grid}: one of {sorted(POSITIONS_BY_GRID)}")
    positions = POSITIONS_BY_GRID[grid]
    tone = "light" if rng.random() < 0.6 else "dark"
    v = int(rng.integers(200, 241)) if tone == "light" else int(rng.integers(22, 61))
    bg = [min(255, max(0, v + int(t))) for t in rng.integers(-12, 13, size=3)]
    textures = ["plain", "gradient", "noise"] if fmt == "jpeg" else ["plain", "gradient"]
    texture = str(rng.choice(textures))
    n_kinds = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))
    n_kinds = min(n_kinds, max_kinds)
    cells = [divmod(int(c), grid) for c in rng.permutation(grid * grid)[:n_kinds]]
    cells.sort()  # reading order: captions list objects top-left to bottom-right
    cw, ch = width / grid, height / grid
    used: set[tuple[str, str]] = set()
    objects = []
    for (r, c) in cells:
        while True:
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
            rgb = _jitter_colour(rng, COLOURS[colour])
            if (shape, colour) not in used and _contrast_ok(tuple(rgb), tuple(bg)):
                break
        used.add((shape, colour))
        size = "small" if rng.random() < 0.5 else "large"
        count = int(rng.integers(1, 3)) if size == "small" else 1
        # Radius as a fraction of the cell's short side: small 0.20-0.28, large 0.38-0.46, so the two
        # sizes never overlap; k instances sit in k slots along the cell's longer axis. Sized for the
        # bottom of the demo's image chain: at 16 px a cell is about 5 px, a small object 2-3 px across
        # and a large one 4-5 px (smaller ones, a pixel there, left the decoder nothing to draw).
        if size == "small":
            frac = rng.uniform(0.24, 0.28) if count == 1 else rng.uniform(0.20, 0.24)
        else:
            frac = rng.uniform(0.38, 0.46)
        base = min(cw, ch)
        rad = frac * base
        x0, y0 = c * cw, r * ch
        horizontal = cw >= ch
        slot = (cw if horizontal else ch) / count
        insts = []
        for i in range(count):
            sx0, sy0 = (x0 + i * slot, y0) if horizontal else (x0, y0 + i * slot)
            sw, sh = (slot, ch) if horizontal else (cw, slot)
            cx = sx0 + rad + rng.uniform(0, max(sw - 2 * rad, 0))
            cy = sy0 + rad + rng.uniform(0, max(sh - 2 * rad, 0))
            angle = 0.0 if shape == "circle" else rng.uniform(-15, 15)
            insts.append({"x": round(cx, 2), "y": round(cy, 2), "r": round(rad, 2), "angle": round(angle, 2)})
        objects.append({"shape": shape, "colour": colour, "rgb": rgb, "size": size, "count": count,
                        "cell": [r, c], "position": positions[(r, c)], "instances": insts})
    return {"width": width, "height": height, "format": fmt,
            "background": {"tone": tone, "rgb": bg, "texture": texture,
                           "gradient": [int(x) for x in rng.integers(-24, 25, size=2)],
                           "noise_sigma": round(float(rng.uniform(1.5, 4.0)), 2)},
            "objects": objects}


def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)]
    elif shape == "triangle":
        pts = [(0.0, -1.0), (0.87, 0.5), (-0.87, 0.5)]
    elif shape == "diamond":  # taller than wide, so a slightly turned square never reads as one
        pts = [(0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)]
    elif shape == "star":
        pts = []
        for i in range(10):
            a = -math.pi / 2 + i * math.pi / 5
            rr = 1.0 if i % 2 == 0 else 0.45
            pts.append((rr * math.cos(a), rr * math.sin(a)))
    elif shape == "cross":
        w = 0.32
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w),
               (-1, -w), (-w, -w)]
    else:
        raise ValueError(shape)
    a = math.radians(angle)
    ca, sa = math.cos(a), math.sin(a)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def centred_scene(rng: np.random.Generator, radius: float = 0.15) -> dict:
    """A 256 px scene of one object at the centre (``radius``: a fraction of the side), within half a pixel
    at 16 px: the simplest scene, for probing what the decoder can draw (tests/test_unet.py,
    scripts/decoder_shape_oracle.py ``--layout centre``)."""
    scene = _sample_scene(rng, 256, 256, "png", max_kinds=1)
    obj = scene["objects"][0]
    obj.update(size="large", count=1, cell=[1, 1], position=POSITIONS[1, 1])
    obj["instances"] = [{"x": 128 + rng.uniform(-8, 8), "y": 128 + rng.uniform(-8, 8), "r": radius * 256,
                         "angle": 0.0 if obj["shape"] == "circle" else rng.uniform(-15, 15)}]
    return scene


_SS = 2  # supersampling factor: draw at 2x, box-reduce, for anti-aliased edges


def _render(scene: dict, rng: np.random.Generator) -> Image.Image:
    w, h = scene["width"], scene["height"]
    bgs = scene["background"]
    base = np.array(bgs["rgb"], dtype=np.float32)
    if bgs["texture"] == "gradient":
        gx, gy = bgs["gradient"]
        ramp = (np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :] * gx
                + np.linspace(-0.5, 0.5, h, dtype=np.float32)[:, None] * gy)
        arr = base[None, None, :] + ramp[:, :, None]
    else:
        arr = np.broadcast_to(base, (h, w, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB").resize((w * _SS, h * _SS), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    for obj in scene["objects"]:
        fill = tuple(obj["rgb"])
        for it in obj["instances"]:
            cx, cy, r = it["x"] * _SS, it["y"] * _SS, it["r"] * _SS
            if obj["shape"] == "circle":
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
            else:
                draw.polygon(_shape_points(obj["shape"], cx, cy, r, it["angle"]), fill=fill)
    img = img.reduce(_SS)
    if bgs["texture"] == "noise":
        a = np.asarray(img, dtype=np.float32) + rng.normal(0.0, bgs["noise_sigma"], size=(h, w, 3))
        img = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "RGB")
    return img


def _encode(img: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.save(buf, "JPEG", quality=quality)
    else:
        img.save(buf, "PNG", compress_level=6)
    return buf.getvalue()


# ------------------------------------------------------------------------------------- captions

def _dalle_object(obj: dict) -> str:
    n = obj["count"]
    noun = obj["shape"] if n == 1 else PLURAL[obj["shape"]]
    return f"{NUMBER_WORDS[n]} {obj['size']} {obj['colour']} {noun} {obj['position']}"


def _join(parts: list[str], last: str = " and ") -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + last + parts[-1]


def dalle_caption(scene: dict, rng: np.random.Generator) -> str:
    """A clean caption naming every object's count, size, colour, shape and position."""
    objs = _join([_dalle_object(o) for o in scene["objects"]])
    tone = scene["background"]["tone"]
    t = int(rng.integers(4))
    text = [f"{objs}", f"{objs}, on a {tone} background", f"a picture of {objs}",
            f"an image of {objs}, on a {tone} background"][t]
    return text[0].upper() + text[1:] + "."


_CLIP_WRAPS = ("{t}", "{t} clipart", "{t} icon", "{t} - stock illustration", "Abstract geometric shapes: {t}",
               "{t} on {tone} background", "free vector {t}", "{t} | wallpaper", "{T}", "shapes {t}")


def _clip_object(obj: dict, rng: np.random.Generator) -> str:
    n, shape, colour = obj["count"], obj["shape"], obj["colour"]
    t = int(rng.integers(5))
    if t == 0:
        return f"{colour} {shape}"
    if t == 1:
        return f"{n} {colour} {PLURAL[shape] if n > 1 else shape}"
    if t == 2:
        return f"{obj['size']} {colour} {shape}"
    if t == 3:
        return f"{colour} {PLURAL[shape] if n > 1 else shape}"
    return f"{colour} {shape} {obj['position'].split()[-1]}" if rng.random() < 0.3 else f"{colour} {shape}"


def clip_caption(scene: dict, rng: np.random.Generator) -> str:
    """Web alt-text: terse object mentions, varied wrappers, file-name-like noise."""
    parts = [_clip_object(o, rng) for o in scene["objects"]]
    sep = [" and ", ", ", " ", " + "][int(rng.integers(4))]
    t = sep.join(parts)
    u = rng.random()
    if u < 0.2:  # a file name only
        slug = t.replace(" + ", "-").replace(", ", "-").replace(" ", ["-", "_"][int(rng.integers(2))])
        ext = ["jpg", "png", "jpeg", "JPG"][int(rng.integers(4))]
        tail = [f"-{int(rng.integers(100, 2000))}x{int(rng.integers(100, 2000))}", f"_{int(rng.integers(1000))}",
                "_final", ""][int(rng.integers(4))]
        return f"{slug}{tail}.{ext}"
    wrap = _CLIP_WRAPS[int(rng.integers(len(_CLIP_WRAPS)))]
    text = wrap.format(t=t, T=t.title(), tone=scene["background"]["tone"])
    if u < 0.45:
        noise = [f"IMG_{int(rng.integers(10000)):04d}.jpg", f"DSC{int(rng.integers(100000)):05d}",
                 f"image ({int(rng.integers(1, 20))})", f"screenshot-2021-{int(rng.integers(1, 13)):02d}-"
                 f"{int(rng.integers(1, 29)):02d}", f"stock-photo-{int(rng.integers(10**8))}"][int(rng.integers(5))]
        text = f"{noise} {text}" if rng.random() < 0.5 else f"{text} {noise}"
    return text


def _perturbed(scene: dict, rng: np.random.Generator) -> dict:
    """The scene with one object's colour or shape changed: a caption of it is only partly right."""
    s = json.loads(json.dumps(scene))
    obj = s["objects"][int(rng.integers(len(s["objects"])))]
    names = {(o["shape"], o["colour"]) for o in s["objects"]}
    while True:
        if rng.random() < 0.5:
            cand = (obj["shape"], list(COLOURS)[int(rng.integers(len(COLOURS)))])
        else:
            cand = (SHAPES[int(rng.integers(len(SHAPES)))], obj["colour"])
        if cand not in names:
            break
    obj["shape"], obj["colour"] = cand
    return s


def _fit(text: str, limit: int) -> str:
    """Cut at a word boundary to at most ``limit`` characters (web alt-text gets truncated too)."""
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0].rstrip()
    return cut or text[:limit]


def _long_caption(base: str, limit: int, rng: np.random.Generator) -> str:
    filler = ("Geometric shapes in flat colours, rendered for a demo data set.",
              "Keywords: shapes, colours, geometry, abstract, icon, clipart, vector, illustration.",
              "High resolution, royalty free, instant download.")
    text = base
    target = limit + 1 + int(rng.integers(0, 40))
    i = 0
    while len(text) < target:
        text += " " + filler[i % len(filler)]
        i += 1
    text = text[:target]
    return text[:-1] + "." if text[-1].isspace() else text  # still longer than the limit once stripped


# ------------------------------------------------------------------------------------ bad bodies

def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


@functools.lru_cache(maxsize=2)
def _zero_idat(side: int) -> bytes:
    """zlib stream of ``side`` grey rows of zeros, fed row by row (never a side^2 buffer)."""
    comp = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte 0 + one byte per grey pixel
    parts = [comp.compress(row) for _ in range(side)]
    parts.append(comp.flush())
    return b"".join(parts)


def bomb_png(side: int, tag: str) -> bytes:
    """A valid PNG of side x side grey zeros (~140 kB at 12000); ``tag`` goes into a tEXt chunk so no two
    bombs are byte-identical."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"tEXt", b"Comment\x00" + tag.encode())
            + _png_chunk(b"IDAT", _zero_idat(side)) + _png_chunk(b"IEND", b""))


def _html_page(tag: str) -> bytes:
    return (f"<!doctype html>\n<html><head><title>Sign in to continue</title></head>\n"
            f"<body><h1>Sign in</h1><p>You need an account to view this image ({tag}).</p>\n"
            f"<form method=\"post\"><input name=\"user\"><input name=\"password\" type=\"password\"></form>"
            f"</body></html>\n").encode()


# ------------------------------------------------------------------------------------ the plan

@dataclass
class _Slot:
    kind: str = "ok"
    variant: str = ""
    original: int | None = None  # global index (in the source) of the row a duplicate copies
    noise: str = "none"


def _file_sizes(n: int, files: int) -> list[int]:
    return [n // files + (1 if i < n % files else 0) for i in range(files)]


def _plan_sources(size: int, seed: int) -> dict[str, list[_Slot]]:
    """Decide, per source, which global row index holds which planted kind (deterministic in seed)."""
    n_src = {"clip": size - size // 2, "dalle": size // 2}
    counts = planted_counts(size)
    wanted: dict[str, list[tuple[str, str]]] = {s: [] for s in SOURCES}
    names = [k.name for k in BAD_KINDS] + ["ok:" + OK_REDIRECT]
    for ki, name in enumerate(names):
        variants = KIND_BY_NAME[name].variants if name in KIND_BY_NAME else (OK_REDIRECT,)
        for j in range(counts[name]):
            kind = "ok" if name.startswith("ok:") else name
            wanted[SOURCES[(ki + j) % len(SOURCES)]].append((kind, variants[j % len(variants)]))
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7, size]))
    out = {}
    for s in SOURCES:
        n = n_src[s]
        if 3 * len(wanted[s]) > n:
            raise ValueError(f"size={size} is too small for the planted rows; use size >= {MIN_SIZE}")
        slots = [_Slot() for _ in range(n)]
        copies = [w for w in wanted[s] if w[0] in ("duplicate_exact", "near_duplicate")]
        others = [w for w in wanted[s] if w[0] not in ("duplicate_exact", "near_duplicate")]
        # Copies sit in the later half so an ok original can precede them in (file, row) order.
        late = rng.permutation(np.arange(n // 2, n))[: len(copies)]
        for (kind, var), p in zip(copies, late):
            slots[int(p)] = _Slot(kind, var)
        free = [i for i in rng.permutation(n) if slots[int(i)].kind == "ok"]
        for (kind, var), p in zip(others, free):
            slots[int(p)] = _Slot(kind, var)
        used: set[int] = set()
        for p in sorted(int(x) for x in late):
            cands = [i for i in range(p) if slots[i].kind == "ok" and not slots[i].variant and i not in used]
            o = cands[int(rng.integers(len(cands)))]
            used.add(o)
            slots[p].original = o
        if s == "clip":
            _assign_noise(slots, rng, protect=used)
        out[s] = slots
    return out


def _assign_noise(slots: list[_Slot], rng: np.random.Generator, protect: set[int] = frozenset()) -> None:
    ok = [i for i, sl in enumerate(slots) if sl.kind == "ok" and i not in protect]
    k = int(round(CLIP_NOISE_FRACTION * len(ok)))
    pick = rng.permutation(ok)[:k]
    n_partial = int(round(0.6 * k))
    for j, i in enumerate(pick):
        slots[int(i)].noise = "partial" if j < n_partial else "other_image"


# ------------------------------------------------------------------------------------ generation

@dataclass(frozen=True)
class DemoArgs:
    size: int
    seed: int
    base_url: str
    max_body_bytes: int
    timeout_s: float
    min_side: int
    max_aspect_ratio: float
    max_caption_chars: int
    max_image_pixels: int
    files_per_source: int

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class DemoSpec:
    """A finished demo generation: where things are, and what the pipeline should make of them."""

    out_dir: str
    args: DemoArgs
    lists: dict[str, tuple[str, ...]] = field(default_factory=dict)  # source -> URL-list files, sorted

    @property
    def base_url(self) -> str:
        return self.args.base_url

    @property
    def port(self) -> int:
        return int(urlsplit(self.args.base_url).port)

    @property
    def www_dir(self) -> str:
        return os.path.join(self.out_dir, "www")

    @property
    def plan_path(self) -> str:
        return os.path.join(self.out_dir, "plan.parquet")

    def url_list_glob(self, source: str) -> str:
        return os.path.join(self.out_dir, "lists", source, "*.parquet")

    def source_configs(self) -> list[dict]:
        """Entries for ``RunConfig.sources``, in the demo's order (clip, then dalle)."""
        return [{"name": s, "url_list": self.url_list_glob(s), "extra_cols": ["scene_json"],
                 "for_generative": FOR_GENERATIVE[s]} for s in SOURCES]

    def plan(self) -> pa.Table:
        return pq.read_table(self.plan_path)

    def expected_drop_counts(self) -> dict[tuple[str, str], int]:
        """(stage, reason) -> planted rows, read from the plan; model-dependent kinds are left out."""
        t = self.plan().to_pydict()
        out: dict[tuple[str, str], int] = {}
        for st, re_ in zip(t["expected_stage"], t["expected_reason"]):
            if re_ is not None:
                out[(st, re_)] = out.get((st, re_), 0) + 1
        return out

    def server(self, host: str = "127.0.0.1") -> "DemoServer":
        from unclip.data.demo_server import DemoServer

        return DemoServer(self.www_dir, host=host, port=self.port)


def _atomic_write(path: str, data: bytes) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_parquet(path: str, table: pa.Table) -> None:
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd", compression_level=3, version="2.6",
                   data_page_version="1.0", write_statistics=True, use_dictionary=True)
    _atomic_write(path, buf.getvalue().to_pybytes())


def _free_port(host: str = "127.0.0.1") -> int:
    """A port free now, below the kernel's ephemeral range where possible: the port is recorded and
    reused for the life of the out_dir, and an ephemeral one could be held by some client's socket later."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rnd = random.SystemRandom()
    for _ in range(50 if low > 20100 else 0):
        port = rnd.randrange(20000, low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class _Writer:
    """Renders the rows of one URL-list file and writes what the server serves."""

    def __init__(self, out_dir: str, args: DemoArgs):
        self.out = out_dir
        self.a = args
        self.base = args.base_url.rstrip("/")
        self.port = urlsplit(args.base_url).port
        self.bomb_side = self._bomb_side()
        self._made_dirs: set[str] = set()

    def _bomb_side(self) -> int:
        side = BOMB_SIDE
        while side * side <= self.a.max_image_pixels:
            side = int(side * 1.5)
        return side

    def put(self, rel: str, data: bytes) -> None:
        if len(data) >= self.a.max_body_bytes:
            raise ValueError(f"max_body_bytes={self.a.max_body_bytes} is too small for the demo: {rel} is "
                             f"{len(data)} bytes (raise ingest.max_body_bytes to at least 1 MiB)")
        path = os.path.join(self.out, "www", rel)
        d = os.path.dirname(path)
        if d not in self._made_dirs:
            os.makedirs(d, exist_ok=True)
            self._made_dirs.add(d)
        _atomic_write(path, data)

    def scene_for(self, rng: np.random.Generator, source: str, dims: tuple[int, int] | None = None,
                  fmt: str | None = None) -> tuple[dict, str]:
        """A scene whose caption (in the source's style) fits max_caption_chars."""
        w, h = dims or _sample_dims(rng, self.a.min_side, self.a.max_aspect_ratio)
        fmt = fmt or ("jpeg" if rng.random() < 0.7 else "png")
        scene = _sample_scene(rng, w, h, fmt)
        cap = self.caption(scene, source, rng)
        while len(cap) > self.a.max_caption_chars and len(scene["objects"]) > 1:
            scene["objects"].pop()
            cap = self.caption(scene, source, rng)
        if len(cap) > self.a.max_caption_chars:
            raise ValueError(f"max_caption_chars={self.a.max_caption_chars} is too small for the demo's captions")
        return scene, cap

    def caption(self, scene: dict, source: str, rng: np.random.Generator) -> str:
        return dalle_caption(scene, rng) if source == "dalle" else clip_caption(scene, rng)

    def file_rows(self, source: str, file_idx: int, slots: list[_Slot], first: int, n: int,
                  seed_key: list[int], originals: dict[int, tuple[bytes, dict, str]]) -> tuple[list[dict], list[dict]]:
        """Rows ``first .. first+n`` of a source (global indices), as URL-list rows and plan rows."""
        stem = f"part-{file_idx:05d}"
        src_idx = SOURCES.index(source)
        wanted_originals = {s.original for s in slots if s.original is not None}
        lst, plan = [], []
        for row in range(n):
            g = first + row
            sl = slots[g]
            rng = np.random.default_rng(np.random.SeedSequence([*seed_key, src_idx, file_idx, row]))
            tag = f"{source}-{file_idx:05d}-{row:05d}"
            img_rel = f"img/{source}/{stem}/{row:05d}"
            url, served, dup_of = None, None, None
            kind, var = sl.kind, sl.variant
            caption = None

            if kind in ("duplicate_exact", "near_duplicate"):
                data, scene, orig_url = originals[sl.original]
                dup_of = orig_url
                caption = self.caption(scene, source, rng)
                fmt = scene["format"]
                if kind == "near_duplicate":
                    img = Image.open(io.BytesIO(data)).convert("RGB")
                    if var == "shifted":
                        a = np.asarray(img)
                        a = np.concatenate([a[:, :1], a[:, :-1]], axis=1)  # one pixel right, edge repeated
                        img = Image.fromarray(a)
                        data = _encode(img, fmt, scene.get("quality", 90))
                    else:
                        fmt = "jpeg"
                        q = scene.get("quality", 90)
                        data = _encode(img, fmt, q - 25 if q >= 70 else q + 20)
                ext = "jpg" if fmt == "jpeg" else "png"
                served = f"{img_rel}.{ext}"
                self.put(served, data)
                url = f"{self.base}/{served}"
            else:
                dims = None
                if kind == "tiny_image":
                    side = min(20, self.a.min_side - 1)
                    dims = (side, side)
                elif kind == "extreme_aspect":
                    short = max(40, self.a.min_side)
                    long = int(math.ceil(2 * self.a.max_aspect_ratio * short)) + 16
                    dims = (long, short) if rng.random() < 0.5 else (short, long)
                fmt = {"png": "png", "jpeg": "jpeg"}.get(var) if kind == "truncated_image" else None
                scene, caption = self.scene_for(rng, source, dims, fmt)
                fmt = scene["format"]
                if sl.noise == "partial":
                    caption = _fit(self.caption(_perturbed(scene, rng), source, rng), self.a.max_caption_chars)
                elif sl.noise == "other_image":
                    _, caption = self.scene_for(rng, source, (scene["width"], scene["height"]), fmt)
                needs_image = kind in ("ok", "opt_out", "tiny_image", "extreme_aspect", "empty_caption",
                                       "long_caption", "truncated_image")
                data = None
                if needs_image:
                    if fmt == "jpeg":
                        scene["quality"] = int(rng.integers(82, 96))
                    data = _encode(_render(scene, rng), fmt, scene.get("quality", 0))
                ext = "jpg" if fmt == "jpeg" else "png"
                url, served = self._bad_url(kind, var, source, stem, row, img_rel, ext, data, tag)
                if kind == "empty_caption":
                    caption = "" if var == "empty" else " \t "
                elif kind == "long_caption":
                    caption = _long_caption(caption, self.a.max_caption_chars, rng)
                if g in wanted_originals:
                    originals[g] = (data, scene, url)
            k = KIND_BY_NAME.get(kind)
            lst.append({"url": url, "caption": caption, "scene_json": json.dumps(scene, sort_keys=True)})
            plan.append({"source": source, "file": f"{stem}.parquet", "row": row, "url": url, "caption": caption,
                         "kind": kind, "variant": var or None,
                         "expected_stage": k.stage if k else None, "expected_reason": k.reason if k else None,
                         "caption_noise": sl.noise if source == "clip" else None,
                         "duplicate_of": dup_of, "served_path": served})
        return lst, plan

    def _bad_url(self, kind: str, var: str, source: str, stem: str, row: int, img_rel: str, ext: str,
                 data: bytes | None, tag: str) -> tuple[str, str | None]:
        b = self.base
        if kind in ("ok", "tiny_image", "extreme_aspect", "empty_caption", "long_caption"):
            rel = f"{img_rel}.{ext}"
            self.put(rel, data)
            if var == OK_REDIRECT:
                return f"{b}/redirect/{rel}?to={quote(f'{b}/{rel}', safe='')}", rel
            return f"{b}/{rel}", rel
        if kind == "opt_out":
            rel = f"{img_rel}.{ext}"
            self.put(rel, data)
            return f"{b}/optout/{rel}", rel
        if kind == "dead_link":
            return f"{b}/status/404/{img_rel}.jpg", None
        if kind == "server_error":
            return f"{b}/status/500/{img_rel}.jpg", None
        if kind == "corrupt_bytes":
            rel = f"{img_rel}.jpg"
            rng = np.random.default_rng(np.random.SeedSequence([zlib.crc32(tag.encode()), 3]))
            self.put(rel, rng.bytes(int(rng.integers(1000, 8000))))
            return f"{b}/{rel}", rel
        if kind == "truncated_image":
            rel = f"{img_rel}.{ext}"
            self.put(rel, data[: len(data) // 2])
            return f"{b}/{rel}", rel
        if kind == "non_image":
            rel = f"pages/{source}/{stem}/{row:05d}.html"
            self.put(rel, _html_page(tag))
            return f"{b}/{rel}", rel
        if kind == "decompression_bomb":
            rel = f"{img_rel}.png"
            self.put(rel, bomb_png(self.bomb_side, tag))
            return f"{b}/{rel}", rel
        if kind == "oversized_body":
            return f"{b}/big/{img_rel}.jpg?bytes={2 * self.a.max_body_bytes + 4096}", None
        if kind == "slow_server":
            interval = min(0.5, self.a.timeout_s / 5)
            return f"{b}/slow/{img_rel}.jpg?interval={interval:g}&seconds={3 * self.a.timeout_s:g}", None
        if kind == "url_scheme":
            if var == "ftp":
                return f"ftp://127.0.0.1/{img_rel}.jpg", None
            return ("file:///etc/hostname" if row % 2 == 0 else f"file:///tmp/{img_rel}.jpg"), None
        if kind == "url_private":
            host = ("10.23.4.5", "192.168.1.20", "172.16.0.7")[row % 3]
            return f"http://{host}/{img_rel}.jpg", None
        if kind == "url_link_local":
            return f"http://169.254.169.254/latest/meta-data/{tag}", None
        if kind == "url_loopback":
            return f"http://127.0.0.2:{self.port}/{img_rel}.jpg", None
        if kind == "redirect_loopback":
            to = f"http://127.0.0.2:{self.port}/{img_rel}.jpg"
            return f"{b}/redirect/{img_rel}.jpg?to={quote(to, safe='')}", None
        if kind == "redirect_link_local":
            to = f"http://169.254.169.254/latest/meta-data/{tag}"
            return f"{b}/redirect/{img_rel}.jpg?to={quote(to, safe='')}", None
        raise AssertionError(kind)


def _list_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=LIST_SCHEMA)


def _plan_table(rows: list[dict]) -> pa.Table:
    t = pa.Table.from_pylist(rows, schema=PLAN_SCHEMA)
    order = sorted(range(t.num_rows), key=lambda i: (SOURCES.index(rows[i]["source"]), rows[i]["file"], rows[i]["row"]))
    return t.take(pa.array(order, pa.int64()))


def _read_spec(out_dir: str) -> dict | None:
    p = os.path.join(out_dir, "spec.json")
    if not os.path.exists(p):
        return None
    with open(p) as f:
        return json.load(f)


def _write_spec(out_dir: str, spec: dict) -> None:
    _atomic_write(os.path.join(out_dir, "spec.json"), (json.dumps(spec, indent=2, sort_keys=True) + "\n").encode())


def _spec_obj(out_dir: str, raw: dict) -> DemoSpec:
    args = DemoArgs(**raw["args"])
    lists = {}
    for s in SOURCES:
        d = os.path.join(out_dir, "lists", s)
        names = [f for f in os.listdir(d) if f.endswith(".parquet") and not f.startswith(".")]
        lists[s] = tuple(sorted(os.path.join(d, f) for f in names))
    return DemoSpec(out_dir=out_dir, args=args, lists=lists)


def generate_demo(out_dir: str, *, size: int = 2000, seed: int = 0, base_url: str | None = None,
                  max_body_bytes: int, timeout_s: float, min_side: int, max_aspect_ratio: float,
                  max_caption_chars: int, max_image_pixels: int = 64 * 2**20,
                  files_per_source: int = 3) -> DemoSpec:
    """Write the demo's two sources, their planted bad rows, the served files and the plan.

    ``base_url`` is ``http://127.0.0.1:<port>``; None takes the port recorded in ``out_dir/spec.json``
    or, on a first generation, a free one (URLs are part of the URL lists, so the port must not change
    between runs on one ``out_dir``). Idempotent: a complete generation with the same arguments is
    returned untouched; one with different arguments is an error (the pipeline's incremental state
    depends on the URL lists).
    """
    out_dir = os.path.abspath(out_dir)
    if size < MIN_SIZE:
        raise ValueError(f"size={size}: the demo needs at least {MIN_SIZE} rows to plant every bad kind")
    if min_side < 2:
        raise ValueError("min_side must be >= 2 (the planted tiny image is smaller than it)")
    if files_per_source < 1:
        raise ValueError("files_per_source must be >= 1")
    prev = _read_spec(out_dir)
    if base_url is None:
        base_url = prev["args"]["base_url"] if prev else f"http://127.0.0.1:{_free_port()}"
    parts = urlsplit(base_url)
    if parts.scheme != "http" or parts.hostname != "127.0.0.1" or parts.port is None:
        raise ValueError(f"base_url must be http://127.0.0.1:<port>, got {base_url!r}")
    args = DemoArgs(size=size, seed=seed, base_url=base_url.rstrip("/"), max_body_bytes=int(max_body_bytes),
                    timeout_s=float(timeout_s), min_side=int(min_side), max_aspect_ratio=float(max_aspect_ratio),
                    max_caption_chars=int(max_caption_chars), max_image_pixels=int(max_image_pixels),
                    files_per_source=int(files_per_source))
    if prev is not None:
        same = prev.get("version") == SPEC_VERSION and prev["args"] == args.to_json()
        if same and prev.get("complete"):
            return _spec_obj(out_dir, prev)
        if not same and prev.get("complete"):
            diff = {k: (prev["args"].get(k), v) for k, v in args.to_json().items() if prev["args"].get(k) != v}
            raise ValueError(f"{out_dir} holds a demo generated with other arguments (recorded, asked): {diff}; "
                             "use another directory or delete this one")
    # A fresh or interrupted generation: start from an empty tree (everything here is ours).
    for sub in ("lists", "www"):
        shutil.rmtree(os.path.join(out_dir, sub), ignore_errors=True)
    os.makedirs(out_dir, exist_ok=True)
    raw = {"version": SPEC_VERSION, "args": args.to_json(), "complete": False, "extra_lists": []}
    _write_spec(out_dir, raw)

    writer = _Writer(out_dir, args)
    slots_by_src = _plan_sources(size, seed)
    plan_rows: list[dict] = []
    for s in SOURCES:
        slots = slots_by_src[s]
        d = os.path.join(out_dir, "lists", s)
        os.makedirs(d, exist_ok=True)
        originals: dict[int, tuple[bytes, dict, str]] = {}
        first = 0
        for fi, n in enumerate(_file_sizes(len(slots), files_per_source)):
            lst, plan = writer.file_rows(s, fi, slots, first, n, [seed, 0], originals)
            _write_parquet(os.path.join(d, f"part-{fi:05d}.parquet"), _list_table(lst))
            plan_rows += plan
            first += n
    _write_parquet(os.path.join(out_dir, "plan.parquet"), _plan_table(plan_rows))
    raw["complete"] = True
    _write_spec(out_dir, raw)
    return _spec_obj(out_dir, raw)


def generate_demo_for_config(out_dir: str, cfg: "RunConfig", *, size: int = 2000, seed: int = 0,
                             base_url: str | None = None, files_per_source: int = 3) -> DemoSpec:
    """``generate_demo`` with the caps and thresholds taken from a run configuration."""
    return generate_demo(out_dir, size=size, seed=seed, base_url=base_url,
                         max_body_bytes=cfg.ingest.max_body_bytes, timeout_s=cfg.ingest.timeout_s,
                         min_side=cfg.basic_filter.min_side, max_aspect_ratio=cfg.basic_filter.max_aspect_ratio,
                         max_caption_chars=cfg.basic_filter.max_caption_chars,
                         max_image_pixels=cfg.ingest.max_image_pixels, files_per_source=files_per_source)


def load_demo(out_dir: str) -> DemoSpec:
    """The spec of a complete generation in ``out_dir``."""
    out_dir = os.path.abspath(out_dir)
    raw = _read_spec(out_dir)
    if raw is None or not raw.get("complete"):
        raise FileNotFoundError(f"no complete demo generation in {out_dir}")
    return _spec_obj(out_dir, raw)


def add_demo_list(out_dir: str, source: str, n: int, seed: int = 0) -> str:
    """Write ONE more URL-list file of ``n`` new valid rows for ``source`` (the next part number) and
    return its path; the existing lists are left untouched. Each call adds a file: it simulates a new
    URL list landing. Rows depend on (the generation's seed, ``seed``, the part number)."""
    spec = load_demo(out_dir)
    if source not in SOURCES:
        raise ValueError(f"unknown demo source {source!r}; choose one of {SOURCES}")
    if n < 1:
        raise ValueError("n must be >= 1")
    raw = _read_spec(spec.out_dir)
    d = os.path.join(spec.out_dir, "lists", source)
    fi = max([int(Path(p).stem.split("-")[1]) for p in spec.lists[source]], default=-1) + 1
    slots = [_Slot() for _ in range(n)]
    if source == "clip":
        _assign_noise(slots, np.random.default_rng(np.random.SeedSequence([spec.args.seed, 8, seed, fi])))
    writer = _Writer(spec.out_dir, spec.args)
    lst, plan = writer.file_rows(source, fi, slots, 0, n, [spec.args.seed, 1, seed], {})
    old = pq.read_table(spec.plan_path).to_pylist()
    fname = f"part-{fi:05d}.parquet"
    old = [r for r in old if not (r["source"] == source and r["file"] == fname)]
    _write_parquet(spec.plan_path, _plan_table(old + plan))
    path = os.path.join(d, fname)
    _write_parquet(path, _list_table(lst))
    raw["extra_lists"].append({"source": source, "file": fname, "n": n, "seed": seed})
    _write_spec(spec.out_dir, raw)
    return path


__all__ = [
    "BAD_KINDS", "BadKind", "DemoArgs", "DemoSpec", "SOURCES", "FOR_GENERATIVE", "add_demo_list",
    "centred_scene", "clip_caption", "dalle_caption", "expected_drop_counts", "generate_demo",
    "generate_demo_for_config", "load_demo", "planted_counts", "rows_per_kind",
]


# ------------------------------------------------------------------------------ ground truth judge
def semantic_filter_truth(plan: pa.Table, reached: pa.Table, dropped_rows: pa.Table) -> dict[str, float | None]:
    """Precision and recall of the semantic filter's two drops against what the generator planted.

    ``plan`` is the demo's plan (url, source, kind, caption_noise); ``reached`` the rows that entered
    the semantic filter (url); ``dropped_rows`` its drop records (url, reason). The CLIP-score filter should
    drop the clip-source rows whose caption describes another image (``caption_noise: other_image``;
    ``partial`` ones, one object changed, are reported apart: a fair CLIP may keep them); the
    near-duplicate filter should drop the planted near duplicates (re-encoded or shifted copies).
    Recall is over the planted rows that reached the filter.
    """
    truth = {u: (k, n) for u, k, n in zip(plan.column("url").to_pylist(), plan.column("kind").to_pylist(),
                                            plan.column("caption_noise").to_pylist())}
    reached_urls = set(reached.column("url").to_pylist())
    by_reason: dict[str, set[str]] = {}
    for url, reason in zip(dropped_rows.column("url").to_pylist(), dropped_rows.column("reason").to_pylist()):
        by_reason.setdefault(reason, set()).add(url)
    out: dict[str, float] = {}
    for reason, wanted in ((drops.CLIP_SCORE, lambda k, n: n == "other_image"),
                           (drops.NEAR_DUPLICATE, lambda k, n: k == "near_duplicate")):
        planted = {u for u in reached_urls if u in truth and wanted(*truth[u])}
        dropped = by_reason.get(reason, set())
        hit = len(planted & dropped)
        out[f"{reason}_planted"] = len(planted)
        out[f"{reason}_dropped"] = len(dropped)
        out[f"{reason}_precision"] = hit / len(dropped) if dropped else None
        out[f"{reason}_recall"] = hit / len(planted) if planted else None
    partial = {u for u in reached_urls if u in truth and truth[u][1] == "partial"}
    out["clip_score_partial_dropped_fraction"] = (len(partial & by_reason.get(drops.CLIP_SCORE, set()))
                                                  / len(partial) if partial else None)
    return out
