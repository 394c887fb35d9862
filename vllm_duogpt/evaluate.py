"""Perplexity of a dense model or a DuoGPT checkpoint, through vLLM or plain transformers.

Both backends score the same token windows: the evaluation text (``calibrate.calib_data``) cut
into consecutive, non-overlapping windows of ``seqlen`` tokens, no BOS added, every position but
the first of each window predicted from the tokens before it. Perplexity is
``exp(total NLL / predicted tokens)`` over all windows (SparseGPT's recipe, without the overlap).

- ``vllm``: ``LLM.generate`` on token-id prompts with ``prompt_logprobs=0``, which returns the
  log-probability of every actual prompt token (vLLM computes them from the raw logits). A DuoGPT
  checkpoint runs through our plugin, selected from its ``config.json``.
- ``torch``: transformers in fp32. A DuoGPT checkpoint runs as masked dense weights plus
  threshold hooks (:func:`vllm_duogpt.torch_model.load_torch_model`), the oracle of the vLLM
  path; a directory written by ``duogpt export`` gets its thresholds back; any other directory
  is a plain dense model.

One vLLM engine per process: run the vLLM backend from a fresh process (the CLI does).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vllm_duogpt import format as fmt

logger = logging.getLogger(__name__)

BACKENDS = ("vllm", "torch")
# vLLM on CPU sizes its KV cache from this (GiB); without it, it takes a share of the NUMA node.
DEFAULT_KVCACHE_GIB = "2"


@dataclass(frozen=True)
class PerplexityResult:
    """The outcome of one perplexity run.

    Attributes:
        ppl: perplexity, ``exp(nll / tokens)``.
        nll: summed negative log-likelihood (nats).
        tokens: predicted tokens (``windows * (seqlen - 1)``).
        windows: number of windows scored.
        seqlen: tokens per window.
        backend: ``vllm`` or ``torch``.
        model: the model directory.
        data: the evaluation data spec.
        load_seconds: time to build the model (engine start-up for vLLM).
        seconds: time to score the windows, load excluded.
    """

    ppl: float
    nll: float
    tokens: int
    windows: int
    seqlen: int
    backend: str
    model: str
    data: str
    load_seconds: float
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One human-readable line."""
        return (
            f"ppl {self.ppl:.4f} over {self.tokens} tokens ({self.windows} windows of "
            f"{self.seqlen}), backend {self.backend}, scored in {self.seconds:.1f}s "
            f"(+{self.load_seconds:.1f}s load)"
        )


def model_kind(model_dir: str | os.PathLike[str]) -> str:
    """Classify a model directory by its ``config.json``.

    Returns:
        ``duogpt`` (a DuoGPT checkpoint), ``exported`` (``duogpt export`` output: masked dense
        weights with thresholds in the config) or ``dense`` (anything else).
    """
    from vllm_duogpt.torch_model import THRESHOLDS_KEY

    config = json.loads((Path(model_dir) / "config.json").read_text())
    if (config.get("quantization_config") or {}).get("quant_method") == fmt.QUANT_METHOD:
        return "duogpt"
    if THRESHOLDS_KEY in config:
        return "exported"
    return "dense"


def load_hf_model(model_dir: str | os.PathLike[str]) -> torch.nn.Module:
    """Build the fp32 transformers model of any directory :func:`model_kind` knows.

    Returns:
        The model in eval mode; DuoGPT and exported checkpoints carry their threshold hooks.
    """
    from vllm_duogpt.torch_model import load_exported_model, load_torch_model

    kind = model_kind(model_dir)
    if kind == "duogpt":
        return load_torch_model(model_dir, dtype=torch.float32)
    if kind == "exported":
        return load_exported_model(model_dir, dtype=torch.float32)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.inference_mode()
def torch_window_nll(
    model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4
) -> list[float]:
    """Summed next-token NLL of each window under a transformers model.

    Args:
        model: a causal LM returning ``.logits``.
        windows: LongTensor ``[n, seqlen]``.
        batch_size: windows per forward pass (the fp32 logits of one window of a 50k-vocabulary
            model at seqlen 512 take 100 MB, so keep this small).

    Returns:
        One NLL (nats, summed over ``seqlen - 1`` predictions) per window.
    """
    nlls: list[float] = []
    for start in tqdm(range(0, len(windows), batch_size), desc="torch perplexity"):
        batch = windows[start : start + batch_size]
        logits = model(batch).logits[:, :-1].float()
        # Summed per window (not averaged) so windows and backends add up exactly.
        nll = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), batch[:, 1:], reduction="none"
        ).sum(dim=1, dtype=torch.float64)
        nlls.extend(nll.tolist())
    return nlls


