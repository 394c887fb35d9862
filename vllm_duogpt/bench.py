"""``duogpt bench``: vLLM decode speed, time to first token and memory, dense vs DuoGPT.

Method (offline ``LLM.generate``, greedy, ``ignore_eos=True`` so every request generates exactly
``max_tokens``; prefix caching off and fresh seeded random-token prompts for every call, so no
call reuses another's KV cache):

- time to first token ``ttft_s``: wall time of one ``generate`` of ``batch`` prompts with
  ``max_tokens=1`` (the batch's prefill plus one sampled token);
- decode: wall time ``t_M`` of the same call with ``max_tokens=M``; the difference of the two runs
  is the time of the ``M - 1`` decode steps, so ``decode_tok_s = batch * (M - 1) / (t_M - ttft_s)``
  (prefill and the fixed per-call overhead cancel out);
- each time is the median of ``repeats`` calls, after one warm-up call per batch size;
- memory: RSS of the vLLM worker (the process that holds the model, asked from inside it), RSS
  summed over the whole engine (front end plus its child processes; shared pages count twice),
  bytes of the weights the loaded model holds (:func:`model_memory`), of its KV cache, and of the
  checkpoint's safetensors files.

Every model is benchmarked by a fresh ``python -m vllm_duogpt.bench`` process, one after the
other, so engines do not share a process and do not compete for the CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

DEFAULT_BATCHES = (1, 4, 16)
PER_BATCH_FIELDS = ("batch", "ttft_s", "total_s", "decode_s", "decode_tok_s", "output_tok_s")
METHOD = (
    "ttft_s = t(max_tokens=1); decode_tok_s = batch * (max_tokens - 1) / (t(max_tokens) - ttft_s); "
    "t = median wall time of LLM.generate over `repeats` calls, greedy, ignore_eos, fresh random "
    "prompts, prefix caching off, one warm-up call per batch size"
)


def model_memory(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of the weights a loaded vLLM model holds (runs inside the worker).

    Counted, each storage once: parameters, buffers, plain tensor attributes, tensors inside
    dataclasses (our kernels keep their layouts that way), dicts, lists, tuples and closures, and
    the oneDNN handles vLLM's CPU backend moves dense linear weights into (opaque to torch;
    counted as ``K x N`` elements of the layer's dtype, the size of the packed copy). vLLM hangs
    the KV cache on the attention modules as ``kv_cache``; it is counted apart.

    Returns:
        ``model_weight_bytes``, ``kv_cache_bytes``, ``worker_pid``, ``worker_rss_bytes`` and
        ``worker_threads`` (torch's intra-op threads in the worker: vLLM's CPU backend keeps a
        core per worker for its scheduler unless ``VLLM_CPU_NUM_OF_RESERVED_CPU`` says otherwise)
        and ``worker_huge_page_bytes`` (the worker's memory on transparent huge pages).
    """
    import psutil

    seen: set[int] = set()
    totals = {"model_weight_bytes": 0, "kv_cache_bytes": 0}

    def count(value: Any, key: str, element_size: int) -> None:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                totals[key] += storage.nbytes()
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            for field in dataclasses.fields(value):  # e.g. the CPU kernel's packed layout
                count(getattr(value, field.name), key, element_size)
        elif isinstance(value, dict):
            for item in value.values():
                count(item, key, element_size)
        elif isinstance(value, list | tuple):
            for item in value:
                count(item, key, element_size)
        elif all(hasattr(value, a) for a in ("handler_tensor", "k", "n")):
            if id(value) not in seen:  # a oneDNN matmul handle (vllm._custom_ops)
                seen.add(id(value))
                totals[key] += value.k * value.n * element_size
        elif callable(value) and getattr(value, "__closure__", None):
            for cell in value.__closure__:
                try:
                    count(cell.cell_contents, key, element_size)
                except ValueError:  # an empty cell
                    continue

    # KV caches first, so that nothing else can claim their storage.
    for kv_pass in (True, False):
        for module in model.modules():
            weight = getattr(module, "weight", None)
            element_size = weight.element_size() if isinstance(weight, torch.Tensor) else 4
            for name, value in module.__dict__.items():
                if ("kv_cache" in name) == kv_pass:
                    key = "kv_cache_bytes" if kv_pass else "model_weight_bytes"
                    count(value, key, element_size)
    return {
        **totals,
        "worker_pid": os.getpid(),
        "worker_rss_bytes": psutil.Process().memory_info().rss,
        "worker_threads": torch.get_num_threads(),
        "worker_huge_page_bytes": _anon_huge_page_bytes(),
    }


