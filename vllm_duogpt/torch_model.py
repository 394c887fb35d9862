"""Run a DuoGPT checkpoint in plain transformers: masked dense weights plus activation thresholds.

This is the oracle the vLLM path is tested against, the ``--backend torch`` of evaluation, and
what ``duogpt export --dense`` produces. The thresholds are applied by forward pre-hooks on each
sparse linear, with the same rule the kernels use.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from vllm_duogpt import format as fmt
from vllm_duogpt.kernels.reference import sparsify_activations

THRESHOLDS_KEY = "duogpt_activation_thresholds"


def add_activation_sparsity(
    model: torch.nn.Module, thresholds: Mapping[str, float]
) -> list[torch.utils.hooks.RemovableHandle]:
    """Zero each listed linear's inputs below its threshold, via forward pre-hooks.

    Args:
        model: a transformers model.
        thresholds: module name -> threshold (names as in ``model.named_modules()``).

    Returns:
        The hook handles (call ``.remove()`` to undo).

    Raises:
        KeyError: when a named module does not exist in ``model``.
    """
    modules = dict(model.named_modules())
    missing = [name for name in thresholds if name not in modules]
    if missing:
        raise KeyError(f"thresholds name modules the model does not have: {missing[:3]}")
    handles = []
    for name, tau in thresholds.items():

        def hook(_module: torch.nn.Module, args: tuple[Any, ...], tau: float = tau) -> tuple:
            return (sparsify_activations(args[0], tau), *args[1:])

        handles.append(modules[name].register_forward_pre_hook(hook))
    return handles


def dense_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config.json`` of a checkpoint without its quantization block."""
    return {k: v for k, v in config.items() if k not in ("quantization_config", THRESHOLDS_KEY)}


def load_torch_model(
    ckpt_dir: str | os.PathLike[str], dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """Build the transformers model of a DuoGPT checkpoint with its thresholds applied.

    Args:
        ckpt_dir: a DuoGPT checkpoint directory.
        dtype: compute dtype.

    Returns:
        The model in eval mode, activation-sparsity hooks attached.
    """
    state_dict, thresholds, config = fmt.read_checkpoint(ckpt_dir)
    return build_torch_model(state_dict, thresholds, config, dtype, source=str(ckpt_dir))


def build_torch_model(
    state_dict: Mapping[str, torch.Tensor],
    thresholds: Mapping[str, float],
    config: Mapping[str, Any],
    dtype: torch.dtype = torch.float32,
    source: str = "checkpoint",
) -> torch.nn.Module:
    """:func:`load_torch_model` from what ``format.read_checkpoint`` returned (``source`` names
    it in errors), for callers that need the decompressed tensors as well."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.for_model(**dense_config(config))
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [m for m in missing if not _is_tied(model, m)]
    if missing or unexpected:
        raise fmt.FormatError(f"{source}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.eval()
    add_activation_sparsity(model, thresholds)
    return model


def export_dense(ckpt_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Write a plain Hugging Face checkpoint of the masked dense weights.

    The thresholds go into ``config.json`` under ``duogpt_activation_thresholds``; load them
    back with :func:`load_exported_model` (plain transformers ignores them and runs the model
    with weight sparsity only).

    Raises:
        FileExistsError: when ``out_dir`` exists.
    """
    import json

    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new output directory")
    state_dict, thresholds, config = fmt.read_checkpoint(ckpt_dir)
    with fmt.atomic_directory(out) as staging:
        tensors = {k: v.contiguous() for k, v in state_dict.items()}
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        exported = dense_config(config)
        exported[THRESHOLDS_KEY] = thresholds
        (staging / "config.json").write_text(json.dumps(exported, indent=2, sort_keys=True))
        fmt.copy_side_files(Path(ckpt_dir), staging)
    return out


def load_exported_model(
    export_dir: str | os.PathLike[str], dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """Load an exported masked-dense model with transformers and attach its thresholds."""
    import json

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=dtype)
    config = json.loads((Path(export_dir) / "config.json").read_text())
    add_activation_sparsity(model, config.get(THRESHOLDS_KEY, {}))
    return model.eval()


def _is_tied(model: torch.nn.Module, name: str) -> bool:
    return name == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))
