"""Synthetic DuoGPT checkpoints of randomly initialised models, for tests and speed benchmarks.

Speed and memory do not depend on what the weights mean, so benchmarks of LLaMA-shaped models
need no download: a random model pruned by magnitude, with thresholds calibrated on its own
activations (the ``act_sparsity`` quantile of each linear input's magnitudes on random tokens).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from vllm_duogpt import format as fmt


def decoder_linear_names(model: torch.nn.Module) -> list[str]:
    """Names of the nn.Linear modules inside the decoder blocks (everything DuoGPT sparsifies)."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layers." in name
    ]


def input_quantile_thresholds(
    model: torch.nn.Module,
    names: list[str],
    act_sparsity: float,
    tokens: torch.Tensor,
) -> dict[str, float]:
    """Per-linear threshold: the ``act_sparsity`` quantile of ``|input|`` on ``tokens``.

    Args:
        model: a transformers causal LM.
        names: linears to calibrate.
        act_sparsity: target fraction of inputs below the threshold.
        tokens: ``[batch, seqlen]`` token ids to run.
    """
    modules = dict(model.named_modules())
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def keep(name: str):
        def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            values = args[0].detach().abs().flatten().float()
            # torch.quantile refuses more than 2^24 values: subsample evenly.
            step = max(1, values.numel() // (1 << 22))
            seen[name].append(values[::step])

        return hook

    handles = [modules[n].register_forward_pre_hook(keep(n)) for n in names]
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for handle in handles:
            handle.remove()
    return {n: float(torch.quantile(torch.cat(v), act_sparsity)) for n, v in seen.items()}


def magnitude_prune_rows(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the smallest-magnitude ``sparsity`` fraction of every row."""
    drop = int(weight.shape[1] * sparsity)
    if drop == 0:
        return weight.clone()
    idx = weight.abs().argsort(dim=1)[:, :drop]
    return weight.clone().scatter_(1, idx, 0.0)


def write_sparse_checkpoint(
    model: torch.nn.Module,
    out_dir: str | os.PathLike[str],
    weight_sparsity: float,
    act_sparsity: float,
    tokens: torch.Tensor,
    value_dtype: torch.dtype = torch.float16,
    copy_files_from: str | os.PathLike[str] | None = None,
    extra_info: Mapping[str, Any] | None = None,
) -> Path:
    """Prune ``model`` by magnitude, calibrate its thresholds and write a DuoGPT checkpoint.

    Args:
        model: a transformers causal LM (left unchanged).
        out_dir: new checkpoint directory.
        weight_sparsity: fraction of each row pruned.
        act_sparsity: target activation sparsity of every linear input.
        tokens: ``[batch, seqlen]`` token ids the thresholds are calibrated on.
        value_dtype: dtype of every stored tensor.
        copy_files_from: directory with tokenizer files to copy.
        extra_info: more settings for ``quantization_config``.
    """
    names = decoder_linear_names(model)
    thresholds = input_quantile_thresholds(model, names, act_sparsity, tokens)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    for name in names:
        state[f"{name}.weight"] = magnitude_prune_rows(state[f"{name}.weight"], weight_sparsity)
    state = {k: v.to(value_dtype) for k, v in state.items()}
    config = model.config.to_dict()
    config.update(
        architectures=[type(model).__name__], dtype=str(value_dtype).removeprefix("torch.")
    )
    info = {
        "calibration_method": "magnitude",
        "weight_sparsity": weight_sparsity,
        "act_sparsity": act_sparsity,
        "synthetic": True,
        **(extra_info or {}),
    }
    return fmt.write_checkpoint(out_dir, state, thresholds, config, info, copy_files_from)
