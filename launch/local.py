"""Start N JAX processes on this machine, each with its own fake CPU devices: a pod on one host, for tests.

    python launch/local.py --num_processes=2 --devices_per_process=4 -- \\
        python train.py --config=configs/stage1_256.py:smoke --workdir=/tmp/sdxl_2p

Each process gets the explicit multi-process settings sdxl_jax.parallel.initialize_distributed reads
($JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT, $JAX_NUM_PROCESSES, $JAX_PROCESS_ID) plus JAX_PLATFORMS=cpu
and XLA_FLAGS=--xla_force_host_platform_device_count=D; cross-process collectives then run over gloo.
Output lines are prefixed with "[pK]"; with --log_dir each process also writes pK.log and pK.pid there.
The launcher waits for every process and exits with the first non-zero exit status. It does not hide a
hang: a process still running --grace_s after another failed is killed and reported as killed by the
launcher, so a test can tell "JAX ended the job" from "the launcher did".
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(base: dict, *, index: int, count: int, port: int, devices: int) -> dict:
    flags = [f for f in base.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    return {
        **base,
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "JAX_NUM_PROCESSES": str(count),
        "JAX_PROCESS_ID": str(index),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]),
        "PYTHONUNBUFFERED": "1",
    }


def _pump(proc, prefix, log):
    for line in proc.stdout:
        sys.stdout.write(f"{prefix} {line}")
        sys.stdout.flush()
        if log is not None:
            log.write(line)
            log.flush()


def describe(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by signal {-code}"
    return f"exit status {code}"


def run(command, *, num_processes, devices_per_process, port=0, log_dir=None, grace_s=600.0, env=None):
    """Runs `command` (a list) in N processes; returns their exit codes (launcher-killed ones as None)."""
    port = port or free_port()
    env = dict(os.environ if env is None else env)
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
    procs, pumps, logs = [], [], []
    for i in range(num_processes):
        log = open(os.path.join(log_dir, f"p{i}.log"), "w") if log_dir else None
        proc = subprocess.Popen(
            command,
            env=process_env(env, index=i, count=num_processes, port=port, devices=devices_per_process),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        if log_dir:
            with open(os.path.join(log_dir, f"p{i}.pid"), "w") as f:
                f.write(str(proc.pid))
        pump = threading.Thread(target=_pump, args=(proc, f"[p{i}]", log), daemon=True)
        pump.start()
        procs.append(proc)
        pumps.append(pump)
        logs.append(log)
    t0, first_failure, killed = time.time(), None, set()
    while any(p.poll() is None for p in procs):
        if first_failure is None and any(p.poll() not in (None, 0) for p in procs):
            first_failure = time.time()
        if first_failure is not None and time.time() - first_failure > grace_s:
            for i, p in enumerate(procs):
                if p.poll() is None:
                    print(f"[launch] p{i} still running {grace_s:.0f} s after a failure: killing", flush=True)
                    p.kill()
                    killed.add(i)
        time.sleep(0.2)
    for pump, log in zip(pumps, logs, strict=True):
        pump.join()
        if log is not None:
            log.close()
    codes = []
    for i, p in enumerate(procs):
        codes.append(None if i in killed else p.returncode)
        how = "killed by the launcher" if i in killed else describe(p.returncode)
        print(f"[launch] p{i} {how} after {time.time() - t0:.1f} s", flush=True)
    return codes


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=4)
    parser.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
    parser.add_argument("--log_dir", default=None, help="write pK.log and pK.pid here")
    parser.add_argument(
        "--grace_s",
        type=float,
        default=600.0,
        help="kill processes still running this long after another one failed",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- python train.py ...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --, e.g. -- python train.py --config=... --workdir=...")
    codes = run(
        command,
        num_processes=args.num_processes,
        devices_per_process=args.devices_per_process,
        port=args.port,
        log_dir=args.log_dir,
        grace_s=args.grace_s,
    )
    bad = [c for c in codes if c != 0]
    return 0 if not bad else (1 if None in bad else (bad[0] if bad[0] > 0 else 128 - bad[0]))


if __name__ == "__main__":
    sys.exit(main())
