"""The input embedding on CPUs, without the GEMM copy of a table that is only looked up.

On CPUs, vLLM's unquantized embedding method packs a second copy of the table for oneDNN when
loading, in case the same module also computes the logits. In the LLaMA family the lm_head is a
module of its own, tied or not (with its own method, vllm_duogpt/head_method.py), so the input
embedding is only ever looked up and the copy is dead weight: 384 MiB for a 49152 x 2048 fp32
table. This method packs it on the first product instead, if one ever comes.
"""

from __future__ import annotations

import logging

import torch
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
from vllm.platforms import current_platform

logger = logging.getLogger("vllm.duogpt")  # under vLLM's configured logger


class DuoGPTEmbeddingMethod(UnquantizedEmbeddingMethod):
    """vLLM's unquantized embedding, packing its CPU GEMM copy only when a product needs it."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if current_platform.is_cpu():
            logger.info("duogpt: input embedding looked up only, no GEMM copy packed")
            return
        super().process_weights_after_loading(layer)

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if current_platform.is_cpu() and not hasattr(layer, "cpu_linear"):
            super().process_weights_after_loading(layer)  # packs the copy now
        return super().apply(layer, x, bias)
