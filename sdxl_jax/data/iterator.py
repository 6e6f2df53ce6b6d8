"""make_train_iterator: the checkpointable, host-sharded training iterator (see pipeline.py for the design).

    it = make_train_iterator(config.data, seed=config.seed, global_batch_size=config.data.batch_size,
                             process_index=jax.process_index(), process_count=jax.process_count(),
                             tokenizer=tokenizer.load_pair(), start_step=0)
    batch = next(it)            # host-local rows: global_batch_size // process_count
    state = it.get_state()      # JSON-able dict; it.set_state(state) restores the identical next batches
    it.skip_counts()            # {reason: count}
    it.batch_shapes()           # batch_spec of every bucket the schedule can draw (global batch size)

Checkpointing: the iterator is a grain.DatasetIterator, so grain's orbax handler saves and restores it
(one JSON file per process): in an orbax CheckpointManager save `grain.checkpoint.CheckpointSave(it)`
and restore with `grain.checkpoint.CheckpointRestore(it)` under an item name such as "data". Because a
batch depends only on the step, `make_train_iterator(..., start_step=restored_step)` resumes the same
batches too (the state adds the skip counts so far and a data fingerprint that is checked on restore).

Start-up: `make_train_iterator(..., index_dir=WORKDIR/data_index, index_process=(jax.process_index(),
jax.process_count()), sync=...)` indexes the dataset once, split over the hosts, and later starts read
that index instead of probing every example again (index_cache.py).
"""

import collections
import warnings

import grain
import numpy as np

from sdxl_jax.data import buckets as buckets_lib
from sdxl_jax.data import decode, index_cache, pipeline, sources

# Far beyond any run; grain ranges are lazy, so the length costs nothing.
_HORIZON = 1 << 40


class TrainIterator(grain.DatasetIterator):
    def __init__(self, loader, index, *, start_step, num_workers, prefetch):
        super().__init__()
        self._loader, self._index = loader, index
        self._step, self._num_workers, self._prefetch = (
            int(start_step),
            int(num_workers),
            max(1, int(prefetch)),
        )
        self._runtime_skips = collections.Counter()
        self._it = None

    def _ensure(self):
        if self._it is None:
            ds = grain.MapDataset.range(self._step, _HORIZON).map(self._loader)
            # Each element is a whole batch, so buffers are counted in batches.
            threads = 1 if self._num_workers else self._prefetch
            ds = ds.to_iter_dataset(
                grain.ReadOptions(num_threads=threads, prefetch_buffer_size=self._prefetch)
            )
            if self._num_workers:
                ds = ds.mp_prefetch(
                    grain.MultiprocessingOptions(
                        num_workers=self._num_workers, per_worker_buffer_size=self._prefetch
                    )
                )
            self._it = iter(ds)
        return self._it

    def __next__(self):
        batch = next(self._ensure())
        step = int(batch.pop("_step"))
        assert step == self._step, (step, self._step)
        for reason, count in zip(decode.SKIP_REASONS, batch.pop("_skips"), strict=True):
            if count:
                self._runtime_skips[reason] += int(count)
        self._step += 1
        return batch

    @property
    def step(self):
        """The global step whose batch comes next."""
        return self._step

    def get_state(self):
        return {
            "step": self._step,
            "fingerprint": self._fingerprint(),
            "runtime_skips": dict(self._runtime_skips),
        }

    def set_state(self, state):
        if state.get("fingerprint") != self._fingerprint():
            warnings.warn(
                "the data iterator state was saved with another dataset, seed or global batch size "
                f"({state.get('fingerprint')} != {self._fingerprint()}); resuming at step {state['step']} "
                "but the batches will differ from the original run",
                stacklevel=2,
            )
        self._close_inner()
        self._step = int(state["step"])
        self._runtime_skips = collections.Counter(state.get("runtime_skips", {}))

    def _fingerprint(self):
        return f"{self._index.fingerprint()}-{self._loader.seed}-{self._loader.g}"

    def skip_counts(self):
        """{reason: count}: examples dropped while indexing (whole dataset) plus rows substituted so far."""
        out = {reason: 0 for reason in decode.SKIP_REASONS}
        for counter in (self._index.skips, self._runtime_skips):
            for reason, count in counter.items():
                out[reason] += count
        return out

    def batch_shapes(self):
        """batch_spec (global batch size) for each bucket the schedule can draw, for precompilation."""
        table, g = self._index.table, self._loader.g
        return [pipeline.batch_spec(table[b], g) for b in np.flatnonzero(self._index.counts)]

    def bucket_counts(self):
        return {self._index.table[b]: int(c) for b, c in enumerate(self._index.counts) if c}

    def steps_per_epoch(self):
        return pipeline.steps_per_epoch(self._index, self._loader.g)

    def start_prefetch(self):
        it = self._ensure()
        if hasattr(it, "start_prefetch"):
            it.start_prefetch()

    def _close_inner(self):
        if self._it is not None:
            if hasattr(self._it, "close"):
                self._it.close()
            self._it = None

    def close(self):
        self._close_inner()
        super().close()


def _default_tokenizer():
    from sdxl_jax import tokenizer

    return tokenizer.load_pair(path=None)


def make_train_iterator(data_config, *, seed, global_batch_size, process_index, process_count, tokenizer=None,
                        start_step=0, index_dir=None, index_process=(0, 1), sync=None):  # fmt: skip
    """The training iterator of host-local batches (see the module docstring and sdxl_jax.data).

    index_dir: a folder (local or gs://, e.g. the workdir's data_index/) that keeps the dataset index
    (probe results, webdataset tar index) across restarts, shared by the hosts; None indexes from scratch.
    index_process: (process index, process count) that split the indexing work: every process of the
    job, not the batch block (process_index / process_count above), which several hosts may share.
    sync(name): a barrier across those processes (index_cache.py says when it is called).
    """
    table = buckets_lib.from_config(data_config)
    cache = None
    if index_dir is not None:
        cache = index_cache.IndexCache(index_dir, *index_process, sync=sync)
    source = sources.from_config(data_config, cache=cache)
    index = pipeline.Index(source, data_config, table, global_batch_size, cache=cache)
    loader = pipeline.StepLoader(
        source,
        index,
        data_config,
        seed=seed,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
        tokenizer=tokenizer if tokenizer is not None else _default_tokenizer(),
    )
    return TrainIterator(
        loader,
        index,
        start_step=start_step,
        num_workers=data_config.num_workers,
        prefetch=data_config.prefetch,
    )
