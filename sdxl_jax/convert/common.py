"""Shared pieces of the weight converters: safetensors I/O in numpy, tree flattening, layout transforms.

Conversions are pure functions over flat dicts {name: np.ndarray}. No torch at run time, no pickle.
We read and write the safetensors format ourselves (an 8-byte header length, a JSON header, raw
little-endian bytes) so bf16 tensors load through ml_dtypes, which safetensors' numpy API cannot do.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class CheckpointError(ValueError):
    """A weights file or folder that cannot be used; the message says what to do."""


def read_safetensors(path: str, prefix: str = "") -> dict[str, np.ndarray]:
    """Reads every tensor (or those whose name starts with `prefix`, prefix stripped) as numpy arrays.

    Memory-mapped: only the tensors asked for are read from disk.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file; pass a .safetensors file or a diffusers folder")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not a safetensors file ({e}); convert .ckpt/.bin first") from e
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        if name == "__metadata__" or not name.startswith(prefix):
            continue
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        if end > data.size:
            raise CheckpointError(f"{path}: truncated; tensor {name} ends past the end of the file")
        dtype = _DTYPES[info["dtype"]]
        out[name[len(prefix):]] = np.frombuffer(data[start:end], dtype=dtype).reshape(info["shape"])
    return out


def read_safetensors_metadata(path: str) -> dict[str, str]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)).get("__metadata__", {}) or {}


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: dict | None = None) -> None:
    """Writes tensors in sorted key order, atomically (temp file then rename)."""
    header, offset, arrays = {}, 0, []
    for name in sorted(tensors):
        a = np.ascontiguousarray(np.asarray(tensors[name]))
        if a.dtype not in _NAMES:
            raise CheckpointError(f"cannot store {name} with dtype {a.dtype} in safetensors")
        header[name] = {
            "dtype": _NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]
        }
        offset += a.nbytes
        arrays.append(a)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data section like the reference writer
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.tobytes())
    os.replace(tmp, path)


def flatten(tree: Mapping, sep: str = "/") -> dict[str, np.ndarray]:
    """{"a": {"b": x}} -> {"a/b": x} (Flax params -> flat names)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            for kk, vv in flatten(v, sep).items():
                out[f"{k}{sep}{kk}"] = vv
        else:
            out[k] = v
    return out


def unflatten(flat: Mapping[str, np.ndarray], sep: str = "/") -> dict:
    out: dict = {}
    for k, v in flat.items():
        node = out
        *parents, leaf = k.split(sep)
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def conv_to_flax(w: np.ndarray) -> np.ndarray:
    """PyTorch OIHW -> Flax HWIO."""
    return np.transpose(w, (2, 3, 1, 0))


def conv_to_torch(w: np.ndarray) -> np.ndarray:
    """Flax HWIO -> PyTorch OIHW."""
    return np.transpose(w, (3, 2, 0, 1))


def linear_to_flax(w: np.ndarray) -> np.ndarray:
    """PyTorch Linear (out, in) -> Flax Dense (in, out); also accepts 1x1 conv weights (out, in, 1, 1)."""
    if w.ndim == 4:
        w = w[:, :, 0, 0]
    return np.transpose(w)


def linear_to_torch(w: np.ndarray) -> np.ndarray:
    return np.transpose(w)


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; a diffusers model folder needs its config.json") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e


def find_weights(folder: str, stems=("diffusion_pytorch_model", "model")) -> str:
    """The safetensors file of a diffusers/transformers model folder. Sharded or pickle-only folders are
    errors that say what to do."""
    for stem in stems:
        for variant in ("", ".fp16", ".bf16"):
            p = os.path.join(folder, f"{stem}{variant}.safetensors")
            if os.path.isfile(p):
                return p
    present = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    if any(n.endswith(".safetensors.index.json") for n in present):
        raise CheckpointError(
            f"{folder}: sharded safetensors are not supported yet; merge the shards into one file"
        )
    if any(n.endswith((".bin", ".ckpt", ".pt")) for n in present):
        raise CheckpointError(f"{folder}: only pickle weights found ({present}); we never unpickle — "
                              "convert them to .safetensors with the reference tools first")
    raise CheckpointError(f"{folder}: no {stems[0]}.safetensors found (files: {present})")


def save_json(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
