"""Can the demo's decoder draw shapes when its conditioning names them? An oracle that needs no pipeline run.

The demo's generated images show the captioned colours but not the shapes, and its CLIP embedding
holds little shape (docs/training.md, "Where shape is lost"). This asks the other half of the
question: given an embedding that does hold the shapes, does the 16 px decoder draw them within the
demo's steps? It renders fresh demo scenes (``unclip.data.demo_source``, 256 px, the decoder's side
by ``image.DecoderPreprocess``) and trains the ``tiny`` decoder (``train.decoder``'s schedule: AdamW,
linear warm-up and cosine, EMA through ``AveragedModel``, 10% of the embeddings zeroed) with, in
place of the CLIP image embedding, the scene's own labels as a unit vector (``--cond``):

- ``oracle``: per 3x3 cell, the one-hot colour and one-hot shape of its object (zero when empty);
- ``colour``: per cell the colour only, which is about what the demo's CLIP embedding carries.

Captions are dropped always unless ``--captions`` (then at ``text_drop``, as in training). Every
``--eval-every`` steps it samples the held-out scenes (DDIM, guidance on the embedding) with the EMA
weights and judges them with an attribute judge trained on other real renders (``judge.train_judge``),
as ``eval_generation`` judges its images (brought up to the judge's 64 px), next to the real scenes
at the decoder's side. ``--grid 2`` lays the scenes out on 2 x 2 cells (objects 1.5 times larger),
``--snr-shift`` scales every step's signal-to-noise ratio, ``--image-size`` sets the decoder's side,
``--width`` the UNet's base width, ``--res-blocks`` its blocks a level, ``--t-dist lognormal`` draws
training timesteps at EDM's noise levels; ``--eval-train`` also judges samples of training scenes, and
the last evaluation is split into scenes with only large objects and scenes with a small one.
``--layout`` simplifies the scenes (data, held-out scenes and judge alike) to ask what makes shapes
hard: ``cell``, one large object in a random cell; ``centre``, one object of ``--radius`` at the centre.
docs/training.md ("The decoder does not draw shapes even when its embedding names them") has the numbers.

    .venv/bin/python scripts/decoder_shape_oracle.py --cond oracle [--steps 1400] [--eval-every 700]
        [--captions] [--grid 2] [--snr-shift 16] [--image-size 32] [--width 64] [--res-blocks 2]
        [--t-dist lognormal] [--lr 4e-3] [--eval-train] [--out grid.png] [--save ema.safetensors]
        [--layout cell | --layout centre --radius 0.4]
    .venv/bin/python scripts/decoder_shape_oracle.py --load ema.safetensors [--sampler ddpm] [--eta 1]
        [--sample-steps 250] [--guidance 1]    # the same scenes and judge; only the sampling differs
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.optim.swa_utils import AveragedModel
from torchvision.utils import save_image

from unclip.config import DecoderTrainConfig
from unclip.data import demo_source as ds
from unclip.models import unet
from unclip.models.diffusion import GaussianDiffusion, guided
from unclip.models.prior import trim_tokens
from unclip.train import image, judge, trainer


def render(n: int, rng: np.random.Generator, grid: int = 3, layout: str = "demo",
           radius: float = 0.15) -> tuple[list[dict], list]:
    """``n`` demo scenes and their 256 px renders. ``layout``: ``demo`` as the demo source draws them;
    ``cell``, one large object in a random cell; ``centre``, one object of ``radius`` (a fraction of
    the side) at the centre, within half a pixel at 16 px."""
    scenes, images = [], []
    for _ in range(n):
        if layout == "centre":  # main() allows it with the 3 x 3 grid only
            scene = ds.centred_scene(rng, radius)
        else:
            scene = ds._sample_scene(rng, 256, 256, "png", max_kinds=3 if layout == "demo" else 1, grid=grid)
        while layout == "cell" and scene["objects"][0]["size"] != "large":
            scene = ds._sample_scene(rng, 256, 256, "png", max_kinds=1, grid=grid)
        scenes.append(scene)
        images.append(ds._render(scene, rng))
    return scenes, images


def condition(scenes: list[dict], kind: str) -> torch.Tensor:
    """Unit vectors [N, 9 * (colours + shapes)] of the scenes' labels per cell (``kind`` as in --cond)."""
    colours, shapes = list(ds.COLOURS), ds.SHAPES
    per = len(colours) + len(shapes)
    out = torch.zeros(len(scenes), 9 * per)
    for i, scene in enumerate(scenes):
        for obj in scene["objects"]:
            r, c = obj["cell"]
            base = (3 * r + c) * per
            out[i, base + colours.index(obj["colour"])] = 1.0
            if kind == "oracle":
                out[i, base + len(colours) + shapes.index(obj["shape"])] = 1.0
    return out / out.norm(dim=1, keepdim=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cond", choices=("oracle", "colour"), default="oracle")
    ap.add_argument("--captions", action="store_true", help="condition on the dalle captions too")
    ap.add_argument("--grid", type=int, choices=sorted(ds.POSITIONS_BY_GRID), default=3,
                    help="objects on a grid x grid layout (the demo's: 3)")
    ap.add_argument("--layout", choices=("demo", "cell", "centre"), default="demo",
                    help="the demo's scenes; one large object in a random cell; one object at the centre")
    ap.add_argument("--radius", type=float, default=0.15, help="--layout centre: the object's radius over the side")
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1400)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--pairs", type=int, default=1000)
    ap.add_argument("--heldout", type=int, default=128)
    ap.add_argument("--eval-every", type=int, default=700)
    ap.add_argument("--width", type=int, default=0, help="the UNet's base width (0: the tiny decoder's 32)")
    ap.add_argument("--res-blocks", type=int, default=0, help="residual blocks a level (0: the tiny decoder's 1)")
    ap.add_argument("--t-dist", choices=("uniform", "lognormal"), default="uniform",
                    help="training timesteps: uniform, or log-SNR ~ N(2.4, 2.4) (EDM's noise levels)")
    ap.add_argument("--eval-train", action="store_true", help="also sample and judge 128 training scenes")
    ap.add_argument("--snr-shift", type=float, default=1.0, help="multiply the schedule's SNR (16: the cosine moved "
                    "from 64 px to 16 px as simple diffusion moves it)")
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--sample-steps", type=int, default=25)
    ap.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    ap.add_argument("--eta", type=float, default=0.0, help="DDIM's eta (0: deterministic, 1: DDPM's variance)")
    ap.add_argument("--save", help="write the EMA decoder's weights here (safetensors) after training")
    ap.add_argument("--load", help="skip training: sample and judge the EMA weights saved by --save")
    ap.add_argument("--out", help="a PNG of real and generated held-out images")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.layout == "centre" and args.grid != 3:
        ap.error("--layout centre needs --grid 3 (a 2 x 2 grid has no centre cell)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    import open_clip

    rng = np.random.default_rng(args.seed)
    scenes, pics = render(args.pairs, rng, args.grid, args.layout, args.radius)
    scenes_t, pics_t = render(args.heldout, rng, args.grid, args.layout, args.radius)
    pre = image.DecoderPreprocess(args.image_size)
    x, xt = torch.stack([pre(p) for p in pics]), torch.stack([pre(p) for p in pics_t])
    z, zt = condition(scenes, args.cond), condition(scenes_t, args.cond)
    caps = [ds.dalle_caption(s, rng) for s in scenes]
    caps_t = [ds.dalle_caption(s, rng) for s in scenes_t]
    tokens, tokens_t = open_clip.tokenize(caps), open_clip.tokenize(caps_t)

    # the judge: trained on other real renders at its own side, as eval_generation's
    judge_scenes, judge_pics = render(800, rng, args.grid, args.layout, args.radius)
    jx = torch.stack([image.DecoderPreprocess(judge.JUDGE_SIZE)(p) for p in judge_pics])
    labels = [judge.scene_labels(s) for s in judge_scenes]
    jd = judge.train_judge(jx, torch.from_numpy(np.stack([c for c, _ in labels])),
                           torch.from_numpy(np.stack([s for _, s in labels])), seed=args.seed)

    def judged(name: str, imgs: torch.Tensor, captions: list[str] = caps_t) -> None:
        m = judge.attribute_accuracy(jd, judge.enlarge(imgs, (judge.JUDGE_SIZE, judge.JUDGE_SIZE)), captions)
        print(f"{name}: colour_acc {m['colour_acc']:.3f} (chance {m['colour_acc_chance']:.3f}) "
              f"shape_acc {m['shape_acc']:.3f} (chance {m['shape_acc_chance']:.3f}) "
              f"colour_auc {m['colour_auc']:.3f} shape_auc {m['shape_auc']:.3f}", flush=True)

    judged(f"real at {args.image_size} px", xt)
    cfg = unet.FLAVOURS["tiny"]["decoder"]
    cfg = dataclasses.replace(cfg, image_size=args.image_size, embed_dim=z.shape[1],
                              model_channels=args.width or cfg.model_channels,
                              num_res_blocks=args.res_blocks or cfg.num_res_blocks)
    model = unet.Decoder(cfg)
    diffusion = model.diffusion()
    if args.snr_shift != 1.0:  # every step's signal-to-noise ratio times the shift (simple diffusion's, for small images)
        snr = diffusion.alphas_cumprod / (1 - diffusion.alphas_cumprod) * args.snr_shift
        ab = snr / (1 + snr)
        diffusion = GaussianDiffusion(1 - ab / torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]]),
                                      target=diffusion.target, clip_x0=True)
    logsnr = (diffusion.alphas_cumprod / (1 - diffusion.alphas_cumprod)).log()  # decreasing in t
    sched = DecoderTrainConfig(steps=args.steps, lr=args.lr, warmup_steps=min(50, args.steps), batch_size=args.batch_size,
                               ema_decay=0.995)
    ema = AveragedModel(model, multi_avg_fn=trainer.ema_avg_fn(sched.ema_decay), use_buffers=True)
    opt = torch.optim.AdamW(trainer.param_groups(model, sched.weight_decay), lr=args.lr, betas=sched.betas)
    g = torch.Generator().manual_seed(args.seed)
    ones = torch.ones(len(xt), dtype=torch.bool)
    held = {"tokens": trim_tokens(tokens_t), "image_emb": zt, "drop_text": ~ones if args.captions else ones,
            "drop_image": ~ones}

    train_kw = {"tokens": trim_tokens(tokens[:len(xt)]), "image_emb": z[:len(xt)], "drop_text": held["drop_text"],
                "drop_image": ~ones}

    @torch.no_grad()
    def sample(net: torch.nn.Module, kwargs: dict = held) -> torch.Tensor:
        fn = guided(net, args.guidance, uncond_kwargs={"drop_text": ones, "drop_image": ones})
        return diffusion.respaced(args.sample_steps).sample(
            fn, xt.shape, model_kwargs=kwargs, generator=torch.Generator().manual_seed(args.seed),
            sampler=args.sampler, eta=args.eta).clamp(-1, 1)

    print(f"decoder {unet.count_parameters(model) / 1e6:.2f}M, {args.image_size} px, cond {args.cond}"
          f"{' + captions' if args.captions else ''}, {args.steps} steps of {args.batch_size}", flush=True)
    t0 = time.time()
    if args.load:  # the same data, judge and held-out noise: only the sampling differs
        ema.module.load_state_dict(load_file(args.load))
        samples = sample(ema.module.eval())
        judged(f"decoder from {args.load}, {args.sampler} {args.sample_steps} steps eta {args.eta} "
               f"guidance {args.guidance}", samples)
    model.train()
    for step in range(0 if args.load else args.steps):
        for group in opt.param_groups:
            group["lr"] = trainer.lr_at(step, sched)
        idx = torch.randint(0, args.pairs, (args.batch_size,), generator=g)
        n = len(idx)
        drop_text = torch.rand(n) < cfg.text_drop if args.captions else torch.ones(n, dtype=torch.bool)
        kwargs = {"tokens": trim_tokens(tokens[idx]), "image_emb": z[idx], "drop_text": drop_text,
                  "drop_image": torch.rand(n) < cfg.image_drop}
        if args.t_dist == "lognormal":  # the step whose log-SNR is nearest a draw of N(2.4, 2.4)
            lam = 2.4 + 2.4 * torch.randn(n, generator=g, dtype=torch.float64)
            t = torch.searchsorted(-logsnr, -lam).clamp(max=diffusion.num_steps - 1)
        else:
            t = diffusion.sample_timesteps(n)
        loss = diffusion.training_loss(model, x[idx], t, model_kwargs=kwargs).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update_parameters(model)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            print(f"step {step + 1} loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
            samples = sample(ema.module.eval())
            judged(f"decoder at step {step + 1}", samples)
            if args.eval_train:
                judged(f"decoder at step {step + 1}, training scenes", sample(ema.module, train_kw), caps[:len(xt)])
            model.train()
    if args.save:
        save_file({k: v.detach().contiguous().clone() for k, v in ema.module.state_dict().items()}, args.save)
    large = [i for i, sc in enumerate(scenes_t) if all(o["size"] == "large" for o in sc["objects"])]
    for name, keep in (("only large objects", large), ("a small object", sorted(set(range(len(xt))) - set(large)))):
        if not keep:
            continue
        judged(f"real, {len(keep)} scenes with {name}", xt[keep], [caps_t[i] for i in keep])
        judged(f"decoder, {len(keep)} scenes with {name}", samples[keep], [caps_t[i] for i in keep])
    if args.out:  # the first 16 held-out scenes, real above generated, at 4x
        big = judge.enlarge(torch.cat([xt[:16], samples[:16]]), (4 * args.image_size,) * 2)
        save_image(big * 0.5 + 0.5, args.out, nrow=16, padding=2)

    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
