"""CLIP BPE tokenizer for SDXL's two text encoders, pure Python + numpy, offline.

Reproduces transformers' `CLIPTokenizer` (the tokenizers-backed one diffusers' SDXL pipelines load):
NFC, runs of whitespace -> " ", per-character lower-casing, the CLIP split regex, byte-level symbols,
BPE with a "</w>" end-of-word suffix; then <|startoftext|> ids <|endoftext|>, truncated to 77 with the
end token kept, padded per encoder (SPEC.md: CLIP-L pads with 49407, OpenCLIP bigG with 0 = "!").
Special tokens (incl. the pad token) are matched on the raw text before normalisation, as HF's added
vocabulary does.
Note: no ftfy / html.unescape (open_clip's own tokenizer applies them; HF's does not).

The bundled vocabulary is open_clip's bpe_simple_vocab_16e6.txt.gz (MIT, OpenAI), from which the 49408
ids are derived exactly as OpenAI/HF do: 256 byte symbols, the same with "</w>", 48894 merges, then
<|startoftext|> (49406) and <|endoftext|> (49407).

    tok = load_pair()                     # or load_pair("path/to/diffusers_folder")
    tok(["a photo of a cat"])             # {"ids_l": int32 (B, 77), "ids_g": int32 (B, 77)}
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import unicodedata
from collections.abc import Sequence

import numpy as np
import regex

BUNDLED_BPE = os.path.join(os.path.dirname(__file__), "assets", "bpe_simple_vocab_16e6.txt.gz")
VOCAB_SIZE = 49408
NUM_MERGES = 49152 - 256 - 2  # open_clip/OpenAI keep this many merges of the file
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
BOS_ID, EOS_ID = 49406, 49407
CONTEXT_LENGTH = 77
PAD_L, PAD_G = EOS, "!"  # diffusers SDXL tokenizer/ and tokenizer_2/

# transformers' CLIPTokenizer pre-tokenizer split (the special-token alternatives are handled before it).
_SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
_SPACES = regex.compile(r"\s+")
_NO_MERGE = 1 << 62


class TokenizerError(ValueError):
    """A vocabulary that cannot be used; the message says what to do."""


@functools.cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode map (printable bytes map to themselves)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def bundled_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) derived from the bundled BPE file exactly as OpenAI's CLIP / HF's vocab.json do."""
    with gzip.open(BUNDLED_BPE, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(m.split()) for m in lines[1 : NUM_MERGES + 1]]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_vocab_files(folder: str) -> None:
    """Writes vocab.json + merges.txt (HF layout) for the bundled vocabulary, e.g. into a diffusers
    folder's tokenizer/ and tokenizer_2/."""
    vocab, merges = bundled_vocab()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def _read_folder(folder: str) -> tuple[dict[str, int], list[tuple[str, str]], str | None]:
    """(vocab, merges, pad token or None) from an HF tokenizer folder; validates what it reads."""
    vocab_path, merges_path = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    if not (os.path.isfile(vocab_path) and os.path.isfile(merges_path)):
        present = sorted(os.listdir(folder)) if os.path.isdir(folder) else "folder missing"
        raise TokenizerError(f"{folder}: needs vocab.json and merges.txt (found: {present}); "
                             "pass path=None to use the bundled CLIP vocabulary")
    try:
        with open(vocab_path, encoding="utf-8") as f:
            vocab = json.load(f)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{vocab_path}: invalid JSON ({e})") from e
    with open(merges_path, encoding="utf-8") as f:
        lines = [ln for ln in f.read().split("\n") if ln and not ln.startswith("#version")]
    merges = [tuple(ln.split()) for ln in lines]
    if any(len(m) != 2 for m in merges):
        raise TokenizerError(f"{merges_path}: every line must be two symbols separated by a space")
    pad = None
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        p = os.path.join(folder, name)
        if pad is None and os.path.isfile(p):
            with open(p, encoding="utf-8") as f:
                pad = json.load(f).get("pad_token")
            if isinstance(pad, dict):  # AddedToken serialised as {"content": ...}
                pad = pad.get("content")
    return vocab, merges, pad


def _validate(vocab: dict[str, int], merges: list[tuple[str, str]], where: str) -> None:
    # A wrong or empty vocabulary would silently produce garbage ids; SDXL's encoders need exactly CLIP's.
    if len(vocab) != VOCAB_SIZE or vocab.get(BOS) != BOS_ID or vocab.get(EOS) != EOS_ID:
        raise TokenizerError(
            f"{where}: not the CLIP vocabulary SDXL needs ({len(vocab)} tokens, {BOS}={vocab.get(BOS)}, "
            f"{EOS}={vocab.get(EOS)}; expected {VOCAB_SIZE}, {BOS_ID}, {EOS_ID}). Use the model's own "
            "tokenizer/ folder or path=None for the bundled vocabulary")
    missing = [m for m in merges[:1000] + merges[-1000:] if "".join(m) not in vocab]
    if missing or len(merges) < NUM_MERGES:
        raise TokenizerError(f"{where}: merges.txt does not match vocab.json ({len(merges)} merges, "
                             f"merged symbols missing from the vocabulary: {missing[:3]})")


