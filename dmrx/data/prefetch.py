"""Background prefetch: run an iterator in a thread, a few items ahead of its consumer.

    with prefetch(read_chunks(path), depth=2) as chunks:
        for chunk in chunks:
            compute(chunk)          # the next chunks are read meanwhile

Reading (h5py, decompression, numpy gathers) and compute (torch / onnxruntime kernels, which release the
GIL) then overlap. Memory stays bounded: at most `depth` items wait in the queue, plus the one being
produced. An exception raised by the producer is re-raised in the consumer, at the item where it happened,
with its original traceback; items produced before it are delivered first. Leaving the `with` block (or
calling close()) early stops the producer promptly and joins its thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

_DONE = object()


class _Failure:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException):
        self.exc = exc


class Prefetch(Generic[T]):
    """An iterator over `source` whose items are produced by a background thread, `depth` ahead."""

    def __init__(self, source: Iterable[T], depth: int = 2, name: str = "dmrx-prefetch"):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._source = source
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._produce, name=name, daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        """Queue an item unless asked to stop; False when stopped."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        it = None
        try:
            it = iter(self._source)
            for item in it:
                if not self._put(item):
                    return
            self._put(_DONE)
        except BaseException as e:  # delivered to the consumer, which re-raises it
            self._put(_Failure(e))
        finally:
            close = getattr(it, "close", None)
            if close is not None and self._stop.is_set():
                try:
                    close()
                except Exception:
                    pass

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        if self._finished:
            raise StopIteration
        while True:
            try:
                item = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self._finished = True  # the producer died without a word (cannot normally happen)
                    raise StopIteration from None
        if item is _DONE:
            self._finished = True
            self._thread.join()
            raise StopIteration
        if isinstance(item, _Failure):
            self._finished = True
            self._thread.join()
            raise item.exc.with_traceback(item.exc.__traceback__)
        return item

    def close(self) -> None:
        """Stop the producer (it finishes the item it is on) and wait for its thread."""
        self._stop.set()
        self._finished = True
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join()

    def __enter__(self) -> Prefetch[T]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def prefetch(source: Iterable[T], depth: int = 2, name: str = "dmrx-prefetch") -> Prefetch[T]:
    """Iterate `source` in a background thread, up to `depth` items ahead (see the module docstring)."""
    return Prefetch(source, depth, name)
