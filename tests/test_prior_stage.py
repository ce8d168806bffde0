"""The diffusion prior's stage: the embeddings reader, training through the shared trainer, resume."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pytest
import torch

from unclip.config import DiffusionPriorTrainConfig
from unclip.data import embedding_pairs, embeddings
from unclip.train import prior as prior_train
from unclip.train import trainer as tr

COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "star", "triangle"]


def make_embedding_files(root, n_files: int = 6, rows: int = 20, seed: int = 0) -> pa.Table:
    """Embedding files whose image embedding is a function of the caption's colour and shape (plus
    noise), with a text embedding near it: a map a prior can learn."""
    basis = np.random.default_rng(0).standard_normal((len(COLOURS) + len(SHAPES), embeddings.EMBED_DIM))
    rng = np.random.default_rng(seed + 1)
    out = []
    for f in range(n_files):
        c = rng.integers(0, len(COLOURS), rows)
        s = rng.integers(0, len(SHAPES), rows)
        img = basis[c] + basis[len(COLOURS) + s] + 0.3 * rng.standard_normal((rows, embeddings.EMBED_DIM))
        img /= np.linalg.norm(img, axis=1, keepdims=True)
        txt = img + 2.3 * rng.standard_normal(img.shape) / np.sqrt(embeddings.EMBED_DIM)  # cosine about 0.4
        txt /= np.linalg.norm(txt, axis=1, keepdims=True)
        keys = [f"{f:03d}{i:04d}" for i in range(rows)]
        table = pa.table({
            "key": keys, "uid": keys, "source": ["dalle"] * rows,
            "caption": [f"a {COLOURS[a]} {SHAPES[b]}" for a, b in zip(c, s)], "url": [""] * rows,
            "image_emb": embeddings.fixed_size_list(img, "float16"), "text_emb": embeddings.fixed_size_list(txt, "float16"),
            "clip_score": pa.array((img * txt).sum(1).astype(np.float32))},
            schema=embeddings.embedding_schema("float16"))
        out.append(embeddings.write(str(root / f"e{f:03d}.parquet"), table))
    return pa.table({"source": ["dalle"] * n_files, "kept": out, "rows": [rows] * n_files})


def test_the_stream_resumes_exactly_without_reading_what_it_trained_on(tmp_path, monkeypatch):
    files = make_embedding_files(tmp_path)
    full = list(itertools.islice(embedding_pairs.EmbeddingPairs(files, batch_size=7, seed=1).stream(), 40))
    captions = [c for b in full[:17] for c in b["caption"]]  # 119 rows: every row of the epoch once
    assert len(captions) == 119 and len(set(zip(captions, [r.tobytes() for b in full[:17] for r in b["image_emb"]]))) == 119
    read = []
    real = embedding_pairs.read_rows
    monkeypatch.setattr(embedding_pairs, "read_rows", lambda uri, *a, **k: read.append(uri) or real(uri, *a, **k))
    resumed = list(itertools.islice(embedding_pairs.EmbeddingPairs(files, batch_size=7, seed=1).stream(25 * 7), 15))
    for a, b in zip(full[25:], resumed):
        assert a["caption"] == b["caption"] and np.array_equal(a["image_emb"], b["image_emb"])
    # row 175 lies in the second epoch's third file: the 8 files before it are skipped unread, then
    # 105 rows read 4 files of that epoch and 2 of the next
    assert len(read) == 6
    # two ranks split the files and together see every row of an epoch once
    ranks = [list(itertools.islice(embedding_pairs.EmbeddingPairs(files, batch_size=5, rank=r, world_size=2,
                                                                   seed=1).stream(), 12)) for r in (0, 1)]
    seen = {row.tobytes() for r in ranks for b in r for row in b["image_emb"]}
    assert len(seen) == 120


def _task(files, cfg):
    import open_clip

    from unclip.data import clip as clip_data

    clip_data.register_project_configs()
    tok = open_clip.get_tokenizer("unclip-tiny")
    return prior_train.DiffusionPriorTask(cfg, files, files, tok, embed_dim=embeddings.EMBED_DIM, text_ctx=77)


def _cfg(**kw) -> DiffusionPriorTrainConfig:
    base = dict(steps=6, batch_size=16, lr=1e-3, warmup_steps=2, checkpoint_every=3, log_every=1, seed=0,
                ema_decay=0.9, eval_pairs=32, sample_steps=4, num_workers=0)
    return DiffusionPriorTrainConfig(**{**base, **kw})


def test_a_killed_prior_run_resumes_to_the_same_weights(tmp_path):
    files = make_embedding_files(tmp_path / "data")
    full = tr.Trainer(_task(files, _cfg()), _cfg(), str(tmp_path / "full")).run()
    with pytest.raises(tr.NonFiniteLossError):
        tr.Trainer(_NanTask(files, _cfg()), _cfg(), str(tmp_path / "cut")).run()
    resumed = tr.Trainer(_task(files, _cfg()), _cfg(), str(tmp_path / "cut")).run()
    assert resumed.resumed_from == 3
    a, b = tr.load_checkpoint(full.checkpoint), tr.load_checkpoint(resumed.checkpoint)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["model_config"]["prior"]["embed_dim"] == 1024 and a["model_config"]["flavour"] == "tiny"


class _NanTask(prior_train.DiffusionPriorTask):
    def __init__(self, files, cfg):
        t = _task(files, cfg)
        super().__init__(cfg, files, files, t.tokenizer, embed_dim=t.embed_dim, text_ctx=t.text_ctx)
        self.calls = 0

    def loss(self, model, batch):
        loss, extra = super().loss(model, batch)
        self.calls += 1
        return (loss * float("nan") if self.calls == 5 else loss), extra


def test_the_prior_learns_and_is_evaluated_against_its_baselines(tmp_path):
    files = make_embedding_files(tmp_path / "data", n_files=8, rows=40)
    held = make_embedding_files(tmp_path / "held", n_files=2, rows=40, seed=9)  # same basis, other rows
    cfg = _cfg(steps=100, batch_size=32, lr=1e-3, warmup_steps=10, checkpoint_every=1000, log_every=50,
               eval_every=100, eval_pairs=64, sample_steps=16, ema_decay=0.95)
    task = _task(files, cfg)
    task.eval_files = held
    t = tr.Trainer(task, cfg, str(tmp_path / "run"))
    t.run()
    m = t.eval_history()[-1]
    print({k: round(v, 3) for k, v in m.items()})
    assert m["cosine_true"] > m["cosine_text_baseline"] and m["cosine_true"] > m["cosine_unrelated"] + 0.1, m
    assert m["i2i_recall@5"] > 2 * m["i2i_recall@5_chance"], m


def test_the_unrelated_caption_is_another_caption():
    # cosine_unrelated pairs each held-out image with the prediction for a different caption; held-out
    # rows come in file order, where neighbours often share one
    captions = ["a red circle"] * 5 + ["a blue square"] * 3 + ["a green star"] * 2
    for seed in range(5):
        partners = prior_train.unrelated_partners(captions, seed)
        assert all(captions[i] != captions[j] for i, j in enumerate(partners)), (seed, partners)
        assert np.array_equal(partners, prior_train.unrelated_partners(captions, seed))
    assert list(prior_train.unrelated_partners(["x", "x"], 0)) == [1, 0]


def test_prefetched_batches_are_the_same_batches_and_the_thread_ends_with_the_run(tmp_path):
    import threading

    from unclip.train import distributed

    files = make_embedding_files(tmp_path / "data", n_files=3)
    ctx = distributed.DistContext(0, 1, 0, torch.device("cpu"))
    streams = [list(itertools.islice(_task(files, _cfg(prefetch_batches=k)).batches(8, 3, ctx), 12)) for k in (0, 3)]
    for a, b in zip(*streams):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a run that stops early (here: a NaN) closes its batch stream, so no reader thread outlives it
    with pytest.raises(tr.NonFiniteLossError):
        tr.Trainer(_NanTask(files, _cfg(prefetch_batches=2)), _cfg(prefetch_batches=2), str(tmp_path / "run")).run()
    assert not [t for t in threading.enumerate() if t.name == "prefetch"]


def test_the_caption_tokenizer_must_be_the_clip_bpe_the_text_encoders_read():
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    from unclip.data import clip as clip_data

    clip_data.register_project_configs()
    tok = open_clip.get_tokenizer("unclip-tiny")
    assert prior_train.check_caption_tokenizer(tok, "unclip-tiny") is tok
    # one more special token: ids the embeddings do not have, the end of text no longer the highest id
    with pytest.raises(ValueError, match="vocab 49409.*49408 tokens"):
        prior_train.check_caption_tokenizer(SimpleTokenizer(additional_special_tokens=["<extra>"]), "other")
    with pytest.raises(ValueError, match="tokenizes captions with function"):
        prior_train.check_caption_tokenizer(lambda texts: None, "other")
