"""vLLM plugin for DuoGPT dual-sparse checkpoints.

vLLM calls :func:`register` in every one of its processes (front end, engine core, workers), so it
is idempotent and imports vLLM only when called.
"""

from __future__ import annotations

__version__ = "0.1.0"

_registered = False


def register() -> None:
    """Register the ``duogpt`` quantization method with vLLM (idempotent)."""
    global _registered
    if _registered:
        return
    from vllm_duogpt.quant_config import register_duogpt_config

    register_duogpt_config()
    _registered = True
