"""threads.ordered_map: Executor.map's order and results, without a future per item or an unbounded
backlog."""

import itertools
import threading
import time

import pytest

from sdxl_jax.data import threads


class Counted:
    """fn that counts its calls; item 13 raises when `fail` is set."""

    def __init__(self, fail=False):
        self.calls, self.fail, self.lock = 0, fail, threading.Lock()

    def __call__(self, x):
        with self.lock:
            self.calls += 1
        if self.fail and x == 13:
            raise ValueError("item 13")
        return x * x


@pytest.mark.parametrize("num_threads,chunk_size", [(1, 256), (4, 1), (4, 7), (16, 256)])
def test_results_in_order(num_threads, chunk_size):
    fn = Counted()
    got = list(threads.ordered_map(fn, iter(range(1000)), num_threads, chunk_size))
    assert got == [x * x for x in range(1000)]
    assert fn.calls == 1000
    assert list(threads.ordered_map(fn, [], num_threads, chunk_size)) == []


def test_a_short_input_still_uses_every_thread():
    """64 slow items on 16 threads: chunks shrink so that every thread has work (with 256-item chunks one
    thread did all 64, and a folder's probes on a slow mount took twice as long)."""
    active, peak, lock = [0], [0], threading.Lock()

    def slow(x):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1
        return x

    assert list(threads.ordered_map(slow, range(64), num_threads=16)) == list(range(64))
    assert peak[0] >= 8, peak  # 16 when the threads start together; 1 with a single chunk


def test_bounded_ahead_of_the_consumer():
    """Executor.map submits every item at once: here all 10000 would have run by the first assertion."""
    fn = Counted()
    gen = threads.ordered_map(fn, range(10_000), num_threads=4, chunk_size=8)
    assert next(gen) == 0
    time.sleep(0.3)  # the workers have long finished what they were given
    # 2 * 4 chunks waiting, plus the one refilled when the first was taken
    assert 8 <= fn.calls <= (2 * 4 + 1) * 8
    taken = 1 + sum(1 for _ in itertools.islice(gen, 99))
    time.sleep(0.3)
    assert fn.calls <= taken + (2 * 4 + 1) * 8
    gen.close()
    stopped = fn.calls
    time.sleep(0.1)
    assert fn.calls == stopped < 10_000  # closing cancels the chunks not started


def test_an_error_is_raised_at_its_chunk():
    got = []
    with pytest.raises(ValueError, match="item 13"):
        for x in threads.ordered_map(Counted(fail=True), range(1000), num_threads=4, chunk_size=5):
            got.append(x)
    assert got == [x * x for x in range(10)]  # the items of the chunks before 13's
