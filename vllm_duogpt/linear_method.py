"""The linear method that loads compressed linears and runs them as dual-sparse products.

Loading (vllm-notes.md, "Loading a compressed format with tensor parallelism"): vLLM hands us the
checkpoint's unsliced parts of each matrix (q, k and v of a fused qkv layer arrive separately, in
any order, tagged with their shard id). Ragged value arrays cannot be sliced across ranks, so the
parts of one matrix are buffered until complete, decompressed, and passed to the layer's own
weight loader, which slices this rank's share into a dense staging weight. After loading, the
staging weight is converted into the kernel's layout.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch.nn import Parameter
from vllm.model_executor.layers.linear import (
    LinearMethodBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
)
from vllm.model_executor.utils import set_weight_attrs

from vllm_duogpt import format as fmt
from vllm_duogpt.kernel_choice import choose_kernel

logger = logging.getLogger("vllm.duogpt")  # under vLLM's configured logger

_FUSED_NAMES = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


class DuoGPTLinearMethod(LinearMethodBase):
    """Dual-sparse linear: ``threshold(x) @ W_sparse.T``, for plain and fused linears."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        layer_loader = extra_weight_attrs.pop("weight_loader")
        staging = Parameter(
            torch.empty(sum(output_partition_sizes), input_size_per_partition, dtype=params_dtype),
            requires_grad=False,
        )
        set_weight_attrs(staging, {"input_dim": 1, "output_dim": 0, "weight_loader": layer_loader})
        set_weight_attrs(staging, extra_weight_attrs)
        layer.register_parameter("weight", staging)

        layer.duogpt_shards = _shard_ids(layer, len(output_partition_sizes))
        layer.duogpt_pending = {shard: {} for shard in layer.duogpt_shards}
        layer.duogpt_thresholds = {}
        for part in fmt.ALL_PARTS:
            placeholder = Parameter(torch.empty(0, dtype=params_dtype), requires_grad=False)
            loader = functools.partial(self._load_part, layer, part)
            set_weight_attrs(placeholder, {"weight_loader": loader})
            layer.register_parameter(part, placeholder)

    def _load_part(
        self,
        layer: torch.nn.Module,
        part: str,
        param: Parameter,
        loaded: torch.Tensor,
        shard_id: str | int | None = None,
    ) -> None:
        if shard_id is None:
            shard_id = getattr(loaded, "shard_id", None)
        if shard_id not in layer.duogpt_pending:
            raise fmt.FormatError(f"{self.prefix}: unexpected shard {shard_id!r} for {part}")
        name = self._checkpoint_name(layer, shard_id)
        if part == fmt.THRESHOLD:
            layer.duogpt_thresholds[shard_id] = fmt.threshold_value(loaded, name)
            return
        pending = layer.duogpt_pending[shard_id]
        pending[part] = loaded.detach().cpu()
        if len(pending) < len(fmt.WEIGHT_PARTS):
            return
        layer.duogpt_checkpoint_dtype = pending[fmt.VALUES].dtype
        dense = fmt.decompress(pending, name).to(layer.weight.dtype)
        pending.clear()
        pending["done"] = True
        if shard_id is None:
            layer.weight.weight_loader(layer.weight, dense)
        else:
            layer.weight.weight_loader(layer.weight, dense, shard_id)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        # vLLM does not check that every parameter of a quantized model was loaded: do it here.
        for shard, pending in layer.duogpt_pending.items():
            name = self._checkpoint_name(layer, shard)
            if not pending.get("done"):
                present = sorted(k for k in pending if k != "done")
                raise fmt.FormatError(f"{name}: incomplete compressed weight (found {present})")
            if shard not in layer.duogpt_thresholds:
                raise fmt.FormatError(f"{name}: missing {fmt.THRESHOLD}")
        thresholds = set(layer.duogpt_thresholds.values())
        if len(thresholds) != 1:
            raise fmt.FormatError(
                f"{self.prefix}: fused inputs must share one threshold, got {sorted(thresholds)}"
            )
        layer.duogpt_threshold = thresholds.pop()
        for part in fmt.ALL_PARTS:
            delattr(layer, part)
        del layer.duogpt_pending, layer.duogpt_thresholds
        layer.duogpt_kernel = choose_kernel(layer.weight.device, layer.weight.dtype)
        layer.duogpt_kernel.prepare(layer)

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        leading = x.shape[:-1]
        out = layer.duogpt_kernel.apply(layer, x.reshape(-1, x.shape[-1]), bias)
        return out.reshape(*leading, out.shape[-1])

    def _checkpoint_name(self, layer: torch.nn.Module, shard_id: str | int | None) -> str:
        """The Hugging Face name of one shard for error messages (qkv_proj, k -> k_proj)."""
        base, _, leaf = self.prefix.rpartition(".")
        if shard_id is None or leaf not in _FUSED_NAMES:
            return self.prefix
        index = layer.duogpt_shards.index(shard_id)
        return f"{base}.{_FUSED_NAMES[leaf][index]}"


def _shard_ids(layer: torch.nn.Module, num_partitions: int) -> tuple[str | int | None, ...]:
    if isinstance(layer, QKVParallelLinear):
        return ("q", "k", "v")
    if isinstance(layer, MergedColumnParallelLinear):
        return tuple(range(num_partitions))
    return (None,)
