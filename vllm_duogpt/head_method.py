"""The lm_head of a 16-bit checkpoint on CPUs: kept in its 16-bit values, widened in registers.

vLLM loads every weight in the serving dtype, so a DuoGPT checkpoint stored in fp16 or bf16 and
served in fp32 on a CPU (the fast dtype there) holds its lm_head in fp32: twice the bytes, and at
batch 1 the lm_head of a 1B model takes as long as all its dual-sparse linears together. The
widening is exact, so this method keeps the checkpoint's own 16-bit values and runs the dense
product with ``torch.ops.duogpt.cpu_dense16_linear`` (fp32 accumulation): the same logits up to
summation order, half the memory, and each weight read once whatever the batch. The 16-bit
weight sits on huge pages where the system has them (kernels/huge_pages.py).

It applies only where the dual-sparse linears run the CPU kernel (so ``DUOGPT_KERNEL`` forcing
another kernel turns it off too), to an untied lm_head whose checkpoint tensor is fp16 or bf16
and whose serving dtype is fp32. Anything else is vLLM's own unquantized path, unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.nn import Parameter
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

from vllm_duogpt.kernel_choice import CpuSparseKernel, choose_kernel
from vllm_duogpt.kernels.huge_pages import to_huge_pages

SIXTEEN_BIT = (torch.float16, torch.bfloat16)
logger = logging.getLogger("vllm.duogpt")  # under vLLM's configured logger


class DuoGPTHeadMethod(UnquantizedEmbeddingMethod):
    """vLLM's unquantized lm_head, with the 16-bit CPU product where it applies."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def create_weights(self, layer: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        super().create_weights(layer, *args, **kwargs)
        vllm_loader = layer.weight.weight_loader

        def record_dtype(param: Parameter, loaded_weight: torch.Tensor, *a: Any, **kw: Any):
            layer.duogpt_checkpoint_dtype = loaded_weight.dtype
            return vllm_loader(param, loaded_weight, *a, **kw)

        layer.weight.weight_loader = record_dtype

    def tie_weights(self, layer: torch.nn.Module, embed_tokens: torch.nn.Module):
        layer.duogpt_tied = True  # the embedding needs the weight in the serving dtype
        return super().tie_weights(layer, embed_tokens)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        stored = getattr(layer, "duogpt_checkpoint_dtype", None)
        weight = layer.weight
        if (
            stored in SIXTEEN_BIT
            and weight.dtype == torch.float32
            and weight.device.type == "cpu"
            and not getattr(layer, "duogpt_tied", False)
            and isinstance(choose_kernel(weight.device, weight.dtype), CpuSparseKernel)
        ):
            # exact: the fp32 values were widened from these 16-bit ones at load time
            layer.weight = Parameter(to_huge_pages(weight.data, stored), requires_grad=False)
            layer.duogpt_head16 = True
            logger.info("duogpt: %s kept in %s (16-bit CPU product)", self.prefix, stored)
            return
        super().process_weights_after_loading(layer)

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not getattr(layer, "duogpt_head16", False):
            return super().apply(layer, x, bias)
        from vllm_duogpt.kernels.cpu_kernel import cpu_dense16_linear

        return cpu_dense16_linear(x, layer.weight, bias)
