"""An ordered, bounded thread map for the I/O-bound loops over every example (probes, stats, prepare).

`concurrent.futures.Executor.map` submits one future per item before it yields the first result, and
ignores `chunksize` for threads. Over 1M examples that is 1M futures, ~1.7 GiB of host memory and ~20 s
of bookkeeping before any probe has finished (bench/data_index.py --sources=scale), and a consumer slower
than the workers lets every result pile up. `ordered_map` submits chunks of items and keeps at most
`2 * num_threads` chunks ahead of the consumer.
"""

import collections
import itertools
from concurrent import futures


def ordered_map(fn, items, num_threads=16, chunk_size=256):
    """fn(item) for each item, in order, computed on `num_threads` threads in chunks of `chunk_size` items,
    smaller where `items` has a length too short to give every thread ~4 chunks (the probes of 2000 images
    on a slow mount take twice as long on 8 busy threads of 16).

    Lazy: a chunk is submitted only while fewer than 2 * num_threads chunks wait for the consumer, so at
    most that many chunks of results are held, besides the one being consumed. An exception from fn is
    raised when the consumer reaches that item's chunk (the chunk's earlier results are not yielded);
    closing the generator early cancels the chunks not yet started."""
    it = iter(items)
    if num_threads <= 1:
        yield from map(fn, it)
        return
    if hasattr(items, "__len__"):
        chunk_size = max(1, min(chunk_size, -(-len(items) // (4 * num_threads))))
    chunks = iter(lambda: list(itertools.islice(it, chunk_size)), [])
    with futures.ThreadPoolExecutor(num_threads) as ex:
        ahead = itertools.islice(chunks, 2 * num_threads)
        pending = collections.deque(ex.submit(_apply, fn, c) for c in ahead)
        try:
            while pending:
                results = pending.popleft().result()
                pending.extend(ex.submit(_apply, fn, c) for c in itertools.islice(chunks, 1))
                yield from results
        finally:
            for f in pending:
                f.cancel()


def _apply(fn, chunk):
    return [fn(x) for x in chunk]
