"""Small webdataset shards of the demo's procedural scenes, written directly (no download), with the
kept-rows tables a release lists: what the training readers and the CLIP stage are tested on."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from unclip.data import demo_source


def scene_embedding(scene: dict, rng: np.random.Generator) -> np.ndarray:
    """A unit-norm stand-in for a CLIP image embedding [EMBED_DIM]: fixed random directions of the
    scene's colours and shapes, summed, plus noise (a map a decoder can learn to use)."""
    from unclip.data import embeddings

    names = list(demo_source.COLOURS) + list(demo_source.SHAPES)
    basis = np.random.default_rng(1234).standard_normal((len(names), embeddings.EMBED_DIM))
    v = sum(basis[names.index(o["colour"])] + basis[names.index(o["shape"])] for o in scene["objects"])
    v = v + 0.3 * rng.standard_normal(embeddings.EMBED_DIM)
    return (v / np.linalg.norm(v)).astype(np.float32)


def make_pair_shards(root: Path, per_source: dict[str, int], samples_per_shard: int = 16, seed: int = 0,
                     side: int = 64, image_emb: bool = False, tar_format: str = "gnu") -> pa.Table:
    """Shards ``root/shards/<source>/<n>.tar`` with jpg + json (scene_json) + txt members, and per shard
    a kept Parquet of ``key, uid, source, caption`` (and ``image_emb``, ``scene_embedding``'s, when
    asked); returns the files table (source, shard, tar, rows, digest, kept). The tar headers are GNU
    ones by default, as the ingest's img2dataset workers write them (``egress.set_tar_format_from_env``);
    ``tar_format="pax"``: a PAX header a member, as img2dataset writes them without the ingest's hook."""
    from unclip.data import egress

    saved = tarfile.TarFile.format
    egress.set_tar_format_from_env({egress.TAR_FORMAT_ENV: tar_format})
    try:
        return _write_pair_shards(root, per_source, samples_per_shard, seed, side, image_emb)
    finally:
        tarfile.TarFile.format = saved


def _write_pair_shards(root: Path, per_source: dict[str, int], samples_per_shard: int, seed: int, side: int,
                       image_emb: bool) -> pa.Table:
    from unclip.data import embeddings

    rng = np.random.default_rng(seed)
    rows = []
    for source, n in per_source.items():
        for shard_i, start in enumerate(range(0, n, samples_per_shard)):
            shard = f"shards/{source}/{shard_i:05d}"
            tar = root / f"{shard}.tar"
            tar.parent.mkdir(parents=True, exist_ok=True)
            keys, captions, vectors = [], [], []
            with wds.TarWriter(str(tar)) as sink:
                for i in range(start, min(n, start + samples_per_shard)):
                    scene = demo_source._sample_scene(rng, side, side, "png")
                    img = demo_source._render(scene, rng)
                    buf = io.BytesIO()
                    img.convert("RGB").save(buf, format="JPEG", quality=95)
                    cap = (demo_source.dalle_caption if source == "dalle" else demo_source.clip_caption)(scene, rng)
                    key = f"{shard_i:05d}{i:04d}"
                    sink.write({"__key__": key, "jpg": buf.getvalue(), "txt": cap,
                                "json": json.dumps({"key": key, "caption": cap, "scene_json": json.dumps(scene)})})
                    keys.append(key)
                    captions.append(cap)
                    vectors.append(scene_embedding(scene, rng) if image_emb else None)
            kept = root / "kept" / source / f"{shard_i:05d}.parquet"
            kept.parent.mkdir(parents=True, exist_ok=True)
            columns = {"key": keys, "uid": [f"{source}/x/{k}" for k in keys], "source": [source] * len(keys),
                       "caption": captions}
            if image_emb:
                columns["image_emb"] = embeddings.fixed_size_list(np.stack(vectors), "float16")
            pq.write_table(pa.table(columns), kept)
            rows.append({"source": source, "shard": shard, "tar": str(tar), "rows": len(keys),
                         "digest": f"d{shard_i}", "kept": str(kept)})
    return pa.Table.from_pylist(rows)


def publish_pairs_release(workdir: Path, config, per_source: dict[str, int], samples_per_shard: int = 16,
                          seed: int = 0) -> dict:
    """A released dataset version of ``make_pair_shards``' rows in ``workdir``'s catalog (the kept
    tables stand in for the final embeddings: training reads only key, caption, tar)."""
    from unclip import catalog, manifest, storage

    files = make_pair_shards(workdir, per_source, samples_per_shard, seed)
    index = files.append_column("source_rank", pa.array([0] * files.num_rows, pa.int32()))
    index_uri = storage.write_parquet(str(workdir / "index" / "embeddings.parquet"), index)
    version = manifest.dataset_version(files.select(["shard", "digest"]))
    rows = int(sum(files.column("rows").to_pylist()))
    manifest.record_stage(str(workdir), "semantic_filter", {
        "rows_in": rows, "rows_kept": rows, "drops_by_reason": {}, "dataset_version": version,
        "outputs": {"shard_index": index_uri}})
    return catalog.publish_dataset(str(workdir / "catalog"), str(workdir), {}, config)
