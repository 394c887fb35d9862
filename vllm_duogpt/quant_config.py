"""The ``duogpt`` quantization config: parses ``quantization_config`` and hands out linear methods.

Imported only from :func:`vllm_duogpt.register`, inside vLLM processes.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import (
    QuantizationConfig,
    QuantizeMethodBase,
)
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)

from vllm_duogpt import format as fmt


class DuoGPTConfig(QuantizationConfig):
    """Config of a DuoGPT dual-sparse checkpoint (docs/format.md).

    Every linear layer of the model (attention and MLP projections, fused ones included) is
    loaded from its compressed parts and run as a dual-sparse product; embeddings, norms and
    lm_head stay dense (a 16-bit lm_head served in fp32 on a CPU keeps its 16-bit values:
    head_method.py; the input embedding skips vLLM's CPU GEMM copy: embedding_method.py).
    """

    def __init__(self, settings: dict[str, Any]) -> None:
        super().__init__()
        self.settings = settings

    def __repr__(self) -> str:
        return f"DuoGPTConfig(format={fmt.FORMAT_NAME} v{fmt.FORMAT_VERSION}, {self.settings})"

    def get_name(self) -> str:
        return fmt.QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        # The torch path runs anywhere; the Triton kernels need sm_70+ and say so themselves.
        return 60

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DuoGPTConfig:
        """Validate a checkpoint's ``quantization_config`` block.

        Raises:
            ValueError: naming the bad value and the accepted one.
        """
        method = config.get("quant_method")
        if method != fmt.QUANT_METHOD:
            raise ValueError(f"quant_method {method!r} is not {fmt.QUANT_METHOD!r}")
        if config.get("format") != fmt.FORMAT_NAME:
            raise ValueError(
                f"Unsupported duogpt format {config.get('format')!r}; this build reads "
                f"{fmt.FORMAT_NAME!r}"
            )
        fmt.check_format_version(config.get("format_version"), "quantization_config")
        return cls(dict(config))

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, LinearBase):
            from vllm_duogpt.linear_method import DuoGPTLinearMethod

            return DuoGPTLinearMethod(prefix)
        if isinstance(layer, ParallelLMHead):
            from vllm_duogpt.head_method import DuoGPTHeadMethod

            return DuoGPTHeadMethod(prefix)
        if isinstance(layer, VocabParallelEmbedding):
            from vllm_duogpt.embedding_method import DuoGPTEmbeddingMethod

            return DuoGPTEmbeddingMethod()
        return None


def register_duogpt_config() -> None:
    """Add ``duogpt`` to vLLM's quantization methods."""
    register_quantization_config(fmt.QUANT_METHOD)(DuoGPTConfig)
