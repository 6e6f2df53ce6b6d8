"""Executables compiled on another host ahead of time, loaded in place of XLA's compile (the GPU suite).

One XLA:GPU compile of the full base's train step takes minutes of host time (197 s on the H200's host,
session 20), and a lent GPU has 15 minutes. The same compiler runs here without the GPU (jax's CUDA plugin
with a target description, bench/train_step.py --topology=gpu:h200), so the suite's programs can be
compiled here and carried:

    with aot.programs("save", DIR):   # deviceless, here: every program compiled inside is written to DIR
        ...
    with aot.programs("load", DIR):   # on the GPU: a program whose lowered module matches a file in DIR
        ...                           # is deserialized instead of compiled; any other compiles as usual

A file is named by the program and a key: the SHA-256 of the lowered module without its debug locations
(paths differ between hosts), the device kind and jax's version. A program lowered differently on the GPU
(another jax, flax or cuDNN) has another key and compiles there as before, and so does one whose file does
not load (XLA's error is recorded). `events()` says what happened to each program, for the JSON lines.
The files are XLA's own serialized executables (xz-compressed), not pickles. jax's persistent compilation
cache stores the same bytes, but its key also hashes the backend's platform version and the topology's
fingerprint, which differ between a deviceless compile and the GPU, so it would never hit there."""

import contextlib
import hashlib
import lzma
import os
import time

_EVENTS = []


def events() -> list[dict]:
    """What each program compiled inside `programs` did: name, key, action (saved, loaded, compiled: no
    file, or load_failed with the error) and seconds."""
    return list(_EVENTS)


def summary() -> dict:
    """{program name: action} of events(), for a JSON line (a name that repeats gets #2, #3, ...)."""
    out = {}
    for e in _EVENTS:
        name, n = e["name"], 1
        while name in out:
            n += 1
            name = f"{e['name']}#{n}"
        out[name] = e["action"]
    return out


def module_key(computation, devices) -> str:
    """The key of a lowered module (an MLIR module) for these devices."""
    import jax

    text = computation.operation.get_asm(enable_debug_info=False, large_elements_limit=None)
    kinds = sorted({d.device_kind for d in devices.flat})
    h = hashlib.sha256(text.encode())
    h.update(repr((kinds, jax.__version__)).encode())
    return h.hexdigest()[:20]


def _path(directory, name, key):
    return os.path.join(directory, f"{name}-{key}.xla.xz")


@contextlib.contextmanager
def programs(mode: str, directory: str):
    """Within it, XLA compiles go through DIR: mode "save" writes each compiled executable there, "load"
    reads the ones there instead of compiling (see the module docstring). mode "" does nothing."""
    if not mode:
        yield
        return
    if mode not in ("save", "load"):
        raise ValueError(f"aot mode {mode!r}: expected save or load")
    from jax._src import compiler

    os.makedirs(directory, exist_ok=True)
    compile_or_get_cached = compiler.compile_or_get_cached

    def through_directory(backend, computation, devices, compile_options, host_callbacks,
                          executable_devices, *args, **kwargs):
        from jax._src.lib.mlir import ir

        name = ir.StringAttr(computation.operation.attributes["sym_name"]).value
        key = module_key(computation, devices)
        path = _path(directory, name, key)
        event = {"name": name, "key": key}
        t0 = time.time()
        if mode == "load" and os.path.exists(path):
            try:
                with open(path, "rb") as f:
                    blob = lzma.decompress(f.read())
                extra = (host_callbacks,) if host_callbacks else ()  # as jax's own cache reads them
                executable = backend.deserialize_executable(blob, executable_devices, compile_options, *extra)
            except Exception as e:  # another runtime than the compiler's: compile here after all
                event.update(action="load_failed", error=f"{type(e).__name__}: {e}"[:500])
            else:
                _EVENTS.append(dict(event, action="loaded", seconds=round(time.time() - t0, 2)))
                return executable
        elif mode == "load":
            event["action"] = "compiled: no file"
        executable = compile_or_get_cached(backend, computation, devices, compile_options, host_callbacks,
                                           executable_devices, *args, **kwargs)
        if mode == "save":
            blob = lzma.compress(executable.serialize())  # 7.7 MB for part f's step; zlib: 12.2
            with open(path + ".tmp", "wb") as f:
                f.write(blob)
            os.replace(path + ".tmp", path)
            event.update(action="saved", bytes=len(blob))
        _EVENTS.append(dict(event, seconds=round(time.time() - t0, 2)))
        return executable

    compiler.compile_or_get_cached = through_directory
    try:
        yield
    finally:
        compiler.compile_or_get_cached = compile_or_get_cached


def write_optimized_hlo(compiled, dump_dir: str, name: str):
    """The optimized HLO of a loaded program, where XLA's dump would have put its compile's
    (<name>.gpu_after_optimizations.txt, for bench/roofline.py): a loaded program has no compile to dump."""
    import jax

    platform = jax.devices()[0].platform  # gpu, as in XLA's dump names, also for CUDA
    text = compiled.runtime_executable().hlo_modules()[0].to_string()
    with open(os.path.join(dump_dir, f"module_aot.{name}.{platform}_after_optimizations.txt"), "w") as f:
        f.write(text)
