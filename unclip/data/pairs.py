"""The image-caption rows of a dataset version, streamed from its webdataset shards for training.

A release (or the basic filter's index, when CLIP trains inside the data pipeline) lists per shard its
``source``, ``tar`` and ``kept`` Parquet (the kept rows' ``key`` and ``caption``, and for a release
their embeddings). ``TrainPairs`` turns such a table into an endless, seeded stream of training
samples in open_clip's style, as a visible chain of named stages per source::

    shard list -> epoch-seeded shard shuffle -> split by node and worker -> open through fsspec
      -> tar to samples -> keep the rows the table lists -> sample shuffle buffer

then mixes the sources with the configured probabilities (equal by default, whatever their sizes:
the paper's 50/50 mix of "CLIP data" and "DALL-E data"), and only then decodes (a bad sample is
logged and skipped) and preprocesses, with augmentation seeded per sample.

Exact resume: every batch carries the position of the raw (undecoded) mixed stream it ends at and the
logical worker that made it. A resumed stream replays the raw stream up to that position without
decoding, and the workers are rotated so the batch after the last one consumed comes first. The cost
of a resume is reading (not decoding) the samples already trained on, once per worker.

``HeldOutPairs`` is the evaluation reader: one deterministic pass over a table of shards (no mixing,
no augmentation), with each sample's tar metadata (``json``), e.g. the demo's ``scene_json``.
"""

from __future__ import annotations

import json
import logging
import random
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import torch
import webdataset as wds
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_expander

from unclip import storage

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".png", ".webp")
# a stream that only fails is broken, not noisy: stop instead of reading it forever
MAX_FAILURES_IN_A_ROW = 1000


def skip_and_log(exn: Exception) -> bool:
    log.warning("skipping a sample that failed to load: %r", exn)
    return True


def open_shards(src: Iterator[dict]) -> Iterator[dict]:
    """webdataset's url_opener, through fsspec so that s3:// shards read like local ones."""
    for sample in src:
        fs, p = storage.fs_and_path(sample["url"])
        with fs.open(p, "rb") as stream:
            sample["stream"] = stream
            yield sample


def tar_samples(streams: Iterator[dict], with_json: bool = False) -> Iterator[dict]:
    """Samples (``__key__``, ``__url__``, image bytes[, json bytes]) of opened tar streams; the
    caption comes from the kept table, so the tar's .txt members are not read."""
    exts = IMAGE_EXTS + ((".json",) if with_json else ())
    files = tar_file_expander(streams, handler=skip_and_log, select_files=lambda f: f.endswith(exts))
    return group_by_keys(files, handler=skip_and_log)


def kept_rows(files: pa.Table) -> dict[str, dict[str, str]]:
    """tar URI -> {key: caption} of every shard in ``files`` (columns ``tar``, ``kept``)."""
    out = {}
    for tar, kept in zip(files.column("tar").to_pylist(), files.column("kept").to_pylist()):
        t = storage.read_parquet(kept, columns=["key", "caption"])
        out[tar] = dict(zip(t.column("key").to_pylist(), t.column("caption").to_pylist()))
    return out


def _image(sample: dict) -> Image.Image:
    for ext in ("jpg", "png", "webp"):
        if ext in sample:
            return sample[ext]
    raise ValueError(f"sample {sample.get('__key__')} has no image")


def _stable_seed(*parts: Any) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


