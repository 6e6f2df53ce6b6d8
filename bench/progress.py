"""Phase lines on stderr as a benchmark runs, and its turn on the device.

The GPU suite (bench/gpu_suite.sh) starts every part at once, so that their XLA compiles (minutes each,
on the host's CPUs) overlap, and lets them time one at a time: a part calls `wait_turn()` once it has
compiled, and only then touches the device for its measurement. Outside the suite (no BENCH_TURN) the
wait returns at once. The phase lines show where a part's time went when its limit cuts it."""

import os
import sys
import time

_START = time.time()


def progress(msg):
    """Prints "[script +seconds since import, wall clock] msg" to stderr at once."""
    now = time.time()
    clock = time.strftime("%H:%M:%S", time.gmtime(now))
    script = os.path.basename(sys.argv[0])
    print(f"[{script} +{now - _START:.1f}s {clock}] {msg}", file=sys.stderr, flush=True)


def wait_turn(poll_s=0.5):
    """Waits for this part's turn on the device and returns the seconds waited (0.0 outside the suite).

    With BENCH_TURN=PREFIX set: creates PREFIX.ready, then waits until PREFIX.go exists (the suite creates
    it when no other part is timing)."""
    prefix = os.environ.get("BENCH_TURN")
    if not prefix:
        return 0.0
    t0 = time.time()
    open(prefix + ".ready", "w").close()
    progress("compiled; waiting for its turn on the device")
    while not os.path.exists(prefix + ".go"):
        time.sleep(poll_s)
    waited = time.time() - t0
    progress(f"its turn, after {waited:.1f} s")
    return waited
