"""Local or remote (gs://BUCKET/...) paths: the one place that tells them apart.

Remote paths go through etils.epath (gcsfs on a pod). A bucket is not a disk: an object cannot be
appended to and appears only when its file is closed (metrics.JsonLines, docs/ARCHITECTURE.md
"Multi-host"). This module imports no JAX or orbax, so data workers and sample.py can use it.
"""

import os

from etils import epath


def is_remote(path) -> bool:
    """A URL such as gs://BUCKET/...: read and written through etils.epath, not the local file system."""
    return "://" in str(path)


def as_path(path) -> epath.Path:
    """A local path (made absolute) or a remote one, as an etils.epath.Path."""
    return epath.Path(path if is_remote(path) else os.path.abspath(path))
