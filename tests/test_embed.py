"""The embed task on a hand-made shard: embeddings in key order, a corrupt member recorded as a drop,
an up-to-date shard skipped."""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import webdataset as wds
from PIL import Image

from unclip import storage
from unclip.config import EmbedConfig
from unclip.data import clip, embeddings
from unclip.tasks import embed as embed_tasks
from unclip.tasks.filter import keys_digest


def _jpg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buf, "JPEG")
    return buf.getvalue()


def _shard(tmp_path) -> dict:
    tar = str(tmp_path / "shards" / "s" / "call-x" / "00000.tar")
    os.makedirs(os.path.dirname(tar))
    members = {"000000000": _jpg((255, 0, 0)), "000000001": b"\xff\xd8 not a jpeg", "000000002": _jpg((0, 0, 255))}
    with wds.TarWriter(tar) as w:
        for key in ("000000002", "000000000", "000000001"):  # img2dataset writes in completion order
            w.write({"__key__": key, "jpg": members[key], "txt": "x"})
    keys = sorted(members)
    kept = pa.table({"key": keys, "uid": [f"s/f/{k}" for k in keys], "url": [f"http://h/{k}.jpg" for k in keys],
                     "caption": ["a red square", "broken", "a blue square"], "source": ["s"] * 3})
    kept_uri = storage.write_parquet(str(tmp_path / "kept.parquet"), kept)
    return {"source": "s", "source_rank": 0, "shard": "shards/s/call-x/00000", "tar": tar, "rows": 3,
            "digest": keys_digest(keys), "kept": kept_uri}


def test_embed_batch_writes_sorted_embeddings_and_drops_undecodable_members(tmp_path):
    shard = _shard(tmp_path)
    cfg = EmbedConfig(model={"arch": "unclip-tiny", "seed": 0}, batch_size=2, num_workers=0, dtype="float32")
    mid = embed_tasks.model_identity(cfg)
    result = storage.read_parquet(embed_tasks.embed_batch.fn(0, [shard], str(tmp_path), cfg, mid)).to_pylist()[0]
    out = storage.read_parquet(result["embeddings"])
    assert out.column("key").to_pylist() == ["000000000", "000000002"] and result["rows"] == 2
    assert out.schema.field("image_emb").type == pa.list_(pa.float32(), 1024)
    drop = storage.read_parquet(result["drops"]).to_pylist()
    assert [(d["uid"], d["stage"], d["reason"]) for d in drop] == [("s/f/000000001", "embed", "decode_error")]
    # the stored embedding equals a direct encode of the same pixels and caption
    model, preprocess, tokenizer = clip.load_clip(cfg.model)
    img = preprocess(Image.open(io.BytesIO(_jpg((255, 0, 0)))).convert("RGB")).unsqueeze(0)
    i, t, s = clip.encode_batch(model, img, tokenizer(["a red square"]), clip.resolve_device("cpu"))
    np.testing.assert_allclose(embeddings.to_numpy(out.column("image_emb"))[0], i[0], atol=1e-5)
    np.testing.assert_allclose(out.column("clip_score").to_numpy()[0], s[0], atol=1e-5)
    # a second call finds the shard up to date (same kept digest) and leaves the file alone
    stamp = os.stat(result["embeddings"]).st_mtime_ns
    again = storage.read_parquet(embed_tasks.embed_batch.fn(0, [shard], str(tmp_path), cfg, mid)).to_pylist()[0]
    assert again["rows"] == 2 and os.stat(result["embeddings"]).st_mtime_ns == stamp
    # another model (here another seed) embeds the same rows again, and the digest says so
    other = cfg.model_copy(update={"model": cfg.model.model_copy(update={"seed": 1})})
    third = storage.read_parquet(embed_tasks.embed_batch.fn(0, [shard], str(tmp_path), other,
                                                            embed_tasks.model_identity(other))).to_pylist()[0]
    assert third["digest"] != again["digest"] and os.stat(result["embeddings"]).st_mtime_ns != stamp
    assert not np.allclose(embeddings.to_numpy(storage.read_parquet(third["embeddings"]).column("image_emb"))[0],
                           embeddings.to_numpy(out.column("image_emb"))[0])
