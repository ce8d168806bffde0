"""The image-caption rows of a dataset version, streamed from its webdataset shards for training.

A release (or the basic filter's index, when CLIP trains inside the data pipeline) lists per shard its
``source``, ``tar`` and ``kept`` Parquet (the kept rows' ``key`` and ``caption``, and for a release
their embeddings). ``TrainPairs`` turns such a table into an endless, seeded stream of training
samples in open_clip's style, per source::

    shard list -> epoch-seeded shard shuffle -> split by node and worker -> plan (shard, n-th kept
      sample; from the row counts) -> open through fsspec -> tar to samples (webdataset's expander
      and grouper) -> keep the rows the table lists (caption from the kept Parquet) -> shuffle buffer

then mixes the sources with the configured probabilities (equal by default, whatever their sizes:
the paper's 50/50 mix of "CLIP data" and "DALL-E data"), and only then decodes (a bad sample is
logged and skipped) and preprocesses, with augmentation seeded per sample.

Exact resume: every batch carries the position of the raw (undecoded) mixed stream it ends at and the
logical worker that made it. A source's stream is planned from the kept-row counts before any shard
is read, and the shuffle buffers and the mix run on the plan, so a resumed stream replays its
position without I/O (RNG calls only), reads back the samples its shuffle buffers held and continues
in the current shard; the workers are rotated so the batch after the last one consumed comes first.
Shards already trained on are not opened again, whatever the size of the dataset.

``HeldOutPairs`` is the evaluation reader: one deterministic pass over a table of shards (no mixing,
no augmentation), with each sample's tar metadata (``json``), e.g. the demo's ``scene_json``.
"""

from __future__ import annotations

import io
import itertools
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


def image_decoder(min_side: int | None = None):
    """webdataset's decode stage for the image members, as PIL RGB. With ``min_side``, a JPEG is
    decoded at the smallest of libjpeg's 1/2, 1/4, 1/8 scales that keeps both sides at least
    ``min_side`` (PIL's draft mode: the scaling happens in the DCT, before most of the decoding work),
    for a model that resizes the image below that anyway: the demo's 256 px shards feed CLIP at 64 px
    and the decoder at 16 px."""
    if min_side is None:
        return wds.decode("pilrgb", handler=skip_and_log)

    def jpeg(key: str, data: bytes):
        if not key.lower().endswith((".jpg", ".jpeg")):
            return None
        img = Image.open(io.BytesIO(data))
        img.draft("RGB", (min_side, min_side))
        return img.convert("RGB")

    return wds.decode(jpeg, "pilrgb", handler=skip_and_log)


def _stable_seed(*parts: Any) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