def _anon_huge_page_bytes() -> int | None:
    """Bytes of this process on transparent huge pages (Linux), else None."""
    rollup = Path("/proc/self/smaps_rollup")
    if not rollup.exists():
        return None
    for line in rollup.read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    return None


def checkpoint_file_bytes(model_dir: str | os.PathLike[str]) -> int:
    """Size on disk of a model directory's safetensors files."""
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


def _timed_generate(llm: Any, prompts: list[list[int]], max_tokens: int) -> float:
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False
    )
    requests = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    started = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    lengths = {len(out.outputs[0].token_ids) for out in outputs}
    if lengths != {max_tokens}:
        raise RuntimeError(f"expected {max_tokens} generated tokens per request, got {lengths}")
    return elapsed


def bench_engine(
    model_dir: str,
    batches: Sequence[int],
    max_tokens: int,
    prompt_len: int,
    repeats: int = 3,
    enforce_eager: bool = True,
    seed: int = 0,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Benchmark one model in one vLLM engine started in this process.

    Args:
        model_dir: a dense model or DuoGPT checkpoint directory.
        batches: batch sizes (concurrent requests per ``generate`` call).
        max_tokens: tokens generated per request in the decode run (>= 2).
        prompt_len: tokens per random prompt.
        repeats: timed calls per measurement (the median is kept).
        enforce_eager: skip torch.compile (vLLM start-up is about a minute shorter on CPU) and,
            on GPUs, CUDA graphs.
        seed: seeds the random prompts.
        dtype: vLLM's compute dtype (float32 on CPUs, where bf16 matmuls are slow without
            AVX-512 BF16; bfloat16 on GPUs).

    Returns:
        Model, settings, memory fields and one entry per batch size (see the module docstring).
    """
    import psutil

    if max_tokens < 2:
        raise ValueError(
            f"max_tokens must be >= 2 (one prefill step, then decode), got {max_tokens}"
        )
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    # apply_model ships a function to the worker; vLLM pickles functions only with this set.
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    from vllm import LLM

    started = time.perf_counter()
    llm = LLM(
        model=model_dir,
        dtype=dtype,
        enforce_eager=enforce_eager,
        max_model_len=prompt_len + max_tokens,
        max_num_seqs=max(max(batches), 1),
        enable_prefix_caching=False,
        seed=seed,
    )
    load_s = time.perf_counter() - started
    vocab = len(llm.get_tokenizer())
    generator = torch.Generator().manual_seed(seed)

    def prompts(batch: int) -> list[list[int]]:
        return torch.randint(0, vocab, (batch, prompt_len), generator=generator).tolist()

    per_batch = []
    for batch in batches:
        _timed_generate(llm, prompts(batch), 2)  # warm-up
        ttft = statistics.median(_timed_generate(llm, prompts(batch), 1) for _ in range(repeats))
        total = statistics.median(
            _timed_generate(llm, prompts(batch), max_tokens) for _ in range(repeats)
        )
        decode = total - ttft
        entry = {
            "batch": batch,
            "ttft_s": ttft,
            "total_s": total,
            "decode_s": decode,
            # A decode faster than timer noise would give a negative or infinite rate.
            "decode_tok_s": batch * (max_tokens - 1) / decode if decode > 0 else float("nan"),
            "output_tok_s": batch * max_tokens / total,
        }
        logger.info("batch %d: %s", batch, entry)
        per_batch.append(entry)

    [worker] = llm.apply_model(model_memory)
    front = psutil.Process()
    engine_rss = front.memory_info().rss + sum(
        child.memory_info().rss for child in front.children(recursive=True)
    )
    return {
        "model": model_dir,
        "quantization": llm.llm_engine.model_config.quantization,
        "max_tokens": max_tokens,
        "prompt_len": prompt_len,
        "repeats": repeats,
        "enforce_eager": enforce_eager,
        "dtype": dtype,
        "load_s": load_s,
        "checkpoint_file_bytes": checkpoint_file_bytes(model_dir),
        **worker,
        "engine_rss_bytes": engine_rss,
        "batches": per_batch,
    }


def run_bench(
    models: dict[str, str],
    batches: Sequence[int] = DEFAULT_BATCHES,
    max_tokens: int = 64,
    prompt_len: int = 128,
    repeats: int = 3,
    enforce_eager: bool = True,
    out: str | os.PathLike[str] | None = None,
    timeout_s: float = 1800.0,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Benchmark several models, each in its own fresh process, one after the other.

    Args:
        models: label (``duogpt``, ``dense``) -> model directory or bundled name.
        batches, max_tokens, prompt_len, repeats, enforce_eager, dtype: see
            :func:`bench_engine`.
        out: write the results here as JSON too.
        timeout_s: limit per model process.

    Returns:
        ``{"method": ..., "results": {label: bench_engine(...)}}``.

    Raises:
        RuntimeError: with the tail of its log when a benchmark process fails.
    """
    from vllm_duogpt.calibrate.models import resolve_model

    results: dict[str, Any] = {}
    for label, model in models.items():
        model_dir = str(resolve_model(model))
        with tempfile.TemporaryDirectory(prefix="duogpt-bench-") as tmp:
            tmp_out = Path(tmp) / "result.json"
            cmd = [sys.executable, "-m", "vllm_duogpt.bench", model_dir, "--result", str(tmp_out)]
            cmd += ["--batch", ",".join(map(str, batches)), "--max-tokens", str(max_tokens)]
            cmd += ["--prompt-len", str(prompt_len), "--repeats", str(repeats)]
            cmd += ["--dtype", dtype] + ([] if enforce_eager else ["--compile"])
            logger.info("benchmarking %s: %s", label, " ".join(cmd))
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
            if proc.returncode != 0 or not tmp_out.is_file():
                tail = (proc.stdout + proc.stderr)[-4000:]
                raise RuntimeError(f"benchmark of {label} ({model_dir}) failed:\n{tail}")
            results[label] = json.loads(tmp_out.read_text())
    report = {"method": METHOD, "results": results}
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2))
    return report


