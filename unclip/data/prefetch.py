"""A batch producer in a background thread, so that reading and preparing the next batch overlaps
the consumer's work on this one.

Used by the PCA fit (reading: file reads, page copies and Arrow's decoder drop the GIL while the
consumer is in BLAS; measured in bench/bench_pca.py) and by the priors' training batches (reading,
tokenizing, PCA coding, while the step runs in torch with the GIL released; bench/bench_priors.py).
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterable, Iterator, TypeVar

T = TypeVar("T")


def prefetch(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """Iterate ``items`` in a background thread, up to ``depth`` items ahead of the consumer.

    Memory grows by ``depth`` + 1 items. Errors in the producer are raised here; closing the returned
    generator (or leaving it early) stops the thread and closes ``items`` in it.
    """
    if depth < 1:
        yield from items
        return
    buffer: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(kind: str, value: Any) -> bool:
        while not stop.is_set():
            try:
                buffer.put((kind, value), timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        it = iter(items)
        try:
            for item in it:
                if not put("item", item):
                    return
            put("end", None)
        except BaseException as exc:  # handed to the consumer, which raises it
            put("error", exc)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()  # an early stop still closes the producer's files, in its own thread

    worker = threading.Thread(target=produce, name="prefetch", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = buffer.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        worker.join()
