"""CLIP training (stage ``clip``; unCLIP section 2 and stage 3 of the pipeline) with open_clip.

open_clip supplies the model (``create_model_and_transforms``: the architecture as data, its own
train and eval preprocessing), the tokenizer and the contrastive loss (``ClipLoss``, gathering
features over processes with gradients, so N processes train exactly as one on the N-fold batch).
The training rows are the split's pairs of every source, each sample drawn from the sources with
equal probability whatever their sizes (``train.clip.source_weights`` to change it); the realised mix
is counted and recorded. The shared trainer does the rest.

After training, rank 0 evaluates the EMA weights on the held-out split (the same shard-hash split
``retrain`` uses) and writes the release folder: ``<arch>.json`` (open_clip's model-config format)
and ``open_clip_model.safetensors``, which plain open_clip loads::

    open_clip.add_model_config(folder / f"{arch}.json")
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=folder / "open_clip_model.safetensors")

Run under torchrun by ``retrain`` (``python -m unclip.train.clip --context C.json``), or in-process
through ``train_clip``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from unclip import storage
from unclip.config import ClipTrainConfig
from unclip.data import clip as clip_data
from unclip.data import pairs
from unclip.data.retrieval import RecallCounter
from unclip.train import distributed
from unclip.train.trainer import Trainer, TrainResult

WEIGHTS_FILE = "open_clip_model.safetensors"


class ClipTask:
    """The ``clip`` training task for the shared trainer."""

    name = "clip"

    def __init__(self, cfg: ClipTrainConfig, train_files: pa.Table, eval_files: pa.Table | None = None) -> None:
        self.cfg = cfg
        self.train_files, self.eval_files = train_files, eval_files
        self.counts: dict[str, int] = {}
        self.positions: dict[int, int] = {}
        self.consumed = 0
        self.preprocess_train = self.preprocess_val = self.tokenizer = None
        self.image_side: int | None = None  # the model's input side: JPEGs are decoded at the scale nearest above
        self.loss_fn: nn.Module | None = None

    def model_config(self) -> dict:
        import open_clip

        clip_data.register_project_configs()
        return {"arch": self.cfg.arch, "open_clip": open_clip.get_model_config(self.cfg.arch)}

    @staticmethod
    def fsdp_blocks(model: nn.Module) -> list[nn.Module]:
        """The units FSDP shards one at a time in an open_clip model: every residual block of both
        towers (transformer blocks, ModifiedResNet's bottlenecks, the blocks of a timm trunk's stages),
        disjoint; embeddings, stems, pools and projections form the root unit. For the paper's ViT-H/16
        they hold 94.5% of the parameters (tests/test_clip.py)."""
        from open_clip.modified_resnet import Bottleneck
        from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock

        blocks = [m for m in model.modules() if isinstance(m, (ResidualAttentionBlock, CustomResidualAttentionBlock,
                                                               Bottleneck))]
        trunk = getattr(getattr(model, "visual", None), "trunk", None)  # a timm image tower
        for name in ("blocks", "stages", "layer1", "layer2", "layer3", "layer4"):
            seq = getattr(trunk, name, None)
            if isinstance(seq, (nn.Sequential, nn.ModuleList)):
                blocks.extend(seq)
        return blocks

    def build_model(self, model_config: dict) -> nn.Module:
        import open_clip

        clip_data.register_project_configs()
        pretrained = {"random": None, "pretrained": self.cfg.pretrained,
                      "checkpoint": self.cfg.checkpoint}[self.cfg.init]
        if pretrained and self.cfg.init == "checkpoint":
            pretrained = clip_data._local_checkpoint(pretrained)
        with clip_data._quiet_root_logger():
            model, self.preprocess_train, self.preprocess_val = open_clip.create_model_and_transforms(
                model_config["arch"], pretrained=pretrained)
        self.tokenizer = open_clip.get_tokenizer(model_config["arch"])
        side = model.visual.image_size
        self.image_side = int(side[0] if isinstance(side, (tuple, list)) else side)
        return model

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out recall and zero-shot accuracy (the trainer calls it every ``eval_every`` steps)."""
        if self.eval_files is None or not self.eval_files.num_rows:
            return {}
        device = next(model.parameters()).device
        return evaluate(model, self.preprocess_val, self.tokenizer, self.eval_files, device=device,
                        max_pairs=self.cfg.eval_pairs)

    def batches(self, micro_batch: int, start: int, ctx: distributed.DistContext) -> Iterator[dict]:
        import open_clip

        self.loss_fn = open_clip.ClipLoss(local_loss=False, gather_with_grad=True, rank=ctx.rank,
                                          world_size=ctx.world_size)
        workers = self.cfg.num_workers
        data = pairs.TrainPairs(self.train_files, preprocess=self.preprocess_train, tokenizer=self.tokenizer,
                                batch_size=micro_batch, rank=ctx.rank, world_size=ctx.world_size,
                                num_workers=workers, seed=self.cfg.seed, shuffle_buffer=self.cfg.shuffle_buffer,
                                source_weights=self.cfg.source_weights, positions=self.positions,
                                rotation=self.consumed % max(1, workers), decode_min_side=self.image_side)
        for batch in pairs.train_loader(data, workers):
            self.positions[batch["worker"]] = batch["position"]
            self.consumed += 1
            yield batch

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        device = next(model.parameters()).device
        out = model(batch["image"].to(device, non_blocking=True), batch["text"].to(device, non_blocking=True))
        image_features, text_features, logit_scale = out[:3]
        loss = self.loss_fn(image_features, text_features, logit_scale)
        for s in batch["source"]:
            self.counts[s] = self.counts.get(s, 0) + 1
        return loss, {"logit_scale": float(logit_scale.detach())}

    def after_step(self, model: nn.Module) -> None:
        """Bound the learned temperature as CLIP does: ``logit_scale`` (a log) in [0, ln 100], so the
        logits are scaled by at most 100 (unbounded, it grows until the loss's softmax saturates)."""
        model.logit_scale.clamp_(0, math.log(100))

    def state_dict(self) -> dict:
        return {"counts": dict(self.counts), "positions": dict(self.positions), "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.counts = dict(state["counts"])
        self.positions = {int(k): v for k, v in state["positions"].items()}
        self.consumed = int(state["consumed"])


# -- evaluation -------------------------------------------------------------------------------------
@torch.inference_mode()
def evaluate(model: nn.Module, preprocess, tokenizer, eval_files: pa.Table, *, batch_size: int = 256,
             device: torch.device | str = "cpu", max_pairs: int | None = None) -> dict[str, float]:
    """Held-out recall in galleries of 1,000 and, where the tars carry the demo's ``scene_json``,
    zero-shot colour and shape accuracy against the generator's ground truth (with chance levels) and
    ``probe_colour_auc`` / ``probe_shape_auc``: whether the image embeddings hold the colours and shapes
    at all, whatever the text tower makes of them (``judge.probe_auc``, a cross-validated linear probe
    on the held-out embeddings; chance 0.5), on the first ``max_pairs`` held-out pairs (all when None)."""
    from unclip.data import demo_source
    from unclip.train import judge

    model = model.eval().to(device)
    recall = RecallCounter()
    prompts = [(c, s) for c in demo_source.COLOURS for s in demo_source.SHAPES]
    prompt_emb = model.encode_text(tokenizer([f"a {c} {s}" for c, s in prompts]).to(device), normalize=True).float()
    zs = {"colour": 0, "shape": 0, "colour_chance": 0.0, "shape_chance": 0.0, "n": 0}
    probe_x, probe_labels = [], []
    for batch in torch.utils.data.DataLoader(pairs.HeldOutPairs(eval_files, preprocess=preprocess, tokenizer=tokenizer,
                                                                batch_size=batch_size, max_pairs=max_pairs),
                                             batch_size=None, num_workers=0):
        img = model.encode_image(batch["image"].to(device), normalize=True).float()
        txt = model.encode_text(batch["text"].to(device), normalize=True).float()
        recall.add(img.cpu().numpy(), txt.cpu().numpy())
        top = (img @ prompt_emb.T).argmax(dim=1).tolist()
        for i, (t, meta) in enumerate(zip(top, batch["meta"])):
            scene = meta.get("scene_json")
            if not scene:
                continue
            probe_x.append(img[i].cpu())
            scene = json.loads(scene) if isinstance(scene, str) else scene
            objects = scene["objects"]
            probe_labels.append(judge.scene_labels(scene))
            colours, shapes = {o["colour"] for o in objects}, {o["shape"] for o in objects}
            zs["colour"] += prompts[t][0] in colours
            zs["shape"] += prompts[t][1] in shapes
            zs["colour_chance"] += len(colours) / len(demo_source.COLOURS)
            zs["shape_chance"] += len(shapes) / len(demo_source.SHAPES)
            zs["n"] += 1
    out = recall.result()
    if zs["n"]:
        out.update(zeroshot_colour_acc=zs["colour"] / zs["n"], zeroshot_colour_chance=zs["colour_chance"] / zs["n"],
                   zeroshot_shape_acc=zs["shape"] / zs["n"], zeroshot_shape_chance=zs["shape_chance"] / zs["n"],
                   zeroshot_images=zs["n"])
        x = torch.stack(probe_x)
        colours, shapes = (torch.from_numpy(np.stack(k)) for k in zip(*probe_labels))
        out.update(probe_colour_auc=judge.probe_auc(x, colours), probe_shape_auc=judge.probe_auc(x, shapes))
    return out


# -- release ----------------------------------------------------------------------------------------
def write_release(model: nn.Module, model_config: dict, folder: str) -> dict:
    """The folder plain open_clip loads: ``<arch>.json`` and ``open_clip_model.safetensors``."""
    from safetensors.torch import save

    arch = model_config["arch"]
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    data = save(state, metadata={"arch": arch, "format": "open_clip"})
    weights_uri = storage.write_bytes(storage.join(folder, WEIGHTS_FILE), data)
    storage.write_json(storage.join(folder, f"{arch}.json"), model_config["open_clip"])
    return {"uri": folder, "weights": weights_uri, "arch": arch, "weights_sha256": hashlib.sha256(data).hexdigest(),
            "parameters": sum(v.numel() for v in state.values())}


@dataclass
class ClipRun:
    result: TrainResult
    release: dict
    metrics: dict[str, Any]


def train_clip(cfg: ClipTrainConfig, train_files: pa.Table, eval_files: pa.Table, out_dir: str, *,
               lineage: dict | None = None, strategy: str = "ddp", ctx: distributed.DistContext | None = None,
               on_progress=None) -> ClipRun | None:
    """Train, then (rank 0) evaluate the released weights and write the release folder."""
    task = ClipTask(cfg, train_files, eval_files)
    trainer = Trainer(task, cfg, out_dir, lineage=lineage, strategy=strategy, ctx=ctx, on_progress=on_progress)
    result = trainer.run()
    if not trainer.main:
        return None
    model, model_config, found = trainer.released(result)
    metrics: dict[str, Any] = dict(found)
    seen = sum(task.counts.values())
    metrics.update({f"mix/{s}": n / seen for s, n in sorted(task.counts.items())} if seen else {})
    metrics.update(steps=result.step, samples_seen=seen)
    release = write_release(model, model_config, storage.join(out_dir, "model"))
    storage.write_json(storage.join(out_dir, "metrics.json"), metrics)
    return ClipRun(result, release, metrics)


def main() -> None:
    """``torchrun ... -m unclip.train.clip --run-dir D --stage clip --context C.json``: writes
    ``D/clip/result.json`` ({"outputs", "metrics", "model"}) from rank 0."""
    distributed.stage_main("clip", "Train CLIP (stage clip) under torchrun.", _from_context)


def _from_context(config, context: dict, out: str, dist: distributed.DistContext) -> dict | None:
    done = train_clip(config.train.clip, storage.read_parquet(context["train_files"]),
                      storage.read_parquet(context["eval_files"]), out, lineage=context.get("lineage"),
                      strategy=config.train.launch.strategy, ctx=dist)
    if done is None:
        return None
    return {"outputs": {"model": done.release["uri"], "checkpoint": done.result.checkpoint,
                        "tensorboard": storage.join(out, "tensorboard")},
            "metrics": done.metrics, "model": {"kind": "clip", **done.release, "resumed_from": done.result.resumed_from}}


if __name__ == "__main__":
    main()