def format_table(report: dict[str, Any]) -> str:
    """The results as a fixed-width text table: one row per model and batch size."""
    lines = [
        f"{'model':<8} {'batch':>5} {'threads':>7} {'TTFT s':>8} {'decode tok/s':>13} "
        f"{'out tok/s':>10} {'worker RSS MB':>14} {'weights MB':>11} {'file MB':>8}"
    ]
    for label, res in report["results"].items():
        for entry in res["batches"]:
            lines.append(
                f"{label:<8} {entry['batch']:>5} {res.get('worker_threads', '?'):>7} "
                f"{entry['ttft_s']:>8.3f} "
                f"{entry['decode_tok_s']:>13.1f} {entry['output_tok_s']:>10.1f} "
                f"{res['worker_rss_bytes'] / 2**20:>14.0f} "
                f"{res['model_weight_bytes'] / 2**20:>11.1f} "
                f"{res['checkpoint_file_bytes'] / 2**20:>8.1f}"
            )
    return "\n".join(lines)


def parse_batches(text: str) -> list[int]:
    """``"1,4,16"`` -> ``[1, 4, 16]``.

    Raises:
        ValueError: on an empty list or a non-positive or non-integer entry.
    """
    try:
        batches = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--batch expects comma-separated integers, got {text!r}") from None
    if not batches or min(batches) < 1:
        raise ValueError(f"--batch expects positive integers, got {text!r}")
    return batches


def _worker_main(argv: list[str] | None = None) -> int:
    """One model in this process; the parent (:func:`run_bench`) reads ``--result``."""
    parser = argparse.ArgumentParser(prog="python -m vllm_duogpt.bench")
    parser.add_argument("model")
    parser.add_argument("--result", required=True)
    parser.add_argument("--batch", type=parse_batches, default=list(DEFAULT_BATCHES))
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    result = bench_engine(
        args.model,
        args.batch,
        args.max_tokens,
        args.prompt_len,
        args.repeats,
        not args.compile,
        dtype=args.dtype,
    )
    Path(args.result).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    # Run from the imported module, not __main__: vLLM pickles model_memory by reference
    # to ship it to the worker, and the worker must find it under its real name.
    from vllm_duogpt.bench import _worker_main as worker_main

    sys.exit(worker_main())
