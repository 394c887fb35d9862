"""The offline asset cache: where converted models and fetched texts live, and how they are built.

Every asset is a directory that appears atomically: it is built in a temporary sibling and renamed
into place under a file lock, so concurrent callers (several test workers, a calibration and a
benchmark started together) build it once and never see a half-written directory.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

logger = logging.getLogger(__name__)

CACHE_ENV = "DUOGPT_CACHE"


def cache_root() -> Path:
    """Return the cache root: ``$DUOGPT_CACHE``, else ``~/.cache/vllm-duogpt``."""
    configured = os.environ.get(CACHE_ENV)
    root = Path(configured) if configured else Path.home() / ".cache" / "vllm-duogpt"
    return root.expanduser()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def build_once(
    target: Path,
    build: Callable[[Path], None],
    is_complete: Callable[[Path], bool] | None = None,
) -> Path:
    """Create ``target`` with ``build`` unless it already exists; safe under concurrency.

    Args:
        target: the directory to create.
        build: writes the asset's files into the (empty, temporary) directory it is given.
        is_complete: says whether an existing ``target`` is usable; default: it is a directory.
            An unusable one (left by an older, non-atomic writer) is replaced.

    Returns:
        ``target``.

    Raises:
        Whatever ``build`` raises; the temporary directory is removed and ``target`` untouched.
    """
    complete = is_complete or Path.is_dir
    if complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if complete(target):  # another process finished it while we waited for the lock
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            build(tmp)
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the cache is not
            if target.exists():
                logger.warning("replacing incomplete cache entry %s", target)
                shutil.rmtree(target)
            os.rename(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target
