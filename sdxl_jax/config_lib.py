"""Config validation: a bad config fails here, before any model is built or compiled.

The schema is configs/common.py `base()`: every key a run reads is defined there, so a key that is not
is a typo (STYLE.md 1: unknown keys are errors, defaults live in the config).
"""

from __future__ import annotations

import difflib
import json
import math
import os

import ml_collections as mlc

from sdxl_jax import paths

CHOICES = {
    "task": ("diffusion", "autoencoder"),
    "optim.name": ("adamw", "adam", "sgd"),
    "optim.schedule": ("constant", "cosine", "linear"),
    "optim.mu_dtype": ("float32", "bfloat16"),
    "diffusion.parameterization": ("eps", "v", "edm"),
    "diffusion.weighting": ("eps", "edm", "v", "unit"),
    "diffusion.loss_type": ("l2", "l1"),
    "diffusion.sigma_sampling": ("discrete", "edm"),
    "model.remat": ("none", "full", "dots", "dots_no_batch"),
    "model.attention": ("auto", "xla", "chunked", "cudnn", "splash"),
    "state_layout": ("auto", "compiler", "default"),
    "compute_copy": ("auto", "on", "off"),
}


class ConfigError(ValueError):
    """A config that cannot run; the message says which key and what to change."""


def _schema():
    from configs import common

    return common.base()


def check_known_keys(config, schema=None, prefix=""):
    schema = _schema() if schema is None else schema
    for key in config.keys():
        path = f"{prefix}{key}"
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema.keys()), n=1)
            hint = f" Did you mean {prefix}{close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown config key {path!r}.{hint} Known keys here: {sorted(schema.keys())}. "
                "Every key must be defined in configs/common.py base()."
            )
        if isinstance(schema[key], mlc.ConfigDict):
            if not isinstance(config[key], mlc.ConfigDict):
                raise ConfigError(f"config.{path} must be a section (ConfigDict), got {type(config[key])}")
            check_known_keys(config[key], schema[key], prefix=f"{path}.")


def apply_overrides(config, items):
    """Applies "KEY=VALUE" strings (a dotted key that exists, the value parsed as that key's type) in
    place, for command lines without ml_collections' flags (prepare.py --set, bench/train_step.py --set)."""
    for item in items:
        key, sep, value = item.partition("=")
        *path, leaf = key.split(".")
        node = config
        try:
            for part in path:
                node = node[part]
            old = node[leaf]
        except (KeyError, TypeError):
            raise ConfigError(f"--set {item!r}: config.{key} is not a config key") from None
        if not sep:
            raise ConfigError(f"--set {item!r}: write KEY=VALUE, e.g. optim.mu_dtype=bfloat16")
        if isinstance(old, bool):
            node[leaf] = value == "True"
        else:
            node[leaf] = value if old is None else type(old)(value)


def _get(config, dotted):
    for part in dotted.split("."):
        config = config[part]
    return config


def validate(config, *, num_devices: int, process_count: int = 1) -> None:
    """Raise ConfigError naming the offending key and the fix, or return None."""
    check_known_keys(config)
    for key, choices in CHOICES.items():
        value = _get(config, key)
        if value not in choices:
            raise ConfigError(f"config.{key}={value!r} is not one of {choices}")

    from sdxl_jax import parallel

    try:
        shape = dict(zip(parallel.MESH_AXES, parallel.mesh_shape(config.mesh, num_devices), strict=True))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    shards = math.prod(shape[a] for a in parallel.batch_axes(config))
    batch = int(config.data.batch_size)
    if batch <= 0 or batch % shards:
        raise ConfigError(
            f"config.data.batch_size={batch} is not divisible by the {shards} batch shards of the mesh "
            f"{shape} (axes {parallel.batch_axes(config)}); use a multiple of {shards} or change config.mesh"
        )
    if batch % process_count:
        raise ConfigError(f"config.data.batch_size={batch} must split evenly over {process_count} processes")
    k = config.optim.get("microbatches", 1)
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"config.optim.microbatches={k!r} must be a positive integer (1: no accumulation)")
    if k > 1 and config.task != "diffusion":
        raise ConfigError(
            f"config.optim.microbatches={k} accumulates gradients in the diffusion step only; the "
            f"{config.task} step has none: set config.optim.microbatches=1 and lower config.data.batch_size"
        )
    if batch % (shards * k):
        raise ConfigError(
            f"config.data.batch_size={batch} over {shards} batch shards is {batch // shards} rows per shard, "
            f"which config.optim.microbatches={k} does not divide: each microbatch takes the same number of "
            f"rows from every shard. Use a batch size that is a multiple of {shards * k}, or another "
            "microbatch count"
        )

    for key in ("init_from", "vae_from", "text_from"):
        path = config[key]
        if path and paths.is_remote(path):  # a bucket (gs://): only a training workdir is read from there
            from sdxl_jax import checkpoint

            if not checkpoint.is_workdir(path):
                raise ConfigError(
                    f"config.{key}={path!r} is not a training workdir (no checkpoints/ under it). Official "
                    "weights (.safetensors, a diffusers folder) are read from a local disk: copy them there "
                    f"(gsutil -m cp -r {path} /local/dir) and point config.{key} at the copy"
                )
        elif path and not os.path.exists(path):
            raise ConfigError(
                f"config.{key}={path!r} does not exist; point it at the previous stage's workdir, a "
                "diffusers "
                "folder or a .safetensors file, or set it to '' to start from random weights"
            )
    d = config.diffusion
    if not 0 <= d.min_index < d.max_index <= 1000:
        raise ConfigError(
            f"config.diffusion min_index={d.min_index}, max_index={d.max_index}: need 0 <= min < max <= 1000"
        )
    for key in ("total_steps", "log_every", "checkpoint_every", "sample_every", "keep_checkpoints"):
        if int(config[key]) <= 0:
            raise ConfigError(f"config.{key}={config[key]} must be a positive integer")
    if float(config.data.cover_scale) < 1.0:
        raise ConfigError(f"config.data.cover_scale={config.data.cover_scale} must be >= 1 (1: the image "
                          "just covers its bucket; 2: crops of an image resized to twice the bucket)")
    if not 0.0 <= config.ema.decay < 1.0:
        raise ConfigError(f"config.ema.decay={config.ema.decay} must be in [0, 1)")
    for key in ("steps", "skip"):
        value = config.profile[key]
        if not isinstance(value, int) or value < 0:
            raise ConfigError(f"config.profile.{key}={value!r} must be a non-negative integer (profile.steps "
                              "steps are traced after the run's first profile.skip steps; 0 steps: no trace)")
    if int(config.ema.every) < 1 or int(config.ema.every) != config.ema.every:
        raise ConfigError(f"config.ema.every={config.ema.every} must be a positive integer (1: update the "
                          "EMA after every step; k: after every k-th step, with decay ** k)")
    if config.task == "autoencoder":
        from sdxl_jax.autoencoder import trainer

        try:
            trainer.validate(config)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def to_json(config) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def from_json(text: str) -> mlc.ConfigDict:
    """Rebuild a config saved by to_json (tuples come back as lists, which every reader accepts)."""
    return mlc.ConfigDict(json.loads(text))
