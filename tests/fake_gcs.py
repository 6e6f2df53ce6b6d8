"""An in-memory gs:// for tests, with the object semantics of Google Cloud Storage as gcsfs gives them.

Registered as fsspec's "gs"/"gcs" protocol, so etils.epath (and anything else going through fsspec)
reaches it exactly as it reaches gcsfs on a pod; nothing touches the network. What differs from a local
disk, as in gcsfs 2026.10:
- an object written through open() appears only when the file is closed (flush() uploads nothing);
- open(mode="a") does not append: gcsfs warns and opens the object for overwriting, so whatever the
  object held is lost when the file is closed.
Everything else (listing, glob, rename, pseudo-folders) is fsspec's in-memory filesystem.
"""

from __future__ import annotations

import io
import warnings

import fsspec
from fsspec.implementations import memory


class FakeGCS(memory.MemoryFileSystem):
    protocol = ("gs", "gcs")
    root_marker = ""
    store: dict = {}  # not shared with fsspec's memory:// filesystem
    pseudo_dirs: list = [""]
    appends_overwritten = 0  # how many times code under test opened an object in append mode

    def __init__(self, *args, **kwargs):  # epath passes gcsfs options (finalize_on_close=True)
        super().__init__()

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                path = path[len(prefix) :]
        return path.strip("/")

    def _open(self, path, mode="rb", **kwargs):
        path = self._strip_protocol(path)
        if "a" in mode:  # gcsfs's own warning and behaviour
            warnings.warn(
                "Append mode 'a' is not supported in GCS. Using overwrite mode instead.", stacklevel=3
            )
            type(self).appends_overwritten += 1
            mode = mode.replace("a", "w")
        if "r" in mode:
            if path not in self.store:
                raise FileNotFoundError(path)
            return memory.MemoryFile(None, None, bytes(self.store[path].getbuffer()))  # a private copy
        if "x" in mode and self.exists(path):
            raise FileExistsError(path)
        return _Upload(self, path)

    def objects(self) -> dict[str, bytes]:
        """{"gs://bucket/name": content} of every object written so far."""
        return {f"gs://{k}": bytes(f.getbuffer()) for k, f in self.store.items()}


class _Upload(io.BytesIO):
    """A file being written: becomes the object (replacing any old one) only when closed."""

    def __init__(self, fs, path):
        super().__init__()
        self.fs, self.path = fs, path

    def close(self):
        if not self.closed:
            self.fs.store[self.path] = memory.MemoryFile(self.fs, self.path, self.getvalue())
        super().close()


def _clear_epath_cache():
    from etils.epath import backend

    backend.fsspec_backend._get_filesystem.cache_clear()


def install() -> FakeGCS:
    """Routes gs:// to a fresh, empty FakeGCS; returns it. Pair with uninstall()."""
    FakeGCS.store.clear()
    FakeGCS.pseudo_dirs[:] = [""]
    FakeGCS.appends_overwritten = 0
    FakeGCS.clear_instance_cache()
    for name in FakeGCS.protocol:
        fsspec.register_implementation(name, FakeGCS, clobber=True)
    _clear_epath_cache()
    return fsspec.filesystem("gs")


def uninstall() -> None:
    for name in FakeGCS.protocol:
        fsspec.register_implementation(name, "gcsfs.GCSFileSystem", clobber=True)
    FakeGCS.store.clear()
    _clear_epath_cache()
