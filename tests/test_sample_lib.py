"""sample_lib: prompts files, validation with file:line errors, sharding, PNG + index output, resume."""

import json
import os

import numpy as np
import pytest

from sdxl_jax import sample_lib

DEFAULTS = dict(seed=7, height=64, width=32, steps=4, guidance=5.0, sampler="euler")


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


def fake_generate(calls):
    """Stands in for Pipeline.generate: a deterministic image from each seed, shapes as the real one."""

    def generate(prompts, height, width, steps, guidance, sampler, seed, negative_prompt=None):
        calls.append(dict(prompts=list(prompts), seed=list(seed), negative_prompt=negative_prompt))
        assert len(prompts) == len(seed)
        return np.stack([np.full((height, width, 3), s % 256, np.uint8) for s in seed])

    return generate


def test_txt_file_defaults_and_seeds(tmp_path):
    path = _write(tmp_path, "p.txt", "a cat\n\n  a dog  \na fox\n")
    jobs = sample_lib.read_prompts_file(path, DEFAULTS)
    assert [j.prompt for j in jobs] == ["a cat", "a dog", "a fox"]
    assert [j.seed for j in jobs] == [7, 8, 9]  # defaults["seed"] + job index, blank lines skipped
    assert [j.where for j in jobs] == [f"{path}:1", f"{path}:3", f"{path}:4"]
    assert {j.settings() for j in jobs} == {(64, 32, 4, 5.0, "euler", True)}


