"""Orbax checkpoints of one training stage (one workdir).

Workdir layout:
  config.json                    the stage's config (also stored with every checkpoint)
  checkpoints/<step>/            orbax: params, ema_params, opt_state, meta (step, rng), config (not the
                                 params' compute copy, train_state.TrainState: a restore makes it again)
  data_state/<step>.p<k>.json    data iterator state of process k at that step (each host writes its own)
  frozen/                        frozen VAE + text encoder params, written once when the stage starts

Resuming restores the newest checkpoint that reads back completely; a corrupt or partial newest one is
skipped with a warning (orbax only lists finalized steps, so a write killed half-way never shows up).
The UNet's transformer blocks are stored in the layout the run used (model.scan_blocks); a restore into
the other layout converts them (unet.relayout), so a workdir can resume or seed a stage either way.

Loading a trained model elsewhere (sampling, the next stage):
    config, params = checkpoint.load_params(workdir, which="ema")
    params["unet"]  -> the UNet params (EMA or raw, in the saved block layout), params["vae"], params["text"]
    unet = unet_lib.UNet(unet_lib.PRESETS[config.model.unet]) etc. rebuild the modules from the config;
    unet_lib.relayout(params["unet"], scan) puts the params in that UNet's block layout.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from sdxl_jax import config_lib, paths
from sdxl_jax.models import unet as unet_lib

STATE_ITEMS = ("params", "ema_params", "opt_state", "meta")


class CheckpointNotFoundError(FileNotFoundError):
    pass


def _ckpt_dir(workdir) -> epath.Path:
    return paths.as_path(workdir) / "checkpoints"


def is_workdir(path: str) -> bool:
    return _ckpt_dir(path).is_dir()


def _agreed(flag: bool) -> bool:
    """Host 0's answer on every host: hosts must take the same branch around a collective orbax call."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def write_config(workdir: str, config) -> None:
    if jax.process_index() == 0:
        paths.as_path(workdir).mkdir(parents=True, exist_ok=True)
        _atomic_write(paths.as_path(workdir) / "config.json", config_lib.to_json(config))


def read_config(workdir: str):
    return config_lib.from_json((paths.as_path(workdir) / "config.json").read_text())


def _atomic_write(path, text):
    path = epath.Path(path)
    tmp = path.parent / f"{path.name}.tmp{os.getpid()}"
    tmp.write_text(text)
    tmp.replace(path)


def _split(state) -> dict:
    return {
        "params": state.params,
        "ema_params": state.ema_params,
        "opt_state": state.opt_state,
        "meta": {"step": state.step, "rng": state.rng},
    }


class Checkpointer:
    """Saves and restores the train state + data iterator state of one workdir."""

    def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
        self.workdir = str(paths.as_path(workdir))
        self.data_dir = paths.as_path(workdir) / "data_state"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        self.manager = ocp.CheckpointManager(
            _ckpt_dir(workdir), options=options, item_names=(*STATE_ITEMS, "config")
        )

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_state, config, *, force: bool = False) -> bool:
        """Asynchronous save (returns once the arrays are copied off the devices)."""
        if step in self.manager.all_steps():
            return False
        if data_state is not None:
            _atomic_write(self._data_path(step), json.dumps(_jsonable(data_state)))
        args = {k: ocp.args.StandardSave(v) for k, v in _split(state).items()}
        args["config"] = ocp.args.JsonSave(json.loads(config_lib.to_json(config)))
        saved = self.manager.save(step, args=ocp.args.Composite(**args), force=force)
        self._prune_data_states()
        return saved

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def restore_latest(self, abstract_state):
        """-> (state, data_state, step) from the newest readable checkpoint, or None if there is none.

        `abstract_state` is the TrainState of jax.ShapeDtypeStruct with shardings; arrays come back
        sharded like it.
        """
        like = _split(abstract_state)
        for step in reversed(self.steps()):
            try:
                target = unet_lib.relayout(like, self._saved_scanned(step))  # as stored
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(**{k: ocp.args.StandardRestore(v) for k, v in target.items()}),
                )
                restored = _in_layout_of({k: restored[k] for k in target}, like)
            except Exception as e:  # corrupt / partially deleted: fall back to the previous one
                logging.warning(
                    "checkpoint %s/%d could not be restored (%s: %s); trying the previous one",
                    _ckpt_dir(self.workdir),
                    step,
                    type(e).__name__,
                    str(e).splitlines()[0][:300],
                )
                print(f"WARNING: checkpoint step {step} is unreadable ({type(e).__name__}); falling back")
                continue
            state = abstract_state.replace(
                params=restored["params"],
                ema_params=restored["ema_params"],
                opt_state=restored["opt_state"],
                step=restored["meta"]["step"],
                rng=restored["meta"]["rng"],
            )
            if getattr(abstract_state, "compute_params", None) is not None:  # never saved: made again
                from sdxl_jax import train_state

                state = train_state.with_compute_copy(state, abstract_state.compute_params)
            return state, self._read_data_state(step), step
        return None

    def _saved_scanned(self, step) -> bool:
        """Whether checkpoint `step` stored the UNet's blocks scanned (the layout its arrays have on disk)."""
        # The item's own metadata: a manager that has not saved or restored yet reads None for its items.
        with ocp.StandardCheckpointer() as ckptr:
            metadata = ckptr.metadata(_ckpt_dir(self.workdir) / str(step) / "params")
        return unet_lib.is_scanned(_saved_tree(metadata))

    def _data_path(self, step):
        return self.data_dir / f"{step}.p{jax.process_index()}.json"

    def _read_data_state(self, step):
        # A run resumed on more hosts than wrote the checkpoint finds no file for the new hosts: their
        # iterators start from the step alone (the batch is a function of the step, data/pipeline.py).
        path = self._data_path(step)
        if not path.exists():
            return None
        return _unjsonable(json.loads(path.read_text()))

    def _prune_data_states(self):
        # Each host prunes only its own files: hosts pruning each other's race on a shared filesystem.
        keep = set(self.manager.all_steps())
        mine = f".p{jax.process_index()}.json"
        for path in self.data_dir.iterdir():
            step = path.name.split(".")[0]
            newest = max(keep, default=0)
            if path.name.endswith(mine) and step.isdigit() and int(step) not in keep and int(step) < newest:
                path.unlink(missing_ok=True)


