"""The evaluation prompts of the embedded default: every held-out combination plus as many seen ones.

    python -m sdxl_jax.eval.prompts --holdout "red circle blue,..." --out prompts.jsonl [--per_prompt 2]

writes a sample.py prompts file (one {"prompt", "seed"} object per line). Seen combinations are drawn
deterministically from the ones training can produce (colour != background, not held out), cycling
through the colours so each colour is tested as object and as background; a fixed seed per image keeps
reruns comparable.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import numpy as np

from sdxl_jax.data import shapes


def seen_combinations(holdout, n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """n (colour, shape, background) triples that training shows, spread over the colours."""
    held = shapes.parse_holdout(holdout) if isinstance(holdout, str) else frozenset(holdout)
    colors = list(shapes.COLORS)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        color = colors[i % len(colors)]
        while True:
            shape = shapes.SHAPES[rng.integers(len(shapes.SHAPES))]
            background = colors[rng.integers(len(colors))]
            triple = (color, shape, background)
            if background != color and triple not in held and triple not in out:
                break
        out.append(triple)
    return out


def prompt_records(holdout, per_prompt: int = 2, num_seen: int | None = None) -> list[dict]:
    """Held-out triples first (sorted), then num_seen (default: as many) seen ones; per_prompt seeds each."""
    held = sorted(shapes.parse_holdout(holdout) if isinstance(holdout, str) else holdout)
    seen = seen_combinations(held, len(held) if num_seen is None else num_seen)
    seeds = itertools.count()
    return [
        {"prompt": shapes.caption(shape, color, background), "seed": next(seeds)}
        for color, shape, background in held + seen
        for _ in range(per_prompt)
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sdxl_jax.eval.prompts", description=__doc__.split("\n")[0])
    parser.add_argument("--holdout", required=True, help='data.shapes_holdout, e.g. "red circle blue,..."')
    parser.add_argument("--out", required=True, help="the .jsonl prompts file to write")
    parser.add_argument("--per_prompt", type=int, default=2, help="images (seeds) per prompt")
    parser.add_argument("--num_seen", type=int, default=None,
                        help="seen prompts (default: as many as held out)")
    args = parser.parse_args(argv)
    try:
        records = prompt_records(args.holdout, args.per_prompt, args.num_seen)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with open(args.out, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    print(f"wrote {len(records)} prompts to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
