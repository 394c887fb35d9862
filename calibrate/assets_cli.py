"""``duogpt prepare-model`` and ``duogpt fetch-data``: fill the offline asset cache.

Thin argparse shells; the work is in ``models.resolve_model`` and ``austen.fetch_austen``. Both
print the resulting path on stdout (so scripts can capture it) and log progress on stderr.
"""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)

DATASETS = ("austen",)


def add_assets_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``prepare-model`` and ``fetch-data`` subcommands to a ``duogpt`` parser.

    Each subparser sets ``func`` to its ``run_*`` function, which takes the parsed namespace and
    returns an exit status.
    """
    prepare = subparsers.add_parser(
        "prepare-model",
        help="resolve a model (convert a bundled GGUF once) and print its local directory",
        description="Resolve a bundled name (smollm2-135m), a hub id or a local directory to a "
        "local Hugging Face model directory, converting bundled GGUF files into the cache "
        "($DUOGPT_CACHE or ~/.cache/vllm-duogpt) on first use.",
    )
    prepare.add_argument(
        "model",
        nargs="?",
        default="smollm2-135m",
        help="bundled name, hub id or local path (default: smollm2-135m)",
    )
    prepare.set_defaults(func=run_prepare_model)

    fetch = subparsers.add_parser(
        "fetch-data",
        help="fetch a calibration/evaluation corpus into the cache and print its directory",
        description="Fetch a corpus once into the cache; 'austen' downloads Debian's "
        "r-cran-janeaustenr with apt-get and extracts the six novels as text.",
    )
    fetch.add_argument("dataset", choices=DATASETS, help="corpus to fetch")
    fetch.set_defaults(func=run_fetch_data)


def run_prepare_model(args: argparse.Namespace) -> int:
    """Resolve ``args.model`` and print the model directory; return the exit status."""
    from vllm_duogpt.calibrate.models import resolve_model

    try:
        path = resolve_model(args.model)
    except (ValueError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return 1
    print(path)
    return 0


def run_fetch_data(args: argparse.Namespace) -> int:
    """Fetch ``args.dataset`` into the cache and print its directory; return the exit status."""
    from vllm_duogpt.calibrate.austen import fetch_austen

    try:
        path = fetch_austen()
    except RuntimeError as exc:
        logger.error("%s", exc)
        return 1
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m vllm_duogpt.calibrate.assets_cli``)."""
    parser = argparse.ArgumentParser(prog="duogpt")
    add_assets_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