def _jsonable(state):
    # Grain iterator states are bytes; keep them as latin-1 text inside the JSON.
    if isinstance(state, bytes):
        return {"__bytes__": state.decode("latin-1")}
    if isinstance(state, dict):
        return {k: _jsonable(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return [_jsonable(v) for v in state]
    if isinstance(state, np.generic):
        return state.item()
    return state


def _unjsonable(state):
    if isinstance(state, dict):
        if set(state) == {"__bytes__"}:
            return state["__bytes__"].encode("latin-1")
        return {k: _unjsonable(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_unjsonable(v) for v in state]
    return state


# ---- frozen models and params for other stages / sampling ----


def save_frozen(workdir: str, frozen: dict) -> None:
    """Writes the frozen models' params once per workdir (blocking)."""
    path = paths.as_path(workdir) / "frozen"
    if _agreed(path.exists()):  # the save below is collective: every host must skip it or none
        return
    if not jax.tree.leaves(frozen):  # e.g. autoencoder training without LPIPS; orbax rejects empty items
        path.mkdir(parents=True, exist_ok=True)
        return
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, frozen)
        ckptr.wait_until_finished()


def _saved_tree(metadata):
    """An orbax item's metadata -> its plain tree of array metadata (the keys as stored)."""
    metadata = getattr(metadata, "item_metadata", metadata)
    return getattr(metadata, "tree", metadata)  # orbax TreeMetadata wraps the plain dict tree


def _in_layout_of(tree, like):
    """Restored arrays in the saved block layout -> the layout and shardings of the abstract `like`;
    unchanged when they already agree.

    Converted on the devices one SpatialTransformer's params at a time (in each of params, EMA and both
    Adam moments), each source deleted once its copy is made, so the restore's peak is the state plus one
    transformer's blocks rather than two states (the base's state on one H100: 38.3 GiB, twice that would
    not fit). Leaves outside the blocks are passed through, moved only if `like` shards them otherwise."""
    scan = unet_lib.is_scanned(like)
    if unet_lib.is_scanned(tree) == scan:
        return tree

    def one(x, want):
        if not unet_lib.holds_blocks(x):
            moved = isinstance(x, jax.Array) and x.sharding != want.sharding
            return jax.device_put(x, want.sharding) if moved else x
        return _relayout_group(x, scan, jax.tree.map(lambda a: a.sharding, want))

    return jax.tree.map(one, tree, like, is_leaf=unet_lib.holds_blocks)


def _relayout_group(group, scan: bool, shardings):
    """One SpatialTransformer's param dict in the other block layout on `shardings`; deletes the source
    arrays (the restored copy nobody else holds)."""
    leaves, treedef = jax.tree.flatten(shardings)
    out = _relayout_program(scan, treedef, tuple(leaves))(group)
    for a in jax.tree.leaves(group):
        if isinstance(a, jax.Array):
            a.delete()
    return out


@functools.lru_cache(maxsize=64)
def _relayout_program(scan: bool, treedef, shardings: tuple):
    """One jitted relayout per target group structure and shardings: the base's 44 groups (11 transformers
    in each of 4 state trees) share one when stacking, two when unstacking (depth 2 and depth 10)."""
    shardings = treedef.unflatten(shardings)
    return jax.jit(functools.partial(unet_lib.relayout, scan=scan), out_shardings=shardings)


def _host_target(metadata, sharding_tree=None):
    metadata = _saved_tree(metadata)
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])

    def one(m, s=None):
        return jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s if s is not None else dev)

    if sharding_tree is None:
        return jax.tree.map(one, metadata)
    return jax.tree.map(one, metadata, sharding_tree)


