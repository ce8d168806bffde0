"""Retrieval recall of paired embeddings: the one counter every evaluation of a CLIP uses.

Image->text and text->image recall@k in galleries of ``GALLERY`` pairs, streamed: memory is set by
the gallery size, not by the held-out split, so the same counter serves 1,000 demo pairs and a
held-out split of millions. Metric names: ``i2t_recall@k``, ``t2i_recall@k``, ``recall@k_chance``.
"""

from __future__ import annotations

import numpy as np

GALLERY = 1000
RECALL_AT = (1, 5, 10)


class RecallCounter:
    """Image->text and text->image recall@k of paired embeddings, in galleries of ``gallery`` pairs
    (a final partial gallery of at least 2 pairs counts too; chance is k / gallery size)."""

    def __init__(self, gallery: int = GALLERY, ks: tuple[int, ...] = RECALL_AT) -> None:
        self.gallery, self.ks = gallery, ks
        self.hits = {f"{d}_recall@{k}": 0 for d in ("i2t", "t2i") for k in ks}
        self.chance = {k: 0.0 for k in ks}
        self.n = self.galleries = 0
        self.score_sum = 0.0
        self._img: list[np.ndarray] = []
        self._txt: list[np.ndarray] = []

    def add(self, img: np.ndarray, txt: np.ndarray) -> None:
        self._img.append(np.asarray(img, np.float32))
        self._txt.append(np.asarray(txt, np.float32))
        held = sum(len(x) for x in self._img)
        while held >= self.gallery:
            img_all, txt_all = np.concatenate(self._img), np.concatenate(self._txt)
            self._score(img_all[:self.gallery], txt_all[:self.gallery])
            self._img, self._txt = [img_all[self.gallery:]], [txt_all[self.gallery:]]
            held -= self.gallery

    def _score(self, img: np.ndarray, txt: np.ndarray) -> None:
        sims = img @ txt.T
        for d, s in (("i2t", sims), ("t2i", sims.T)):
            rank = (s > np.diag(s)[:, None]).sum(axis=1)  # candidates scoring strictly higher
            for k in self.ks:
                self.hits[f"{d}_recall@{k}"] += int((rank < k).sum())
        for k in self.ks:
            self.chance[k] += len(img) * min(1.0, k / len(img))
        self.n += len(img)
        self.galleries += 1
        self.score_sum += float((img * txt).sum())

    def result(self) -> dict[str, float]:
        rest = sum(len(x) for x in self._img)
        if rest >= 2 or (self.n == 0 and rest):
            if rest < 2:
                raise ValueError(f"{rest} held-out pair(s); recall needs at least 2")
            self._score(np.concatenate(self._img), np.concatenate(self._txt))
            self._img, self._txt = [], []
        if self.n == 0:
            raise ValueError("no held-out pairs to evaluate")
        out = {k: v / self.n for k, v in self.hits.items()}
        out.update({f"recall@{k}_chance": v / self.n for k, v in self.chance.items()})
        out.update(heldout_pairs=self.n, gallery=min(self.gallery, self.n), galleries=self.galleries,
                   mean_clip_score=self.score_sum / self.n)
        return out
