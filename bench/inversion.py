"""How well DDIM inversion of the released decoder gives an image back, by guidance and steps: the
error behind ``generate.INVERSION_GUIDANCE`` (docs/training.md, "Generation").

    python bench/inversion.py --workdir work/demo [--images 16] [--steps 25,100]
                              [--guidance 1/5,5/5,2/2,1/1] [--run RUN_ID]

For each of the last ``--images`` images of the demo's generative sources that were served as they
are (``kind`` ok in the demo's plan), at the decoder's side: its CLIP image embedding z_i and its
caption (and, as a last row, no caption: the null text), the noise x_T that deterministic DDIM
inversion finds at the first guidance of each pair, then DDIM at eta 0 from x_T at the second; prints
the MSE against the image per pair (mean, median, max and how many are above 0.05) and the mean's
ratio to the first pair's (the reference: before the fix, 1/5 inverted unguided and decoded guided).
A measurement of quality, not of time; needs a finished ``make demo`` (or any workdir whose released
decoder was trained on the demo source).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image

from unclip import catalog, storage
from unclip import generate as gen
from unclip.config import load_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="work/demo")
    ap.add_argument("--run", default=None, help="the decoder of this training run (default: the latest)")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--steps", default="25,100", help="DDIM steps, comma-separated")
    ap.add_argument("--guidance", default="1/5,5/5,2/2,1/1", help="inversion/decoding guidance pairs")
    args = ap.parse_args()

    workdir = Path(args.workdir)
    where = catalog.locate(storage.absolute(str(workdir)))[0]
    stack = gen.Stack.load(where, run_id=args.run, kinds=("decoder",))
    plan = pq.read_table(workdir / "demo" / "plan.parquet").to_pandas()
    config = load_config(workdir / "demo" / "config.yaml", variables={"workdir": str(workdir)})
    generative = [s.name for s in config.sources if s.for_generative]
    rows = plan[plan.source.isin(generative) & (plan.kind == "ok")].tail(args.images)
    side = stack.size("decoder")
    pairs = [tuple(float(v) for v in p.split("/")) for p in args.guidance.split(",")]
    print(f"decoder {stack.versions.get('decoder')}, {len(rows)} images of {generative} at {side} px")
    for steps in (int(s) for s in args.steps.split(",")):
        process = stack.models["decoder"].diffusion().respaced(steps)
        errors: dict[str, list[float]] = {}
        for path, caption in zip(rows.served_path, rows.caption):
            image = gen.from_pil(Image.open(workdir / "demo" / "www" / path), 256)
            z = stack.image_embedding(image[None])
            x0 = F.interpolate(image[None], size=(side, side), mode="bicubic", antialias=True,
                               align_corners=False).clamp(-1, 1)
            cases = [(f"{a:g}/{b:g}", caption, a, b) for a, b in pairs] + [("1/1 no caption", "", 1.0, 1.0)]
            for name, text, g_inv, g_dec in cases:
                tokens, _ = stack.text([text])
                with torch.no_grad():
                    fn, kw = stack._decoder_fn(tokens, z, g_inv)
                    x_t = process.ddim_invert(fn, x0, model_kwargs=kw)
                    fn, kw = stack._decoder_fn(tokens, z, g_dec)
                    x = process.sample(fn, x0.shape, noise=x_t, model_kwargs=kw, sampler="ddim", eta=0.0)
                errors.setdefault(name, []).append(float((x - x0).pow(2).mean()))
        reference = None
        for name, values in errors.items():
            v = torch.tensor(values)
            reference = reference or float(v.mean())
            print(f"steps {steps:4d}  guidance {name:15s} MSE mean {v.mean():.4f} median {v.median():.4f} "
                  f"max {v.max():.4f} above 0.05: {int((v > 0.05).sum())}  mean / reference "
                  f"{float(v.mean()) / reference:.3f}")


if __name__ == "__main__":
    main()
