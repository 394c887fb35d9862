"""Jane Austen's six novels, fetched once from Debian's ``r-cran-janeaustenr`` package.

The development calibration and evaluation text of this project: public domain, about 4 MB,
available from any Debian mirror (``apt-get download`` needs no root and no R). The package keeps
each novel as an R character vector (one element per line of the Project Gutenberg text) in R's
lazy-load data base, which ``vllm_duogpt.calibrate.rdata`` reads.

The books are cached as plain UTF-8 text under ``<cache>/data/austen/<key>.txt`` (lines joined
with ``\\n``); ``duogpt fetch-data austen`` fills the cache, and readers never touch the network
unless asked to fetch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import tempfile
from pathlib import Path

from vllm_duogpt.calibrate.cache import build_once, cache_root
from vllm_duogpt.calibrate.rdata import STRSXP, RObject, read_lazyload_db

logger = logging.getLogger(__name__)

DEBIAN_PACKAGE = "r-cran-janeaustenr"
DATA_DIR = "usr/lib/R/site-library/janeaustenr/data"

# Package key -> title, in publication order.
BOOKS: dict[str, str] = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
# Held out of the default calibration set: the default evaluation text.
HELD_OUT = "prideprejudice"


class AustenNotCachedError(FileNotFoundError):
    """The Austen cache is empty and fetching was not allowed."""


def austen_cache_dir() -> Path:
    """Return the directory that holds (or will hold) the cached novels."""
    return cache_root() / "data" / "austen"


def _is_complete(path: Path) -> bool:
    return all((path / f"{key}.txt").is_file() for key in BOOKS)


def austen_books(fetch: bool = True) -> dict[str, str]:
    """Return the six novels as ``{package key: full text}``.

    Args:
        fetch: fetch and cache the novels if the cache is empty (needs ``apt-get`` and a Debian
            mirror). With False, a missing cache raises instead: tests use this.

    Returns:
        Book key (see ``BOOKS``) -> text, lines joined with ``\\n``.

    Raises:
        AustenNotCachedError: the cache is empty and ``fetch`` is False.
        RuntimeError: fetching failed (the message says which command and why).
    """
    directory = austen_cache_dir()
    if not _is_complete(directory):
        if not fetch:
            raise AustenNotCachedError(
                f"Austen novels not cached in {directory}; run `duogpt fetch-data austen`"
            )
        fetch_austen()
    return {key: (directory / f"{key}.txt").read_text(encoding="utf-8") for key in BOOKS}


def fetch_austen() -> Path:
    """Download, extract and cache the novels once (safe to call concurrently).

    Returns:
        The cache directory.

    Raises:
        RuntimeError: ``apt-get``/``dpkg-deb`` failed or the package content is unexpected.
    """
    directory = build_once(austen_cache_dir(), _build_cache, _is_complete)
    logger.info("Austen novels cached in %s", directory)
    return directory


def _build_cache(out_dir: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="duogpt-austen-") as work:
        deb = _apt_download(Path(work))
        root = Path(work) / "root"
        _run(["dpkg-deb", "-x", str(deb), str(root)], cwd=Path(work))
        books = read_package_books(root / DATA_DIR)
        for key, text in books.items():
            (out_dir / f"{key}.txt").write_text(text, encoding="utf-8")
        source = {
            "debian_package": deb.name,
            "sha256": hashlib.sha256(deb.read_bytes()).hexdigest(),
            "books": {key: {"title": BOOKS[key], "chars": len(t)} for key, t in books.items()},
        }
        (out_dir / "SOURCE.json").write_text(json.dumps(source, indent=2) + "\n")


def read_package_books(data_dir: Path) -> dict[str, str]:
    """Read the novels from an extracted janeaustenr ``data/`` directory (``Rdata.rdb/.rdx``).

    Args:
        data_dir: the package's ``data`` directory.

    Returns:
        Book key -> text (NA lines become empty lines).

    Raises:
        RuntimeError: a book is missing or is not a character vector.
    """
    objects = read_lazyload_db(data_dir / "Rdata")
    books: dict[str, str] = {}
    for key in BOOKS:
        obj = objects.get(key)
        if not isinstance(obj, RObject) or obj.sexptype != STRSXP:
            found = sorted(objects)
            raise RuntimeError(f"janeaustenr data has no character vector {key!r} (has {found})")
        books[key] = "\n".join(line if line is not None else "" for line in obj.value)
    return books


def _apt_download(work: Path) -> Path:
    """``apt-get download`` the package into ``work``; refresh the package lists once if needed."""
    if shutil.which("apt-get") is None:
        raise RuntimeError(f"apt-get not found: fetching {DEBIAN_PACKAGE} needs a Debian system")
    command = ["apt-get", "download", DEBIAN_PACKAGE]
    first = subprocess.run(command, cwd=work, capture_output=True, text=True)
    if first.returncode != 0:
        logger.info("apt-get download failed (%s); running apt-get update", _last_line(first))
        _run(["apt-get", "update"], cwd=work)
        _run(command, cwd=work)
    debs = sorted(work.glob(f"{DEBIAN_PACKAGE}_*.deb"))
    if not debs:
        raise RuntimeError(f"apt-get download left no {DEBIAN_PACKAGE}_*.deb in {work}")
    return debs[-1]


def _run(command: list[str], cwd: Path) -> None:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed: {_last_line(result)}")


def _last_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = (result.stderr or result.stdout or "").strip().splitlines()
    return lines[-1] if lines else f"exit status {result.returncode}"
