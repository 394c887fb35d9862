"""Random LLaMA-shaped models, dense and DuoGPT, for the vLLM decode benchmarks (no download).

Speed and memory do not depend on what the weights mean, so a randomly initialised model of the
right shape stands in for a trained one: it is saved dense, and as a DuoGPT checkpoint pruned by
magnitude with thresholds calibrated on its own activations
(``vllm_duogpt.calibrate.synthetic.write_sparse_checkpoint``). Both use SmolLM2's tokenizer
(bundled: ``duogpt prepare-model smollm2-135m``); a shape may set a larger ``vocab_size``, whose
extra rows no prompt of the benchmarks reaches.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from vllm_duogpt.calibrate.models import resolve_model
from vllm_duogpt.calibrate.synthetic import write_sparse_checkpoint

# benchmarks/vllm_cpu_decode.py: about 0.91B parameters with SmolLM2's 49152-token vocabulary
LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
# benchmarks/gpu_kernels.py: Meta-Llama-3-8B's configuration (8.0B parameters)
LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    vocab_size=128256,
    tie_word_embeddings=False,
)
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def dense_label(dtype: torch.dtype) -> str:
    """The dense model's label in :func:`build_models` and the benchmark reports."""
    return f"dense-{DTYPE_NAMES[dtype]}"


def build_models(
    work: Path,
    shape: dict[str, Any],
    weight_sparsity: float,
    act_sparsity: float,
    dense_dtype: torch.dtype = torch.float32,
    value_dtype: torch.dtype = torch.float16,
    device: str = "cpu",
) -> dict[str, str]:
    """Dense and DuoGPT checkpoints of one random model, built under ``work`` once and reused.

    Args:
        work: folder of the two checkpoints (reused when both are there: the DuoGPT one is
            written last, and atomically).
        shape: ``LlamaConfig`` fields (:data:`LLAMA_1B`, :data:`LLAMA3_8B`).
        weight_sparsity: fraction of each row of every decoder linear pruned by magnitude.
        act_sparsity: target fraction of every decoder linear's inputs below its threshold.
        dense_dtype: dtype of the dense checkpoint.
        value_dtype: dtype of the DuoGPT checkpoint's values.
        device: where the model is built and its thresholds calibrated (``cuda`` for 8B).

    Returns:
        ``{dense_label(dense_dtype): dense dir, "duogpt": DuoGPT dir}``.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    dense = work / dense_label(dense_dtype)
    sparse = work / f"duogpt-w{weight_sparsity:g}-x{act_sparsity:g}-{DTYPE_NAMES[value_dtype]}"
    models = {dense_label(dense_dtype): str(dense), "duogpt": str(sparse)}
    if dense.exists() and sparse.exists():
        return models
    tokenizer_dir = resolve_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(**{"vocab_size": len(tokenizer), **shape})
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dense_dtype).eval()
    params = sum(p.numel() for p in model.parameters())
    logging.info("random LLaMA-shaped model: %.2fB parameters", params / 1e9)
    tokens = torch.randint(0, len(tokenizer), (4, 128), generator=torch.Generator().manual_seed(0))
    for path in (dense, sparse):
        shutil.rmtree(path, ignore_errors=True)
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(dense, safe_serialization=True)
    tokenizer.save_pretrained(dense)
    write_sparse_checkpoint(
        model, sparse, weight_sparsity, act_sparsity, tokens.to(device), value_dtype, dense
    )
    return models
