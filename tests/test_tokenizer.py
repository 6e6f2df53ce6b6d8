"""sdxl_jax.tokenizer against transformers' CLIPTokenizer (stored ids, tests/data/tokenizer/README.md)."""

import json
import os
import pickle
import time

import numpy as np
import pytest

from sdxl_jax import tokenizer

DATA = os.path.join(os.path.dirname(__file__), "data", "tokenizer")


@pytest.fixture(scope="module")
def pair():
    return tokenizer.load_pair()


def _reference():
    with open(os.path.join(DATA, "prompts.json"), encoding="utf-8") as f:
        prompts = json.load(f)
    with open(os.path.join(DATA, "reference_ids.json"), encoding="utf-8") as f:
        ref = json.load(f)
    return prompts, {k: np.asarray(v, np.int32) for k, v in ref.items()}


def test_bundled_vocabulary_matches_openai_ids(pair):
    vocab, merges = tokenizer.bundled_vocab()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407 and vocab["!"] == 0
    # Ids published with OpenAI CLIP: an anchor independent of our vocab.json derivation.
    ids = pair(["a photo of a cat", "a photo of a dog"])
    assert ids["ids_l"][:, :7].tolist() == [[49406, 320, 1125, 539, 320, 2368, 49407],
                                            [49406, 320, 1125, 539, 320, 1929, 49407]]


def test_ids_equal_reference(pair):
    prompts, ref = _reference()
    out = pair(prompts)
    for key in ("ids_l", "ids_g"):
        assert out[key].dtype == np.int32 and out[key].shape == (len(prompts), 77)
        for i, p in enumerate(prompts):
            np.testing.assert_array_equal(out[key][i], ref[key][i], err_msg=f"{key} prompt {i}: {p!r}")


def test_padding_and_truncation(pair):
    out = pair(["cat", "dog " * 200])
    assert out["ids_l"][0, :3].tolist() == [49406, 2368, 49407] and (out["ids_l"][0, 3:] == 49407).all()
    assert out["ids_g"][0, :3].tolist() == [49406, 2368, 49407] and (out["ids_g"][0, 3:] == 0).all()
    for key in ("ids_l", "ids_g"):  # truncation keeps the end token in the last slot
        assert out[key][1, 0] == 49406 and out[key][1, 76] == 49407 and (out[key][1, 1:76] == 1929).all()


def test_folder_loading_and_pad_token(tmp_path, pair):
    for sub, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        tokenizer.write_vocab_files(str(tmp_path / sub))
        with open(tmp_path / sub / "tokenizer_config.json", "w") as f:
            json.dump({"pad_token": pad}, f)
    from_folder = tokenizer.load_pair(str(tmp_path))
    prompts, ref = _reference()
    out = from_folder(prompts)
    np.testing.assert_array_equal(out["ids_l"], ref["ids_l"])
    np.testing.assert_array_equal(out["ids_g"], ref["ids_g"])


def test_bad_vocabularies_are_errors(tmp_path):
    with pytest.raises(tokenizer.TokenizerError, match="tokenizer_2"):
        tokenizer.load_pair(str(tmp_path))  # not a diffusers folder
    for sub in ("tokenizer", "tokenizer_2"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "vocab.json").write_text("{}")
        (tmp_path / sub / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(tokenizer.TokenizerError, match="not the CLIP vocabulary"):
        tokenizer.load_pair(str(tmp_path))  # empty vocabulary
    tokenizer.write_vocab_files(str(tmp_path / "tokenizer_2"))
    tokenizer.write_vocab_files(str(tmp_path / "tokenizer"))
    vocab = json.loads((tmp_path / "tokenizer" / "vocab.json").read_text())
    del vocab["<|endoftext|>"]
    (tmp_path / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(tokenizer.TokenizerError, match="not the CLIP vocabulary"):
        tokenizer.load_pair(str(tmp_path))  # wrong vocabulary
    tokenizer.write_vocab_files(str(tmp_path / "tokenizer"))
    (tmp_path / "tokenizer" / "merges.txt").write_text("#version: 0.2\nx y\n")
    with pytest.raises(tokenizer.TokenizerError, match="merges"):
        tokenizer.load_pair(str(tmp_path))


def test_picklable_and_fast(pair):
    prompts, ref = _reference()
    clone = pickle.loads(pickle.dumps(pair))
    np.testing.assert_array_equal(clone(prompts)["ids_g"], ref["ids_g"])
    batch = ["a watercolor painting of a fox in a snowy forest, highly detailed"] * 256
    start = time.perf_counter()
    clone(batch)
    # Cached word BPE: a 256-prompt batch costs well under a millisecond per prompt even on a busy CPU.
    assert (time.perf_counter() - start) / len(batch) < 1e-3
