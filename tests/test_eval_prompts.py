"""The embedded default's evaluation prompts: every held-out triple, seen triples that training shows."""

import json

import pytest

from configs import shapes as shapes_config
from sdxl_jax.data import shapes
from sdxl_jax.eval import prompts
from sdxl_jax.eval import shapes as ev


def test_records_cover_holdout_and_seen():
    held = shapes.parse_holdout(shapes_config.HOLDOUT)
    records = prompts.prompt_records(shapes_config.HOLDOUT, per_prompt=2)
    triples = [ev.parse_prompt(r["prompt"]) for r in records]
    assert len(records) == 4 * len(held)
    assert set(triples[: 2 * len(held)]) == held
    seen = set(triples[2 * len(held):])
    assert len(seen) == len(held) and not seen & held
    assert all(c != b for c, _, b in seen)
    assert {c for c, _, _ in seen} == set(list(shapes.COLORS)[: len(held)])
    assert len({r["seed"] for r in records}) == len(records)  # every image its own noise


def test_command_line(tmp_path):
    out = tmp_path / "p.jsonl"
    assert prompts.main(["--holdout", "red circle blue", "--out", str(out), "--per_prompt", "1",
                         "--num_seen", "3"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0] == {"prompt": "a red circle on a blue background", "seed": 0} and len(lines) == 4
    assert prompts.main(["--holdout", "red blob blue", "--out", str(out)]) == 2


@pytest.mark.parametrize("n", [1, 20])
def test_seen_combinations_are_deterministic(n):
    a = prompts.seen_combinations(shapes_config.HOLDOUT, n)
    assert a == prompts.seen_combinations(shapes_config.HOLDOUT, n) and len(set(a)) == n