class TrainPairs(torch.utils.data.IterableDataset):
    """An endless stream of micro-batches ``{"image", "text", "source", "key", "worker", "position"}``
    for one rank, mixed from the sources in ``files`` (columns ``source``, ``tar``, ``kept``).

    ``preprocess`` maps a PIL image to a tensor, or to a dict of tensors (an upsampler's crop and its
    low-res version), stacked key by key; without a ``tokenizer`` there is no ``text``; each column
    named in ``embeddings`` (stored in the kept Parquet) comes as a float32 [B, D] tensor of its name;
    ``decode_min_side``: JPEGs decoded at reduced scale (``image_decoder``).

    ``positions`` maps a logical worker to the raw-stream position to resume after; ``rotation`` is
    how many batches this rank consumed modulo the number of workers (who goes first).
    """

    def __init__(self, files: pa.Table, *, preprocess: Callable, tokenizer: Callable | None, batch_size: int,
                 rank: int, world_size: int, num_workers: int, seed: int, shuffle_buffer: int,
                 source_weights: dict[str, float] | None = None, positions: dict[int, int] | None = None,
                 rotation: int = 0, embeddings: tuple[str, ...] = (), decode_min_side: int | None = None) -> None:
        super().__init__()
        # per shard its kept Parquet and row count; captions (and the ``embeddings`` columns asked
        # for, e.g. the decoder's image_emb) are read shard by shard as the stream reaches it (memory
        # follows the shard count, not the row count)
        self.shard_files = ShardFiles(files, embeddings=embeddings)
        by_source: dict[str, list[str]] = {}
        for source, tar in zip(files.column("source").to_pylist(), files.column("tar").to_pylist()):
            if self.shard_files.rows[tar]:
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
        self.decode_min_side = decode_min_side  # see image_decoder

    # -- the raw, undecoded stream of one (rank, logical worker) slot ------------------------------------
    # Planned, then read: a source's stream is first a plan of (epoch, tar, n-th kept sample of that
    # tar) entries, made from the kept-row counts alone, with no I/O. The shuffle buffers and the
    # source mix run on plan entries, so a resumed stream replays its position on the plan (RNG calls,
    # microseconds a sample), then reads only what it still needs: the samples sitting in the shuffle
    # buffers and the rest of the current shard. Shards already trained on are never opened again.
    def _source_plan(self, source: str, slot: int, slots: int) -> Iterator[tuple[int, str, int]]:
        shards = self.shards[source]
        epoch = 0
        while True:
            order = np.random.default_rng(_stable_seed(self.seed, source, epoch)).permutation(len(shards))
            ordered = [shards[i] for i in order]
            if len(ordered) >= slots:  # split by node and worker at the shard level
                mine, every = ordered[slot::slots], 1
            else:  # fewer shards than readers: every reader takes every shard, one sample in `slots`
                mine, every = ordered, slots
            n = 0
            for tar in mine:
                kept = self.shard_files.rows[tar]
                first = (slot - n) % every  # this slot's first sample of the shard, then every `every`
                yield from ((epoch, tar, i) for i in range(first, kept, every))
                n += kept
            epoch += 1

    @staticmethod
    def _shuffle_step(plan: Iterator, buf: list, rng: random.Random, size: int):
        """One draw from a shuffle buffer of ``size`` fed by ``plan`` (open_clip's ``_shuffle``)."""
        buf.append(next(plan))
        while len(buf) < size:
            buf.append(next(plan))
        i = rng.randrange(len(buf))
        buf[i], buf[-1] = buf[-1], buf[i]
        return buf.pop()

    def raw_stream(self, logical_worker: int, position: int = 0) -> Iterator[dict]:
        """The mixed, undecoded samples of one logical worker of this rank, after its first ``position``."""
        slots = self.world_size * self.num_workers
        slot = self.rank * self.num_workers + logical_worker
        plans = [self._source_plan(s, slot, slots) for s in self.sources]
        rngs = [random.Random(_stable_seed(self.seed, "buffer", s, slot)) for s in self.sources]
        bufs: list[list] = [[] for _ in self.sources]
        pick = random.Random(_stable_seed(self.seed, "mix", slot))
        idx = list(range(len(self.sources)))
        size = max(1, self.shuffle_buffer)
        for _ in range(position):  # replay on the plan: no I/O
            j = pick.choices(idx, self.probs)[0]
            self._shuffle_step(plans[j], bufs[j], rngs[j], size)
        # what the buffers hold is read back (a few recent shards); the plans continue from here
        held = _read_entries([e for b in bufs for e in b], self.shard_files)
        bufs = [[held[e] for e in b] for b in bufs]
        readers = [_PlanReader(plan, self.shard_files) for plan in plans]
        while True:
            j = pick.choices(idx, self.probs)[0]
            sample = self._shuffle_step(readers[j], bufs[j], rngs[j], size)
            sample["__source__"] = self.sources[j]
            yield sample

    def _to_tensors(self, sample: dict, position: int) -> dict:
        caption = sample["__caption__"]
        # augmentation seeded per sample: a replayed (skipped) sample leaves no trace in any RNG
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed also queues CUDA seeding, which records a
            # stack trace per call on a CUDA build (1.5 ms a sample here, measured)
            torch.default_generator.manual_seed(_stable_seed(self.seed, "aug", sample["__url__"], sample["__key__"],
                                                             position))
            image = self.preprocess(_image(sample))
        return {"image": image, "caption": caption, "source": sample["__source__"],
                "key": sample["__key__"], **sample.get("__embeddings__", {})}

    def _batches(self, logical_worker: int) -> Iterator[dict]:
        position = self.positions.get(logical_worker, 0)
        raw = self.raw_stream(logical_worker, position)
        decode = image_decoder(self.decode_min_side)
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
                yield self._collate(out, logical_worker, position)
                out = []

    def _collate(self, out: list[dict], logical_worker: int, position: int) -> dict:
        first = out[0]["image"]
        batch = {"image": {k: torch.stack([s["image"][k] for s in out]) for k in first} if isinstance(first, dict)
                 else torch.stack([s["image"] for s in out]),
                 "source": [s["source"] for s in out], "key": [s["key"] for s in out],
                 "worker": logical_worker, "position": position}
        if self.tokenizer is not None:
            # one tokenizer call a batch: open_clip's per-call overhead was 0.9 ms a caption
            batch["text"] = self.tokenizer([s["caption"] for s in out])
        for name in self.shard_files.embeddings:
            batch[name] = torch.from_numpy(np.stack([s[name] for s in out]))
        return batch

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        # rotated: the first batch of a resumed loader comes from the worker whose turn it was
        return self._batches((worker + self.rotation) % self.num_workers)