class TrainPairs(torch.utils.data.IterableDataset):
    """An endless stream of micro-batches ``{"image", "text", "source", "key", "worker", "position"}``
    for one rank, mixed from the sources in ``files`` (columns ``source``, ``tar``, ``kept``).

    ``positions`` maps a logical worker to the raw-stream position to resume after; ``rotation`` is
    how many batches this rank consumed modulo the number of workers (who goes first).
    """

    def __init__(self, files: pa.Table, *, preprocess: Callable, tokenizer: Callable, batch_size: int,
                 rank: int, world_size: int, num_workers: int, seed: int, shuffle_buffer: int,
                 source_weights: dict[str, float] | None = None, positions: dict[int, int] | None = None,
                 rotation: int = 0) -> None:
        super().__init__()
        self.keep = kept_rows(files)
        by_source: dict[str, list[str]] = {}
        for source, tar in zip(files.column("source").to_pylist(), files.column("tar").to_pylist()):
            if self.keep[tar]:
                by_source.setdefault(source, []).append(tar)
        weights = source_weights or {s: 1.0 for s in by_source}
        unknown = sorted(set(weights) - set(by_source))
        if unknown:
            raise ValueError(f"source_weights names sources with no training rows: {unknown} "
                             f"(have {sorted(by_source)})")
        self.sources = sorted(s for s in by_source if weights.get(s, 0.0) > 0)
        if not self.sources:
            raise ValueError("no source with training rows and a positive weight")
        total = sum(weights[s] for s in self.sources)
        self.probs = [weights[s] / total for s in self.sources]
        self.shards = {s: sorted(by_source[s]) for s in self.sources}
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers, self.seed, self.shuffle_buffer = max(1, num_workers), seed, shuffle_buffer
        self.positions = dict(positions or {})
        self.rotation = rotation

    # -- the raw, undecoded stream of one source for one (rank, logical worker) slot ----------------
    def _source_stream(self, source: str, slot: int, slots: int) -> Iterator[dict]:
        shards = self.shards[source]
        epoch = 0
        while True:
            order = np.random.default_rng(_stable_seed(self.seed, source, epoch)).permutation(len(shards))
            ordered = [shards[i] for i in order]
            if len(ordered) >= slots:  # split by node and worker at the shard level
                mine, every = ordered[slot::slots], 1
            else:  # fewer shards than readers: every reader takes every shard, one sample in `slots`
                mine, every = ordered, slots
            samples = tar_samples(open_shards({"url": u} for u in mine))
            n = 0
            for sample in samples:
                if sample["__key__"] not in self.keep[sample["__url__"]]:
                    continue
                if every > 1 and n % every != slot:
                    n += 1
                    continue
                n += 1
                sample["__source__"] = source
                yield sample
            epoch += 1

    def _shuffled(self, stream: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        buf: list[dict] = []
        for sample in stream:
            buf.append(sample)
            if len(buf) >= self.shuffle_buffer:
                i = rng.randrange(len(buf))
                buf[i], buf[-1] = buf[-1], buf[i]
                yield buf.pop()

    def raw_stream(self, logical_worker: int) -> Iterator[dict]:
        """The mixed, undecoded samples of one logical worker of this rank, in order."""
        slots = self.world_size * self.num_workers
        slot = self.rank * self.num_workers + logical_worker
        streams = [self._shuffled(self._source_stream(s, slot, slots),
                                  random.Random(_stable_seed(self.seed, "buffer", s, slot)))
                   for s in self.sources]
        pick = random.Random(_stable_seed(self.seed, "mix", slot))
        idx = list(range(len(self.sources)))
        while True:
            yield next(streams[pick.choices(idx, self.probs)[0]])

    def _to_tensors(self, sample: dict, position: int) -> dict:
        caption = self.keep[sample["__url__"]][sample["__key__"]]
        # augmentation seeded per sample: a replayed (skipped) sample leaves no trace in any RNG
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed also queues CUDA seeding, which records a
            # stack trace per call on a CUDA build (1.5 ms a sample here, measured)
            torch.default_generator.manual_seed(_stable_seed(self.seed, "aug", sample["__url__"], sample["__key__"],
                                                             position))
            image = self.preprocess(_image(sample))
        return {"image": image, "caption": caption, "source": sample["__source__"],
                "key": sample["__key__"]}

    def _batches(self, logical_worker: int) -> Iterator[dict]:
        raw = self.raw_stream(logical_worker)
        position = self.positions.get(logical_worker, 0)
        for _ in range(position):  # replay without decoding
            next(raw)
        decode = wds.decode("pilrgb", handler=skip_and_log)
        out: list[dict] = []
        failed = 0
        while True:
            sample = next(raw)
            position += 1
            try:
                decoded = next(iter(decode([sample])), None)
                if decoded is None:
                    raise ValueError(f"sample {sample['__key__']} of {sample['__url__']} did not decode")
                out.append(self._to_tensors(decoded, position))
                failed = 0
            except Exception as exn:  # noqa: BLE001 - a bad sample is logged and skipped
                skip_and_log(exn)
                failed += 1
                if failed >= MAX_FAILURES_IN_A_ROW:
                    raise RuntimeError(f"{failed} samples in a row failed to decode (last: {exn!r}); "
                                       "the shards or the preprocessing are broken") from exn
                continue
            if len(out) == self.batch_size:
                # one tokenizer call a batch: open_clip's per-call overhead was 0.9 ms a caption
                yield {"image": torch.stack([s["image"] for s in out]),
                       "text": self.tokenizer([s["caption"] for s in out]),
                       "source": [s["source"] for s in out], "key": [s["key"] for s in out],
                       "worker": logical_worker, "position": position}
                out = []

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        # rotated: the first batch of a resumed loader comes from the worker whose turn it was
        return self._batches((worker + self.rotation) % self.num_workers)


def train_loader(dataset: TrainPairs, num_workers: int) -> torch.utils.data.DataLoader:
    """Batches in round-robin worker order (DataLoader's in-order default)."""
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                       persistent_workers=False, prefetch_factor=4 if num_workers else None)


class HeldOutPairs(torch.utils.data.IterableDataset):
    """One pass over ``files``' kept rows in shard order, preprocessed for evaluation:
    ``{"image", "text", "key", "source", "meta"}`` batches (``meta``: the tar's json per sample)."""

    def __init__(self, files: pa.Table, *, preprocess: Callable, tokenizer: Callable, batch_size: int) -> None:
        super().__init__()
        self.keep = kept_rows(files)
        self.source = dict(zip(files.column("tar").to_pylist(), files.column("source").to_pylist()))
        self.preprocess, self.tokenizer, self.batch_size = preprocess, tokenizer, batch_size

    def _wanted(self, sample: dict) -> bool:
        return sample["__key__"] in self.keep[sample["__url__"]]

    def _to_tensors(self, sample: dict) -> dict:
        meta = sample.get("json")
        return {"image": self.preprocess(_image(sample)),
                "text": self.tokenizer([self.keep[sample["__url__"]][sample["__key__"]]])[0],
                "key": sample["__key__"], "source": self.source[sample["__url__"]],
                "meta": json.loads(meta) if isinstance(meta, (bytes, str)) else (meta or {})}

    def __iter__(self) -> Iterator[dict]:
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(sorted(t for t, k in self.keep.items() if k)),
            wds.split_by_worker,
            open_shards,
            lambda s: tar_samples(s, with_json=True),
            wds.select(self._wanted),
            wds.decode("pilrgb", handler=skip_and_log),
            wds.map(self._to_tensors, handler=skip_and_log),
            wds.batched(self.batch_size, collation_fn=_collate, partial=True),
        )
        return iter(pipeline)


def _collate(samples: list[dict]) -> dict:
    return {"image": torch.stack([s["image"] for s in samples]), "text": torch.stack([s["text"] for s in samples]),
            "key": [s["key"] for s in samples], "source": [s["source"] for s in samples],
            "meta": [s["meta"] for s in samples]}
