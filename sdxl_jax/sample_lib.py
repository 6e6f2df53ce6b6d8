"""Prompts -> images on disk: prompt files, validation, sharding over hosts and devices, PNG + index output.

A job is one image. Jobs are read and validated completely (every line of the prompts file, every option)
before any weights are loaded or anything compiles, so a typo on line 9,000 costs seconds, not hours.
Each image's noise comes from its own seed, so an image does not depend on how jobs are batched, sharded
or resumed. Files are written atomically (temp file + rename on local disk; a GCS object appears whole),
so an existing PNG is a finished one and a rerun only generates what is missing. Every path goes through
etils.epath, so --outdir (and the training preview's workdir) may be local or gs://.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from sdxl_jax import paths

# The names sdxl_jax.diffusion.samplers.sample accepts (checked against it in tests/test_sample_lib.py).
SAMPLERS = ("euler", "euler_ancestral", "heun", "dpmpp_2s_ancestral", "dpmpp_2m", "lms")
LATENT_FACTOR = 8  # SPEC.md: the VAE downsamples by 8
INDEX_NAME = "samples.jsonl"
_JSONL_KEYS = ("prompt", "seed", "height", "width", "steps", "guidance", "sampler", "negative_prompt")


class PromptsError(ValueError):
    """Bad user input (prompts file, flags); the message names the file and line when there is one."""


@dataclasses.dataclass(frozen=True)
class Job:
    """One image to make. `where` ("prompts.jsonl:12" or "--prompt 2") is for error messages only."""

    prompt: str
    seed: int
    height: int
    width: int
    steps: int
    guidance: float
    sampler: str
    negative_prompt: str | None = None
    index: int = 0
    where: str = ""

    def settings(self) -> tuple:
        """Jobs with equal settings share one compiled program and can share a batch."""
        # A batch is all-zeroed or all-encoded negative conditioning (SPEC.md: the base zeroes the text of
        # its unconditional branch unless a negative prompt is given).
        return (
            self.height,
            self.width,
            self.steps,
            self.guidance,
            self.sampler,
            self.negative_prompt is None,
        )

    def record(self) -> dict:
        return {k: getattr(self, k) for k in _JSONL_KEYS}

    @property
    def file(self) -> str:
        # The name hashes the parameters, so editing a prompts line regenerates that image on rerun
        # instead of silently keeping the old picture.
        digest = hashlib.sha1(json.dumps(self.record(), sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.index:06d}-{digest}.png"


def validate(job: Job) -> Job:
    """Raises PromptsError naming `job.where` for anything the pipeline would reject later."""
    w = f"{job.where}: " if job.where else ""
    if not isinstance(job.prompt, str) or not job.prompt.strip():
        raise PromptsError(f"{w}empty prompt; give some text or delete the line")
    if job.negative_prompt is not None and not isinstance(job.negative_prompt, str):
        raise PromptsError(f"{w}negative_prompt must be a string, got {job.negative_prompt!r}")
    for name in ("height", "width"):
        v = getattr(job, name)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % LATENT_FACTOR:
            raise PromptsError(
                f"{w}{name}={v!r} must be a positive integer multiple of {LATENT_FACTOR} "
                "(the VAE's latent factor), e.g. 1024"
            )
    if isinstance(job.steps, bool) or not isinstance(job.steps, int) or not 1 <= job.steps <= 1000:
        raise PromptsError(f"{w}steps={job.steps!r} must be an integer in [1, 1000]")
    if not _num(job.guidance) or not math.isfinite(job.guidance):
        raise PromptsError(f"{w}guidance={job.guidance!r} must be a finite number (5.0 is the reference)")
    if job.sampler not in SAMPLERS:
        raise PromptsError(f"{w}unknown sampler {job.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if isinstance(job.seed, bool) or not isinstance(job.seed, int) or not 0 <= job.seed < 2**32:
        raise PromptsError(f"{w}seed={job.seed!r} must be an integer in [0, 2**32)")
    return job


def _num(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _check_flags(defaults: dict) -> None:
    validate(Job(prompt="flags", where="command-line flags", **defaults))


def jobs_from_prompts(
    prompts: Sequence[str], defaults: dict, negative_prompt: str | None = None
) -> list[Job]:
    """Command-line prompts; image i gets seed defaults["seed"] + i."""
    _check_flags(defaults)
    d = dict(defaults)
    seed = d.pop("seed")
    return [
        validate(
            Job(
                prompt=p,
                seed=seed + i,
                negative_prompt=negative_prompt,
                index=i,
                where=f"--prompt {i + 1}",
                **d,
            )
        )
        for i, p in enumerate(prompts)
    ]


def read_prompts_file(path: str, defaults: dict, negative_prompt: str | None = None) -> list[Job]:
    """A .txt file (one prompt per non-blank line) or a .jsonl file (one object per non-blank line with
    "prompt" and optionally seed, height, width, steps, guidance, sampler, negative_prompt).

    Values missing from a line come from `defaults`; a line without a seed gets defaults["seed"] + its
    job index, so a file without seeds still gives distinct, reproducible images.
    """
    _check_flags(defaults)
    if not path.endswith((".txt", ".jsonl")):
        raise PromptsError(f"{path}: prompts files must end in .txt (one prompt per line) or .jsonl")
    try:
        lines = paths.as_path(path).read_bytes().decode("utf-8").splitlines()
    except FileNotFoundError:
        raise PromptsError(f"{path}: no such prompts file") from None
    except UnicodeDecodeError as e:
        raise PromptsError(f"{path}: not UTF-8 text ({e})") from None
    jobs = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        fields = dict(defaults, negative_prompt=negative_prompt)
        fields["seed"] = defaults["seed"] + len(jobs)
        if path.endswith(".txt"):
            fields["prompt"] = line.strip()
        else:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptsError(
                    f"{where}: malformed JSON ({e.msg} at column {e.colno}); each line must "
                    'be one object like {"prompt": "a cat", "seed": 1}'
                ) from None
            if not isinstance(obj, dict) or "prompt" not in obj:
                raise PromptsError(f'{where}: each line must be a JSON object with a "prompt" key')
            unknown = sorted(set(obj) - set(_JSONL_KEYS))
            if unknown:
                raise PromptsError(f"{where}: unknown option(s) {unknown}; allowed: {', '.join(_JSONL_KEYS)}")
            fields.update(obj)
        jobs.append(validate(Job(index=len(jobs), where=where, **fields)))
    if not jobs:
        raise PromptsError(f"{path}: no prompts (the file is empty)")
    return jobs


def shard(jobs: Sequence[Job], process_index: int, process_count: int) -> list[Job]:
    """This host's share of the jobs: round-robin, so every host gets a similar mix of settings."""
    return [j for j in jobs if j.index % process_count == process_index]


