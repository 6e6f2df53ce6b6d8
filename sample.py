"""Prompts -> PNGs with SDXL (diffusers folder, sgm single file or a training workdir).

  python sample.py --weights=stabilityai/sdxl-base --prompt="a red fox in snow" --outdir=/tmp/out
  python sample.py --weights=W --refiner=R --refiner_strength=0.15 --prompts_file=prompts.jsonl \\
      --outdir=gs://.../eval --batch_size=4

A .jsonl prompts file holds one object per line: {"prompt": ..., "seed": ..., "height": ..., "width": ...,
"steps": ..., "guidance": ..., "sampler": ..., "negative_prompt": ...}; missing keys take the flag values.
Rerunning the same command skips the images that already exist. See sdxl_jax/sample_lib.py.
"""

import sys

from absl import app, flags

from sdxl_jax import sample_lib
from sdxl_jax.convert.common import CheckpointError

_WEIGHTS = flags.DEFINE_string(
    "weights", None, "base weights: diffusers folder, .safetensors file or workdir"
)
_REFINER = flags.DEFINE_string("refiner", None, "optional refiner weights (diffusers folder or single file)")
_REFINER_STRENGTH = flags.DEFINE_float(
    "refiner_strength",
    None,
    "share of the schedule the refiner runs (the reference uses 0.15); needs --refiner",
)
_PROMPT = flags.DEFINE_multi_string("prompt", [], "a prompt; repeat the flag for several")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, ".txt (one prompt per line) or .jsonl file")
_NEGATIVE = flags.DEFINE_string(
    "negative_prompt",
    None,
    "negative prompt for every image (default: the reference's zeroed unconditional text)",
)
_OUTDIR = flags.DEFINE_string("outdir", "samples", "where the PNGs and samples.jsonl go")
_STEPS = flags.DEFINE_integer("steps", 30, "sampling steps")
_GUIDANCE = flags.DEFINE_float("guidance", 5.0, "classifier-free guidance scale")
_SAMPLER = flags.DEFINE_string("sampler", "euler", f"one of {', '.join(sample_lib.SAMPLERS)}")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the first image; image i uses seed + i unless given")
_HEIGHT = flags.DEFINE_integer("height", 1024, "image height, a multiple of 8")
_WIDTH = flags.DEFINE_integer("width", 1024, "image width, a multiple of 8")
_BATCH = flags.DEFINE_integer(
    "batch_size", 1, "images per compiled call per host (rounded up to a multiple of the local device count)"
)
flags.mark_flag_as_required("weights")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; prompts go in --prompt")
    try:
        counts = sample_lib.run(
            weights=_WEIGHTS.value,
            refiner=_REFINER.value,
            refiner_strength=_REFINER_STRENGTH.value,
            prompts=_PROMPT.value,
            prompts_file=_PROMPTS_FILE.value,
            negative_prompt=_NEGATIVE.value,
            outdir=_OUTDIR.value,
            batch_size=_BATCH.value,
            seed=_SEED.value,
            height=_HEIGHT.value,
            width=_WIDTH.value,
            steps=_STEPS.value,
            guidance=_GUIDANCE.value,
            sampler=_SAMPLER.value,
        )
    except (sample_lib.PromptsError, CheckpointError) as e:  # bad user input, not a crash
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{counts['written']} images written, {counts['skipped']} already there, in {_OUTDIR.value}")


if __name__ == "__main__":
    app.run(main)