def vllm_window_nll(llm: Any, windows: torch.Tensor) -> list[float]:
    """Summed next-token NLL of each window from vLLM's prompt log-probabilities.

    Args:
        llm: a ``vllm.LLM`` whose ``max_model_len`` exceeds ``seqlen``.
        windows: LongTensor ``[n, seqlen]``.

    Returns:
        One NLL (nats, summed over ``seqlen - 1`` predictions) per window.

    Raises:
        RuntimeError: when vLLM leaves out the log-probability of a prompt token.
    """
    from vllm import SamplingParams, TokensPrompt

    # prompt_logprobs=0 returns exactly the logprob of each actual prompt token; max_tokens=1
    # because vLLM always samples at least one token.
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    rows = windows.tolist()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=row) for row in rows], params)
    nlls = []
    for row, output in zip(rows, outputs, strict=True):
        steps = output.prompt_logprobs
        if steps is None or len(steps) != len(row):
            raise RuntimeError(f"vLLM returned {len(steps or [])} prompt logprobs for {len(row)}")
        # steps[0] is None: the first token has no context.
        pairs = zip(steps[1:], row[1:], strict=True)
        nlls.append(-math.fsum(step[token].logprob for step, token in pairs))
    return nlls


def make_vllm_engine(
    model_dir: str | os.PathLike[str], max_model_len: int, enforce_eager: bool = True
) -> Any:
    """An fp32 ``vllm.LLM`` for scoring; the quantization method comes from ``config.json``.

    Prefix caching is off: it would let a later request reuse earlier work (a concern for
    timings, and prompt logprobs must come from a full forward pass).
    """
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_KVCACHE_GIB)
    from vllm import LLM

    if model_kind(model_dir) == "exported":
        logger.warning(
            "%s is an exported masked-dense model: vLLM runs its weights without the "
            "activation thresholds (use the DuoGPT checkpoint for dual sparsity)",
            model_dir,
        )
    return LLM(
        model=str(model_dir),
        dtype="float32",
        enforce_eager=enforce_eager,
        max_model_len=max_model_len,
        enable_prefix_caching=False,
        seed=0,
    )


def perplexity(
    model: str,
    data: str,
    seqlen: int,
    max_windows: int | None = None,
    backend: str = "vllm",
    batch_size: int = 4,
    enforce_eager: bool = True,
) -> PerplexityResult:
    """Perplexity of a model on an evaluation text.

    Args:
        model: a model directory (dense, DuoGPT or exported) or a bundled model name
            (``smollm2-135m``), resolved by ``calibrate.models.resolve_model``.
        data: an evaluation spec of ``calibrate.calib_data.load_eval_text`` (``austen-pride``,
            ``wikitext2``, a ``.txt``/``.jsonl`` path).
        seqlen: tokens per window.
        max_windows: score at most this many windows (the first ones).
        backend: ``vllm`` or ``torch``.
        batch_size: windows per forward pass (torch backend only).
        enforce_eager: skip vLLM's torch.compile (vllm backend only).

    Returns:
        The result; ``tokens`` is ``windows * (seqlen - 1)``.

    Raises:
        ValueError: unknown backend, bad ``seqlen``, unknown data or too little text.
    """
    from transformers import AutoTokenizer

    from vllm_duogpt.calibrate.calib_data import eval_windows, load_eval_text
    from vllm_duogpt.calibrate.models import resolve_model

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {BACKENDS}")
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2 to predict anything, got {seqlen}")
    model_dir = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    windows = eval_windows(load_eval_text(data), tokenizer, seqlen, max_windows)
    logger.info("%s: %d windows of %d tokens from %s", model_dir, len(windows), seqlen, data)

    started = time.perf_counter()
    if backend == "torch":
        hf_model = load_hf_model(model_dir)
        loaded = time.perf_counter()
        nlls = torch_window_nll(hf_model, windows, batch_size)
    else:
        # +1: vLLM samples one token after the prompt.
        llm = make_vllm_engine(model_dir, seqlen + 1, enforce_eager)
        loaded = time.perf_counter()
        nlls = vllm_window_nll(llm, windows)
    finished = time.perf_counter()

    nll = math.fsum(nlls)
    tokens = len(windows) * (seqlen - 1)
    return PerplexityResult(
        ppl=math.exp(nll / tokens),
        nll=nll,
        tokens=tokens,
        windows=len(windows),
        seqlen=seqlen,
        backend=backend,
        model=str(model_dir),
        data=data,
        load_seconds=loaded - started,
        seconds=finished - loaded,
    )


if __name__ == "__main__":
    # `python -m vllm_duogpt.evaluate ...` is `duogpt eval ppl ...`.
    import sys

    from vllm_duogpt.eval_cli import main

    sys.exit(main(["eval", "ppl", *sys.argv[1:]]))