class CLIPTokenizer:
    """One CLIP BPE tokenizer with a fixed context length and pad id; picklable, caches word BPE."""

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], pad_token: str,
                 context_length: int = CONTEXT_LENGTH):
        if pad_token not in vocab:
            raise TokenizerError(f"pad token {pad_token!r} is not in the vocabulary")
        self.encoder = dict(vocab)
        self.bpe_ranks = {tuple(m): i for i, m in enumerate(merges)}
        self.pad_id = self.encoder[pad_token]
        self.bos_id, self.eos_id = self.encoder[BOS], self.encoder[EOS]
        self.context_length = context_length
        self._byte_encoder = _bytes_to_unicode()
        # HF registers the pad token as a special token too, so tokenizer_2 turns every "!" of a prompt into
        # id 0 instead of BPE-merging it (diffusers' SDXL behaviour; open_clip's tokenizer does not).
        self._specials = {t: self.encoder[t] for t in (BOS, EOS, pad_token)}
        self._special_split = regex.compile("(" + "|".join(map(regex.escape, self._specials)) + ")")
        self._cache: dict[str, list[int]] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = {}  # worker processes rebuild their own
        return state

    def _bpe(self, word: str) -> list[int]:
        """Ids of one pre-tokenized word (already byte-level symbols), merging lowest rank first."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = zip(symbols[:-1], symbols[1:], strict=True)
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, _NO_MERGE))
            if best not in self.bpe_ranks:
                break
            first, second = best
            merged, i = [], 0
            while i < len(symbols):  # merge every non-overlapping occurrence, left to right
                if i < len(symbols) - 1 and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        unk = self.eos_id  # HF's unk token is <|endoftext|>; unreachable with a byte-complete vocab
        ids = [self.encoder.get(s, unk) for s in symbols]
        if len(self._cache) < 200_000:
            self._cache[word] = ids
        return ids

    def _normalize(self, text: str) -> str:
        text = _SPACES.sub(" ", unicodedata.normalize("NFC", text))
        # tokenizers lower-cases character by character (no Greek final-sigma rule, unlike str.lower()).
        return "".join(c.lower() for c in text) if "Σ" in text else text.lower()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without start/end tokens and without truncation."""
        ids: list[int] = []
        for part in self._special_split.split(text):
            if part in self._specials:
                ids.append(self._specials[part])
                continue
            for word in _SPLIT.findall(self._normalize(part)):
                ids.extend(self._bpe("".join(self._byte_encoder[b] for b in word.encode("utf-8"))))
        return ids

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        """int32 (B, context_length): start, ids truncated to context_length - 2, end, padding."""
        if isinstance(prompts, str):
            raise TypeError("pass a list of prompts, not a single string")
        out = np.full((len(prompts), self.context_length), self.pad_id, np.int32)
        for row, text in enumerate(prompts):
            ids = [self.bos_id] + self.encode(text)[: self.context_length - 2] + [self.eos_id]
            out[row, : len(ids)] = ids
        return out


class TokenizerPair:
    """The two SDXL tokenizers; `pair(prompts)` -> {"ids_l", "ids_g"} int32 (B, 77). Picklable."""

    def __init__(self, tok_l: CLIPTokenizer, tok_g: CLIPTokenizer):
        self.tok_l, self.tok_g = tok_l, tok_g

    def __call__(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        prompts = list(prompts)
        return {"ids_l": self.tok_l(prompts), "ids_g": self.tok_g(prompts)}


def _load_one(folder: str | None, default_pad: str) -> CLIPTokenizer:
    if folder is None:
        vocab, merges = bundled_vocab()
        pad = default_pad
    else:
        vocab, merges, pad = _read_folder(folder)
        pad = pad or default_pad
    _validate(vocab, merges, folder or BUNDLED_BPE)
    return CLIPTokenizer(vocab, merges, pad)


def load_pair(path: str | None = None) -> TokenizerPair:
    """Both SDXL tokenizers: bundled vocabulary (path=None) or a diffusers folder's tokenizer/ and
    tokenizer_2/ (vocab.json + merges.txt, pad token from tokenizer_config.json when it names one)."""
    if path is None:
        tok_l = _load_one(None, PAD_L)
        return TokenizerPair(tok_l, CLIPTokenizer(tok_l.encoder, _merges_of(tok_l), PAD_G))
    l_folder, g_folder = os.path.join(path, "tokenizer"), os.path.join(path, "tokenizer_2")
    if not os.path.isdir(g_folder):
        raise TokenizerError(f"{path}: expected a diffusers folder with tokenizer_2/ (and tokenizer/ for the "
                             "base); pass path=None to use the bundled CLIP vocabulary")
    tok_g = _load_one(g_folder, PAD_G)
    if os.path.isdir(l_folder):
        tok_l = _load_one(l_folder, PAD_L)
    else:  # the refiner ships only tokenizer_2/; both encoders share the vocabulary (SPEC.md)
        tok_l = CLIPTokenizer(tok_g.encoder, _merges_of(tok_g), PAD_L)
    return TokenizerPair(tok_l, tok_g)


def _merges_of(tok: CLIPTokenizer) -> list[tuple[str, str]]:
    return sorted(tok.bpe_ranks, key=tok.bpe_ranks.__getitem__)