def batches(jobs: Sequence[Job], batch_size: int) -> Iterable[list[Job]]:
    """Groups jobs with equal settings (one compiled program each) into batches of at most batch_size."""
    groups: dict[tuple, list[Job]] = {}
    for j in jobs:
        groups.setdefault(j.settings(), []).append(j)
    for group in groups.values():
        for i in range(0, len(group), batch_size):
            yield group[i : i + batch_size]


# ---------------------------------------------------------------------------------------------- output


def _write_atomic(path, data: bytes) -> None:
    path = paths.as_path(path)
    if paths.is_remote(path):
        # An object store write is already all-or-nothing (the object appears when the upload completes);
        # a temp object + rename would only add a copy and a delete per file.
        path.write_bytes(data)
        return
    tmp = path.parent / f"{path.name}.tmp-{os.getpid()}"
    tmp.write_bytes(data)
    tmp.replace(path)


def write_png(path: str | os.PathLike, image: np.ndarray, metadata: dict) -> None:
    """uint8 (H, W, 3) -> PNG with every parameter as JSON in the "parameters" text chunk; atomic."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", json.dumps(metadata, sort_keys=True))
    info.add_text("prompt", metadata.get("prompt", ""))
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG", pnginfo=info)
    _write_atomic(path, buf.getvalue())


def read_png_parameters(path: str | os.PathLike) -> dict:
    from PIL import Image

    with Image.open(io.BytesIO(paths.as_path(path).read_bytes())) as im:
        return json.loads(im.text["parameters"])


def write_index(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """The whole index rewritten atomically: a reader never sees a half-written line."""
    _write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))


def _existing(outdir) -> set[str]:
    # One listing rather than an exists() per job: on GCS each is a request, and a job has thousands.
    try:
        return {p.name for p in paths.as_path(outdir).iterdir()}
    except FileNotFoundError:
        return set()


def index_records(jobs: Iterable[Job], outdir: str | os.PathLike) -> list[dict]:
    """Index entries for the jobs whose PNG exists; derived from the jobs, so a run killed between the PNG
    and the index write loses nothing."""
    done = _existing(outdir)
    return [dict(j.record(), file=j.file) for j in jobs if j.file in done]


class Progress:
    """One self-overwriting stderr line: done/total and images per second since the start (compile time
    included: it is what the user waits for)."""

    def __init__(self, total: int, stream=None, enabled: bool = True):
        self.total, self.done, self.start = total, 0, time.perf_counter()
        self.stream, self.enabled = stream or sys.stderr, enabled and total > 0

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        dt = time.perf_counter() - self.start
        bar = "#" * int(30 * self.done / self.total)
        self.stream.write(f"\r[{bar:<30}] {self.done}/{self.total} {self.done / max(dt, 1e-9):.2f} images/s")
        self.stream.write("\n" if self.done >= self.total else "")
        self.stream.flush()


# ----------------------------------------------------------------------------------------------- runner


def run_jobs(
    generate: Callable[..., np.ndarray],
    jobs: Sequence[Job],
    outdir: str,
    *,
    batch_size: int,
    num_devices: int = 1,
    process_index: int = 0,
    process_count: int = 1,
    progress: bool = True,
    extra_metadata: dict | None = None,
) -> dict:
    """Generates this host's missing images and keeps the index current.

    `generate(prompts, height, width, steps, guidance, sampler, seed=list, negative_prompt=list|None)`
    returns uint8 (B, H, W, 3). Every call gets batch_size rounded up to a multiple of `num_devices`
    images (short batches padded with copies of their last job), so each device gets work.
    Returns counts {"total", "skipped", "written"} for this host.
    """
    out = paths.as_path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    mine = shard(jobs, process_index, process_count)
    done = _existing(out)
    todo = [j for j in mine if j.file not in done]
    index = out / (INDEX_NAME if process_count == 1 else f"samples.{process_index}.jsonl")
    write_index(index, index_records(mine, out))
    bar = Progress(len(todo), enabled=progress)
    per_call = max(1, math.ceil(batch_size / num_devices)) * num_devices
    written = 0
    for batch in batches(todo, per_call):
        # Short batches are padded to the full size: one compiled program per settings group.
        padded = batch + [batch[-1]] * (per_call - len(batch))
        h, w, steps, guidance, sampler, _ = batch[0].settings()
        negs = [j.negative_prompt for j in padded]
        images = generate(
            [j.prompt for j in padded],
            height=h,
            width=w,
            steps=steps,
            guidance=guidance,
            sampler=sampler,
            seed=[j.seed for j in padded],
            negative_prompt=None if all(n is None for n in negs) else negs,
        )
        for job, image in zip(batch, np.asarray(images), strict=False):
            write_png(out / job.file, image, dict(job.record(), **(extra_metadata or {})))
        written += len(batch)
        write_index(index, index_records(mine, out))
        bar.update(len(batch))
    return {"total": len(mine), "skipped": len(mine) - len(todo), "written": written}


def merge_indexes(outdir: str, jobs: Sequence[Job], process_count: int) -> None:
    """Multi-host: after every host finished, one samples.jsonl over all jobs (process 0 calls this)."""
    out = paths.as_path(outdir)
    write_index(out / INDEX_NAME, index_records(jobs, out))
    for i in range(process_count):
        part = out / f"samples.{i}.jsonl"
        if process_count > 1 and part.exists():
            part.unlink()


def run(
    *,
    weights: str,
    outdir: str,
    prompts: Sequence[str] = (),
    prompts_file: str | None = None,
    refiner: str | None = None,
    refiner_strength: float | None = None,
    negative_prompt: str | None = None,
    batch_size: int = 1,
    progress: bool = True,
    **defaults,
) -> dict:
    """The sample.py job: validate everything, load the weights, generate what is missing.

    `defaults`: seed, height, width, steps, guidance, sampler (per-line values in a .jsonl override them).
    """
    if bool(prompts) == bool(prompts_file):
        raise PromptsError("give prompts with --prompt (repeatable) or a file with --prompts_file, not both")
    if batch_size < 1:
        raise PromptsError(f"--batch_size={batch_size} must be at least 1")
    if refiner_strength is not None and not (refiner and 0.0 < refiner_strength < 1.0):
        raise PromptsError(
            "--refiner_strength needs --refiner and a value in (0, 1); the reference uses 0.15"
        )
    if prompts_file:
        jobs = read_prompts_file(prompts_file, defaults, negative_prompt)
    else:
        jobs = jobs_from_prompts(prompts, defaults, negative_prompt)

    import jax

    from sdxl_jax import parallel, pipeline

    # Weights folders are checked before the distributed start-up and before anything compiles.
    pipeline.check_weights(weights)
    if refiner:
        pipeline.check_weights(refiner)
    parallel.maybe_initialize_distributed()
    pipe = pipeline.load(weights, refiner=refiner)
    generate = pipe.generate
    if refiner_strength is not None:
        generate = functools.partial(pipe.generate, refiner_strength=refiner_strength)
    counts = run_jobs(
        generate,
        jobs,
        outdir,
        batch_size=batch_size,
        num_devices=jax.local_device_count(),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        progress=progress,
        extra_metadata={"weights": weights, "refiner": refiner, "refiner_strength": refiner_strength},
    )
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("sdxl_jax sample_lib.run done")
        if jax.process_index() == 0:
            merge_indexes(outdir, jobs, jax.process_count())
    return counts
