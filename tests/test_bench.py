"""``model_memory``: the bytes a loaded model holds, counted from the objects the layers keep.

The oracle is arithmetic on tensors built here: their element counts times element sizes.
"""

from __future__ import annotations

import torch
from torch import nn

from vllm_duogpt.bench import model_memory
from vllm_duogpt.kernels.cpu_layout import pack_cpu_weight


def test_counts_parameters_layouts_and_kv_cache_once() -> None:
    layer = nn.Linear(64, 32, bias=True)  # 32 x 64 + 32 fp32 parameters
    weight = layer.weight.detach() * (torch.rand(32, 64) >= 0.5)
    layer.duogpt_cpu_weight = pack_cpu_weight(weight)  # a dataclass of two tensors
    layer.same_weight_again = layer.weight  # one storage, counted once
    layer.kv_cache = [torch.zeros(3, 5)]
    model = nn.Sequential(layer)

    counted = model_memory(model)

    packed = layer.duogpt_cpu_weight
    expected = (32 * 64 + 32) * 4 + packed.data.numel() * 2 + packed.offsets.numel() * 8
    assert counted["model_weight_bytes"] == expected
    assert counted["kv_cache_bytes"] == 3 * 5 * 4
    assert counted["worker_rss_bytes"] > 0