class ShardFiles:
    """Per shard (tar URI): its kept Parquet and kept-row count, from a release's file table, and the
    embedding columns of the kept Parquet that samples carry (``embeddings``)."""

    def __init__(self, files: pa.Table, embeddings: tuple[str, ...] = ()) -> None:
        tars = files.column("tar").to_pylist()
        self.kept = dict(zip(tars, files.column("kept").to_pylist()))
        self.rows = dict(zip(tars, (int(r) for r in files.column("rows").to_pylist())))
        self.embeddings = tuple(embeddings)

    def samples(self, tar: str, with_json: bool = False) -> Iterator[dict]:
        """The shard's kept samples in tar order, each with its ``__caption__`` (and
        ``__embeddings__``: {column: float32 [D]} joined by key; ``json``: the tar's metadata)."""
        from unclip.data.embeddings import to_numpy

        t = storage.read_parquet(self.kept[tar], columns=["key", "caption", *self.embeddings])
        row = {k: i for i, k in enumerate(t.column("key").to_pylist())}
        captions = t.column("caption").to_pylist()
        vectors = {name: to_numpy(t.column(name)) for name in self.embeddings}
        for sample in tar_samples(open_shards(iter([{"url": tar}])), with_json=with_json):
            i = row.get(sample["__key__"])
            if i is not None:
                sample["__caption__"] = captions[i]
                if vectors:
                    sample["__embeddings__"] = {name: v[i] for name, v in vectors.items()}
                yield sample


class _PlanReader:
    """Iterator of the samples a source plan names, reading each shard front to back once."""

    def __init__(self, plan: Iterator[tuple[int, str, int]], shard_files: ShardFiles) -> None:
        self.plan, self.shard_files = plan, shard_files
        self.tar, self.samples, self.at = None, iter(()), -1
        self.broken: set[str] = set()

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while True:
            _, tar, n = next(self.plan)
            if tar in self.broken:
                continue
            if tar != self.tar or n <= self.at:  # the next shard (or the same one in a new epoch)
                self.tar, self.samples, self.at = tar, self.shard_files.samples(tar), -1
            for sample in self.samples:
                self.at += 1
                if self.at == n:
                    return sample
            # the shard holds fewer kept samples than its table lists (a truncated tar): skip it from now on
            log.warning("shard %s ended before its kept sample %d of %d; skipping it", tar, n,
                        self.shard_files.rows[tar])
            self.broken.add(tar)