def load_frozen(workdir: str, shardings=None):
    """-> {"vae": params, "text": params} saved by save_frozen, or None when the workdir has none."""
    path = paths.as_path(workdir) / "frozen"
    if not path.exists():
        return None
    if not any(path.iterdir()):
        return {}
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path, _host_target(ckptr.metadata(path), shardings))


def latest_step(workdir: str) -> int:
    steps = sorted(ocp.utils.checkpoint_steps(_ckpt_dir(workdir))) if is_workdir(workdir) else []
    if not steps:
        raise CheckpointNotFoundError(
            f"{workdir} holds no checkpoint (expected {_ckpt_dir(workdir)}/<step>/); train that stage first "
            "or point init_from at a diffusers folder / .safetensors file"
        )
    return steps[-1]


def restore_params(workdir: str, which: str = "ema_params", like=None, step: int | None = None):
    """(UNet params, step) of a workdir's newest readable checkpoint; `which` is "params" or "ema_params".

    With `like` (abstract params with shardings, e.g. a Setup's abstract_state.params) the arrays land in
    its block layout and shardings; without it, or when the saved params are not that model's (the caller's
    shape check reports it), on the host CPU device as saved.
    """
    if which not in ("params", "ema_params"):
        raise ValueError(f"which={which!r}; choose 'params' or 'ema_params'")
    latest_step(workdir)  # clear error when there is nothing
    steps = (
        [step] if step is not None else sorted(ocp.utils.checkpoint_steps(_ckpt_dir(workdir)), reverse=True)
    )
    last_error = None
    with ocp.StandardCheckpointer() as ckptr:
        for s in steps:
            path = _ckpt_dir(workdir) / str(s) / which
            try:
                saved = _host_target(ckptr.metadata(path))
                wanted = None if like is None else unet_lib.relayout(saved, unet_lib.is_scanned(like))
                if like is None or not _fits(wanted, like):
                    return ckptr.restore(path, saved), s
                target = jax.tree.map(_on, wanted, like)
                target = unet_lib.relayout(target, unet_lib.is_scanned(saved))  # as stored
                return _in_layout_of(ckptr.restore(path, target), like), s
            except Exception as e:  # corrupt newest: fall back like resume does
                logging.warning("could not read %s: %s; trying the previous step", path, e)
                last_error = e
    raise CheckpointNotFoundError(f"no readable checkpoint in {workdir}: {last_error}")


def _on(saved, like):
    """The saved array's shape and dtype on the sharding `like` wants."""
    return jax.ShapeDtypeStruct(saved.shape, saved.dtype, sharding=like.sharding)


def _fits(tree, like) -> bool:
    if jax.tree.structure(tree) != jax.tree.structure(like):
        return False
    return all(a.shape == b.shape for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(like), strict=True))


def load_params(workdir: str, which: str = "ema", step: int | None = None):
    """(config, {"unet": params, "vae": params | None, "text": params | None}) of a training workdir.

    `which` is "ema" (the default, what sampling wants) or "raw". Arrays are host (CPU) jax arrays;
    "vae"/"text" are None when the workdir did not save frozen params (then load them from
    config.init_from / vae_from / text_from). An autoencoder workdir (config.task="autoencoder") gives
    {"unet": None, "vae": its trained VAE (EMA or raw), "text": None}.
    """
    if which not in ("ema", "raw"):
        raise ValueError(f"which={which!r}; choose 'ema' or 'raw'")
    latest_step(workdir)  # a clear error when there is nothing, before reading the config
    config = read_config(workdir)
    trained, _ = restore_params(workdir, "ema_params" if which == "ema" else "params", step=step)
    if config.get("task", "diffusion") == "autoencoder":  # trained {"vae", "disc"}; EMA of the VAE only
        return config, {"unet": None, "vae": trained["vae"], "text": None}
    frozen = load_frozen(workdir) or {}
    return config, {"unet": trained, "vae": frozen.get("vae"), "text": frozen.get("text")}