def test_jsonl_per_line_options(tmp_path):
    lines = [
        {"prompt": "a"},
        {
            "prompt": "b",
            "seed": 3,
            "height": 128,
            "sampler": "dpmpp_2m",
            "negative_prompt": "blurry",
            "guidance": 7,
            "steps": 9,
        },
    ]
    path = _write(tmp_path, "p.jsonl", "\n".join(json.dumps(x) for x in lines))
    a, b = sample_lib.read_prompts_file(path, DEFAULTS)
    assert (a.seed, a.height, a.sampler, a.negative_prompt) == (7, 64, "euler", None)
    assert (b.seed, b.height, b.width, b.steps, b.guidance, b.sampler, b.negative_prompt) == (
        3,
        128,
        32,
        9,
        7,
        "dpmpp_2m",
        "blurry",
    )
    assert a.file != b.file and a.file.endswith(".png")


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"prompt": "ok"}\n{"prompt": "x",\n', "p.jsonl:2: malformed JSON"),
        ('{"prompt": "ok"}\n\n{"prompt": "x", "sampler": "ddim"}\n', "p.jsonl:3: unknown sampler 'ddim'"),
        ('{"prompt": "x", "cfg": 3}\n', "p.jsonl:1: unknown option(s) ['cfg']"),
        (
            '{"prompt": "x", "height": 100}\n',
            "p.jsonl:1: height=100 must be a positive integer multiple of 8",
        ),
        ('{"prompt": "x", "width": 512.0}\n', "p.jsonl:1: width=512.0 must be"),
        ('{"prompt": "x", "steps": 0}\n', "p.jsonl:1: steps=0 must be"),
        ('{"prompt": "x", "guidance": "high"}\n', "p.jsonl:1: guidance='high'"),
        ('{"prompt": "x", "seed": -1}\n', "p.jsonl:1: seed=-1"),
        ('["x"]\n', 'p.jsonl:1: each line must be a JSON object with a "prompt" key'),
        ('{"prompt": "   "}\n', "p.jsonl:1: empty prompt"),
        ("\n\n", "no prompts"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, text, message):
    path = _write(tmp_path, "p.jsonl", text)
    with pytest.raises(sample_lib.PromptsError) as e:
        sample_lib.read_prompts_file(path, DEFAULTS)
    assert message in str(e.value)


def test_bad_files_and_flags(tmp_path):
    with pytest.raises(sample_lib.PromptsError, match="must end in .txt"):
        sample_lib.read_prompts_file(_write(tmp_path, "p.csv", "a"), DEFAULTS)
    with pytest.raises(sample_lib.PromptsError, match="no such prompts file"):
        sample_lib.read_prompts_file(str(tmp_path / "missing.txt"), DEFAULTS)
    with pytest.raises(sample_lib.PromptsError, match="command-line flags: unknown sampler 'eulerr'"):
        sample_lib.jobs_from_prompts(["a", "b"], dict(DEFAULTS, sampler="eulerr"))
    with pytest.raises(sample_lib.PromptsError, match="command-line flags: height=1001"):
        sample_lib.read_prompts_file(_write(tmp_path, "p.txt", "a"), dict(DEFAULTS, height=1001))
    with pytest.raises(sample_lib.PromptsError, match="--prompt 2: empty prompt"):
        sample_lib.jobs_from_prompts(["a", " "], DEFAULTS)
    with pytest.raises(sample_lib.PromptsError, match="not both"):
        sample_lib.run(weights="w", outdir=str(tmp_path), prompts=["a"], prompts_file="p.txt", **DEFAULTS)
    with pytest.raises(sample_lib.PromptsError, match="--refiner_strength needs --refiner"):
        sample_lib.run(weights="w", outdir=str(tmp_path), prompts=["a"], refiner_strength=0.15, **DEFAULTS)


def test_samplers_match_the_library():
    samplers = pytest.importorskip("sdxl_jax.diffusion.samplers")
    names = getattr(samplers, "SAMPLERS", None)
    if names is None:
        pytest.skip("sdxl_jax.diffusion.samplers exposes no SAMPLERS tuple to compare with")
    assert set(sample_lib.SAMPLERS) == set(names)


def test_shard_and_batches():
    jobs = sample_lib.jobs_from_prompts([f"p{i}" for i in range(10)], DEFAULTS)
    shards = [sample_lib.shard(jobs, i, 3) for i in range(3)]
    assert sorted(j.index for s in shards for j in s) == list(range(10))
    assert [len(s) for s in shards] == [4, 3, 3]
    mixed = jobs[:3] + [sample_lib.Job(**dict(jobs[3].__dict__, height=128))]
    got = [[j.index for j in b] for b in sample_lib.batches(mixed, 2)]
    assert got == [[0, 1], [2], [3]]  # one settings group per compiled shape


def test_png_metadata_roundtrip(tmp_path):
    path = str(tmp_path / "x.png")
    meta = {"prompt": "ünïcode ✓", "seed": 3, "guidance": 5.0}
    img = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    sample_lib.write_png(path, img, meta)
    from PIL import Image

    with Image.open(path) as im:
        np.testing.assert_array_equal(np.asarray(im), img)
    assert sample_lib.read_png_parameters(path) == meta
    assert os.listdir(tmp_path) == ["x.png"]  # no temp file left behind


def test_run_jobs_kill_and_resume(tmp_path):
    jobs = sample_lib.jobs_from_prompts([f"prompt {i}" for i in range(20)], DEFAULTS)
    calls = []
    gen = fake_generate(calls)

    def dies_after_two_batches(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the job is killed half-way
        return gen(*args, **kwargs)

    with pytest.raises(KeyboardInterrupt):
        sample_lib.run_jobs(
            dies_after_two_batches, jobs, str(tmp_path), batch_size=5, num_devices=8, progress=False
        )
    # batch_size 5 rounds up to the 8 devices: two batches of 8 were written before the kill.
    pngs = sorted(f for f in os.listdir(tmp_path) if f.endswith(".png"))
    assert len(pngs) == 16
    index = [json.loads(x) for x in open(tmp_path / "samples.jsonl")]
    assert sorted(r["file"] for r in index) == pngs

    calls.clear()
    counts = sample_lib.run_jobs(gen, jobs, str(tmp_path), batch_size=5, num_devices=8, progress=False)
    assert counts == {"total": 20, "skipped": 16, "written": 4}
    # Only the missing four were generated, padded with copies of the last one to fill 8 devices.
    assert len(calls) == 1 and calls[0]["prompts"][:4] == [f"prompt {i}" for i in range(16, 20)]
    assert len(calls[0]["prompts"]) == 8 and calls[0]["negative_prompt"] is None
    index = [json.loads(x) for x in open(tmp_path / "samples.jsonl")]
    assert len(index) == 20 and [r["prompt"] for r in index] == [f"prompt {i}" for i in range(20)]
    for r in index:
        assert {"prompt", "file", "seed", "steps", "guidance", "sampler"} <= set(r)
        assert sample_lib.read_png_parameters(str(tmp_path / r["file"]))["seed"] == r["seed"]
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]

    calls.clear()
    assert (
        sample_lib.run_jobs(gen, jobs, str(tmp_path), batch_size=5, num_devices=8, progress=False)["written"]
        == 0
    )
    assert not calls


def test_multi_host_shares_and_merge(tmp_path):
    jobs = sample_lib.jobs_from_prompts([f"p{i}" for i in range(7)], DEFAULTS)
    for host in range(2):
        sample_lib.run_jobs(
            fake_generate([]),
            jobs,
            str(tmp_path),
            batch_size=4,
            num_devices=1,
            process_index=host,
            process_count=2,
            progress=False,
        )
    sample_lib.merge_indexes(str(tmp_path), jobs, 2)
    index = [json.loads(x) for x in open(tmp_path / "samples.jsonl")]
    assert [r["prompt"] for r in index] == [f"p{i}" for i in range(7)]
    assert not (tmp_path / "samples.0.jsonl").exists()


def test_progress_reports_rate():
    import io

    out = io.StringIO()
    bar = sample_lib.Progress(4, stream=out)
    bar.update(2)
    bar.update(2)
    assert "4/4" in out.getvalue() and "images/s" in out.getvalue() and out.getvalue().endswith("\n")


def test_sample_py_stops_on_bad_input_before_loading(tmp_path):
    """The entry point: a malformed line is reported with file and line, exit status 2, nothing loaded."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = _write(tmp_path, "p.jsonl", '{"prompt": "ok"}\n{"prompt": "x", "height": 1000, "width": 513}\n')
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(root, "sample.py"),
            f"--weights={tmp_path}/missing",
            f"--prompts_file={path}",
            f"--outdir={tmp_path}/out",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=root,
    )
    assert out.returncode == 2, out.stderr
    assert f"error: {path}:2: width=513 must be a positive integer multiple of 8" in out.stderr
    assert not os.path.exists(tmp_path / "out")
    ok = _write(tmp_path, "ok.txt", "a cat\n")
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(root, "sample.py"),
            f"--weights={tmp_path}/missing",
            f"--prompts_file={ok}",
            f"--outdir={tmp_path}/out",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert out.returncode == 2, out.stderr
    assert f"error: {tmp_path}/missing: no such file or folder" in out.stderr


# ------------------------------------------------------------------------------- gs:// output (mocked)


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """epath with gs://bucket/x stored at tmp_path/gcs/bucket/x; the test runs in an empty tmp cwd, where
    the old os.path code would have made a local "gs:" folder. Nothing reaches the network."""
    from etils.epath import gpath, testing

    root = tmp_path / "gcs"
    root.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    def local(p):
        p = os.fspath(p)
        return str(root / p[len("gs://") :]) if p.startswith("gs://") else p

    def one(fn, p, *args, **kwargs):
        return fn(local(p), *args, **kwargs)

    def two(fn, p, dst, *args, **kwargs):
        return fn(local(p), local(dst), *args, **kwargs)

    # With TensorFlow installed epath sends gs:// straight to tf.io.gfile, past the mocked backends.
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
    fns = dict.fromkeys(["open", "exists", "isdir", "listdir", "makedirs", "mkdir", "remove", "stat"], one)
    with testing.mock_epath(**fns, rename=two, replace=two, copy=two):
        yield root


def test_run_jobs_gcs_outdir_and_resume(fake_gcs):
    out, bucket = "gs://bucket/run/eval", fake_gcs / "bucket" / "run" / "eval"
    jobs = sample_lib.jobs_from_prompts([f"prompt {i}" for i in range(5)], DEFAULTS)
    calls = []
    counts = sample_lib.run_jobs(fake_generate(calls), jobs, out, batch_size=2, progress=False)
    assert counts == {"total": 5, "skipped": 0, "written": 5}
    assert sorted(os.listdir(bucket)) == sorted([j.file for j in jobs] + ["samples.jsonl"])
    index = [json.loads(x) for x in (bucket / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in index] == [f"prompt {i}" for i in range(5)]
    assert sample_lib.read_png_parameters(f"{out}/{jobs[3].file}")["seed"] == jobs[3].seed

    (bucket / jobs[1].file).unlink()
    calls.clear()
    counts = sample_lib.run_jobs(fake_generate(calls), jobs, out, batch_size=2, progress=False)
    assert counts == {"total": 5, "skipped": 4, "written": 1}
    assert [c["prompts"] for c in calls] == [["prompt 1", "prompt 1"]]
    assert os.listdir() == []  # the cwd: no local "gs:" folder


def test_multi_host_merge_on_gcs(fake_gcs):
    out, bucket = "gs://bucket/eval", fake_gcs / "bucket" / "eval"
    jobs = sample_lib.jobs_from_prompts([f"p{i}" for i in range(5)], DEFAULTS)
    for host in range(2):
        sample_lib.run_jobs(
            fake_generate([]), jobs, out, batch_size=4, process_index=host, process_count=2, progress=False
        )
    assert {"samples.0.jsonl", "samples.1.jsonl"} <= set(os.listdir(bucket))
    sample_lib.merge_indexes(out, jobs, 2)
    assert sorted(f for f in os.listdir(bucket) if f.endswith(".jsonl")) == ["samples.jsonl"]
    assert len((bucket / "samples.jsonl").read_text().splitlines()) == 5
    assert os.listdir() == []


def test_training_preview_to_gcs_workdir(fake_gcs, monkeypatch):
    """preview.py with the pipeline faked: PNGs land in gs://.../samples with their metadata."""
    from types import SimpleNamespace as NS

    from sdxl_jax import pipeline, preview, tokenizer

    class FakePipeline:
        def __init__(self, *args, **kwargs):
            pass

        def generate(self, prompts, height, width, seed, **kwargs):
            return np.stack([np.full((height, width, 3), seed + i, np.uint8) for i in range(len(prompts))])

    monkeypatch.setattr(pipeline, "Stage", lambda *args: None)
    monkeypatch.setattr(pipeline, "Pipeline", FakePipeline)
    monkeypatch.setattr(tokenizer, "load_pair", lambda: None)
    sample = NS(
        prompts=("a cat", "a dog"), height=16, width=8, steps=2, guidance=5.0, sampler="euler", seed=3
    )
    logged = []
    fn = preview.make_preview_fn(
        NS(models=NS(unet=None, conditioner=None, vae=None)),
        NS(sample=sample),
        "gs://bucket/run",
        NS(images=lambda tag, images, step: logged.append((tag, images.shape, step))),
    )
    fn(NS(ema_params={"w": np.zeros(2)}), {"text": {}, "vae": {}}, 40)
    samples = fake_gcs / "bucket" / "run" / "samples"
    assert sorted(os.listdir(samples)) == ["step00000040_00.png", "step00000040_01.png"]
    meta = sample_lib.read_png_parameters("gs://bucket/run/samples/step00000040_01.png")
    assert (meta["prompt"], meta["seed"], meta["step"]) == ("a dog", 4, 40)
    assert logged == [("samples", (2, 16, 8, 3), 40)]
    assert os.listdir() == []
