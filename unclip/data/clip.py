"""CLIP embeddings of the shards (stage 4) with open_clip.

The model is chosen by config: an open_clip architecture (the project registers its own, see
``unclip.models.clip_configs``) plus one weight source: an open_clip pretrained tag, a local
checkpoint, or a seeded random initialisation (the demo's default until the CLIP training stage
exists). ``create_model_and_transforms`` supplies the matching preprocessing; nothing here hard-codes
CLIP's mean and std.

The data path is a webdataset pipeline of named stages, in the style of open_clip's training data:
shard list -> split by worker -> open through fsspec -> tar to samples -> keep the basic filter's
survivors -> decode (a bad sample is logged and skipped) -> preprocess and tokenize -> batch. Decoding
runs in DataLoader worker processes; the model runs in inference mode on the main process.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os

import numpy as np
import torch
import webdataset as wds

from unclip import storage
from unclip.config import ClipModelConfig, EmbedConfig
from unclip.data import pairs
from unclip.models import CLIP_CONFIG_DIR

log = logging.getLogger(__name__)

def register_project_configs() -> None:
    """Register the project's architectures (``unclip.models.clip_configs``) with open_clip, once;
    every one of them is checked, since a released model's json may have registered one alone."""
    import open_clip

    known = set(open_clip.list_models())
    if any(p.stem not in known for p in CLIP_CONFIG_DIR.glob("*.json")):
        open_clip.add_model_config(CLIP_CONFIG_DIR)


def known_architectures() -> list[str]:
    import open_clip

    register_project_configs()
    return open_clip.list_models()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _local_checkpoint(uri: str) -> str:
    if storage.is_local(uri):
        return storage.fs_and_path(uri)[1]
    import fsspec

    # remote checkpoints are cached on local disk once per machine
    return fsspec.open_local(f"filecache::{uri}", filecache={"cache_storage": os.path.expanduser("~/.cache/unclip")})


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


@functools.lru_cache(maxsize=2)
def _load_cached(model_json: str, device: str):
    import open_clip

    cfg = ClipModelConfig.model_validate_json(model_json)
    register_project_configs()
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
        pretrained = None
    elif cfg.checkpoint is not None:
        pretrained = _local_checkpoint(cfg.checkpoint)
    else:
        pretrained = cfg.pretrained
    with _quiet_root_logger():  # open_clip warns "no pretrained weights" on every random init
        model, _, preprocess = open_clip.create_model_and_transforms(cfg.arch, pretrained=pretrained, device=device)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(cfg.arch)


def load_clip(cfg: ClipModelConfig, device: torch.device | str = "cpu"):
    """(model in eval mode, preprocess, tokenizer), cached per process."""
    return _load_cached(cfg.model_dump_json(), str(device))


class EmbeddingInputs:
    """Callable stages of the pipeline, kept picklable for DataLoader workers."""

    def __init__(self, keep: dict[str, dict[str, str]], preprocess, tokenizer) -> None:
        self.keep = keep  # tar url -> {key: caption}
        self.preprocess = preprocess
        self.tokenizer = tokenizer

    def wanted(self, sample: dict) -> bool:
        return sample["__key__"] in self.keep[sample["__url__"]]

    def to_tensors(self, sample: dict) -> dict:
        caption = self.keep[sample["__url__"]][sample["__key__"]]
        image = sample.get("jpg") or sample.get("png") or sample.get("webp")
        return {
            "__url__": sample["__url__"],
            "__key__": sample["__key__"],
            "image": self.preprocess(image),
            "text": self.tokenizer([caption])[0],
        }


def embedding_pipeline(keep: dict[str, dict[str, str]], preprocess, tokenizer, batch_size: int) -> wds.DataPipeline:
    stages = EmbeddingInputs(keep, preprocess, tokenizer)
    return wds.DataPipeline(
        wds.SimpleShardList(sorted(keep)),
        wds.split_by_worker,
        pairs.open_shards,
        pairs.tar_samples,
        wds.select(stages.wanted),
        wds.decode("pilrgb", handler=pairs.skip_and_log),
        wds.map(stages.to_tensors, handler=pairs.skip_and_log),
        wds.batched(batch_size, collation_fn=_collate, partial=True),
    )


def _collate(samples: list[dict]) -> dict:
    return {
        "__url__": [s["__url__"] for s in samples],
        "__key__": [s["__key__"] for s in samples],
        "image": torch.stack([s["image"] for s in samples]),
        "text": torch.stack([s["text"] for s in samples]),
    }


def make_loader(keep: dict[str, dict[str, str]], preprocess, tokenizer, cfg: EmbedConfig) -> wds.WebLoader:
    pipeline = embedding_pipeline(keep, preprocess, tokenizer, cfg.batch_size)
    workers = min(cfg.num_workers, len(keep))
    return wds.WebLoader(pipeline, batch_size=None, num_workers=workers,
                         persistent_workers=False, prefetch_factor=4 if workers else None)


@torch.inference_mode()
def encode_batch(model, images: torch.Tensor, texts: torch.Tensor, device: torch.device
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """L2-normalised image and text embeddings [B, D] (float32) and their cosine [B]."""
    images = images.to(device, non_blocking=True)
    texts = texts.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        img = model.encode_image(images, normalize=True)
        txt = model.encode_text(texts, normalize=True)
    img, txt = img.float(), txt.float()
    score = (img * txt).sum(-1)
    return img.cpu().numpy(), txt.cpu().numpy(), score.cpu().numpy()
