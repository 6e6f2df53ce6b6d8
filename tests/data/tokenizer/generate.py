"""Regenerates reference_ids.json: the ids transformers' CLIPTokenizer gives for prompts.json.

    .venv/bin/python tests/data/tokenizer/generate.py

The reference tokenizers are built from vocab.json + merges.txt derived from open_clip's
bpe_simple_vocab_16e6.txt.gz (sdxl_jax.tokenizer.write_vocab_files), with diffusers SDXL's settings:
tokenizer/ pads with <|endoftext|>, tokenizer_2/ with "!"; max_length 77, truncation, padding="max_length".
"""

import json
import os
import tempfile

from transformers import CLIPTokenizer

from sdxl_jax import tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    with open(os.path.join(HERE, "prompts.json"), encoding="utf-8") as f:
        prompts = json.load(f)
    with tempfile.TemporaryDirectory() as d:
        tokenizer.write_vocab_files(d)
        files = dict(vocab_file=os.path.join(d, "vocab.json"), merges_file=os.path.join(d, "merges.txt"))
        ref_l = CLIPTokenizer.from_pretrained(d, pad_token="<|endoftext|>")
        ref_g = CLIPTokenizer.from_pretrained(d, pad_token="!")
        assert len(ref_l) == 49408 and len(ref_g) == 49408, (len(ref_l), files)
        kw = dict(max_length=77, truncation=True, padding="max_length")
        out = {"ids_l": ref_l(prompts, **kw)["input_ids"], "ids_g": ref_g(prompts, **kw)["input_ids"]}
    with open(os.path.join(HERE, "reference_ids.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {len(prompts)} prompts")


if __name__ == "__main__":
    main()