def _read_entries(entries: list[tuple[int, str, int]], shard_files: ShardFiles) -> dict[tuple, dict]:
    """The samples named by plan entries, reading each shard they touch once (up to the last one)."""
    wanted: dict[str, set[int]] = {}
    for _, tar, n in entries:
        wanted.setdefault(tar, set()).add(n)
    found: dict[tuple[str, int], dict] = {}
    for tar, ns in wanted.items():
        last = max(ns)
        for n, sample in enumerate(shard_files.samples(tar)):
            if n in ns:
                found[(tar, n)] = sample
            if n >= last:
                break
    missing = [(t, n) for _, t, n in entries if (t, n) not in found]
    if missing:
        raise RuntimeError(f"resuming the training stream: {len(missing)} buffered samples are no longer in their "
                           f"shards (first: {missing[0]})")
    # a sample may sit in a buffer twice (two epochs of one shard): each entry gets its own dict
    return {e: dict(found[(e[1], e[2])]) for e in entries}


def train_loader(dataset: TrainPairs, num_workers: int) -> torch.utils.data.DataLoader:
    """Batches in round-robin worker order (DataLoader's in-order default). The loader draws its base
    seed from its own generator, not torch's global one: a stage whose loss draws from the global
    generator (the image models' noise) must see the same draws when resumed, and the loader starts
    at a different step then."""
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                       persistent_workers=False, prefetch_factor=4 if num_workers else None,
                                       generator=torch.Generator().manual_seed(dataset.seed))


class HeldOutPairs(torch.utils.data.IterableDataset):
    """One pass over ``files``' kept rows in shard order, preprocessed for evaluation:
    ``{"image", "text", "key", "source", "meta"}`` batches (``meta``: the tar's json per sample)."""

    def __init__(self, files: pa.Table, *, preprocess: Callable, tokenizer: Callable, batch_size: int,
                 max_pairs: int | None = None) -> None:
        super().__init__()
        self.max_pairs = max_pairs  # None: every kept row; else the first ones, in shard order
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
            lambda samples: itertools.islice(samples, self.max_pairs),  # stops reading shards there
            wds.batched(self.batch_size, collation_fn=_collate, partial=True),
        )
        return iter(pipeline)


def _collate(samples: list[dict]) -> dict:
    return {"image": torch.stack([s["image"] for s in samples]), "text": torch.stack([s["text"] for s in samples]),
            "key": [s["key"] for s in samples], "source": [s["source"] for s in samples],
            "meta": [s["meta"] for s in samples]}


def held_out_images(files: pa.Table, max_images: int, preprocess: Callable, *,
                    embeddings: tuple[str, ...] = ()) -> dict[str, Any]:
    """The first ``max_images`` kept samples of ``files`` (shards in name order), decoded and
    ``preprocess``ed, for evaluation: ``{"image": [n, ...] tensor (or a dict of them, as the
    preprocessing gives), "caption": [str], "key": [str],
    "meta": [dict] (the tar's json, e.g. the demo's scene_json), <embedding column>: float32 [n, D]}``.
    Reads no shard past the one that completes the count; a sample that fails to decode is logged and
    skipped."""
    shard_files = ShardFiles(files, embeddings=embeddings)
    out: dict[str, list] = {"image": [], "caption": [], "key": [], "meta": [], **{e: [] for e in embeddings}}
    for tar in sorted(t for t, n in shard_files.rows.items() if n):
        for sample in shard_files.samples(tar, with_json=True):
            if len(out["image"]) >= max_images:
                break
            try:
                decoded = next(iter(wds.decode("pilrgb")([sample])))
                image = preprocess(_image(decoded))
            except Exception as exn:  # noqa: BLE001 - a bad sample is logged and skipped
                skip_and_log(exn)
                continue
            meta = decoded.get("json")
            out["image"].append(image)
            out["caption"].append(sample["__caption__"])
            out["key"].append(sample["__key__"])
            out["meta"].append(json.loads(meta) if isinstance(meta, (bytes, str)) else (meta or {}))
            for e in embeddings:
                out[e].append(sample["__embeddings__"][e])
        if len(out["image"]) >= max_images:
            break
    if not out["image"]:
        raise ValueError("no held-out image could be read")
    first = out["image"][0]
    result: dict[str, Any] = {**out, "image": {k: torch.stack([i[k] for i in out["image"]]) for k in first}
                              if isinstance(first, dict) else torch.stack(out["image"])}
    for e in embeddings:
        result[e] = torch.from_numpy(np.stack(out[e]))
    return result
