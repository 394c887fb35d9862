"""DuoGPT checkpoints served by vLLM match a plain-torch oracle of the same sparse model.

Every vLLM engine runs in its own process (tests/vllm_runner.py); the oracle is transformers with
the checkpoint's masked dense weights and threshold hooks (vllm_duogpt.torch_model).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from factory import PROMPTS, build_model, build_tokenizer, make_checkpoint

from vllm_duogpt.calibrate.config import CalibrationConfig
from vllm_duogpt.calibrate.pipeline import calibrate
from vllm_duogpt.torch_model import load_torch_model

pytestmark = pytest.mark.vllm
RUNNER = Path(__file__).with_name("vllm_runner.py")
MAX_TOKENS = 12
LOGPROB_TOL = 1e-3


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("llama") / "ckpt", arch="llama")


@pytest.fixture(scope="module")
def qwen2_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("qwen2") / "ckpt", arch="qwen2", seed=1)


@pytest.fixture(scope="module")
def calibrated_ckpt(tmp_path_factory) -> Path:
    """The tiny Llama (fp16, so every kernel keeps its values exactly) calibrated with DuoGPT."""
    work = tmp_path_factory.mktemp("calibrated")
    tokenizer = build_tokenizer(work / "dense")
    model = build_model("llama", len(tokenizer), seed=2).half()
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(work / "dense")
    windows = torch.randint(2, len(tokenizer), (8, 64), generator=torch.Generator().manual_seed(0))
    config = CalibrationConfig(model=str(work / "dense"), out=work / "ckpt", nsamples=8, seqlen=64)
    calibrate(config, windows)
    return work / "ckpt"


def run_vllm(ckpt: Path, tmp_path: Path, *flags: str) -> list[dict]:
    out = tmp_path / "vllm.json"
    cmd = [sys.executable, str(RUNNER), str(ckpt), "--prompts", json.dumps(PROMPTS)]
    cmd += ["--max-tokens", str(MAX_TOKENS), "--out", str(out), *flags]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (tmp_path / "vllm.log").write_text(proc.stdout + proc.stderr)
    return json.loads(out.read_text())


def torch_greedy(ckpt: Path, prompt_ids: list[int]) -> tuple[list[int], list[float]]:
    """Greedy continuation and chosen-token logprobs from the transformers oracle."""
    model = load_torch_model(ckpt)
    ids = torch.tensor([prompt_ids])
    tokens, logprobs = [], []
    with torch.no_grad():
        for _ in range(MAX_TOKENS):
            logp = model(ids).logits[0, -1].float().log_softmax(-1)
            token = int(logp.argmax())
            tokens.append(token)
            logprobs.append(float(logp[token]))
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokens, logprobs


def assert_matches_oracle(ckpt: Path, results: list[dict]) -> None:
    assert len(results) == len(PROMPTS)
    for result in results:
        tokens, logprobs = torch_greedy(ckpt, result["prompt_token_ids"])
        assert result["token_ids"] == tokens
        assert max(abs(a - b) for a, b in zip(result["logprobs"], logprobs, strict=True)) < (
            LOGPROB_TOL
        )


def test_eager_matches_torch_oracle(llama_ckpt, tmp_path):
    assert_matches_oracle(llama_ckpt, run_vllm(llama_ckpt, tmp_path, "--eager"))
    # the fp16 checkpoint served in fp32 ran its lm_head through the 16-bit CPU product
    log = (tmp_path / "vllm.log").read_text()
    assert "lm_head kept in torch.float16" in log
    assert "input embedding looked up only, no GEMM copy packed" in log


def test_compiled_matches_torch_oracle(llama_ckpt, tmp_path):
    assert_matches_oracle(llama_ckpt, run_vllm(llama_ckpt, tmp_path))


def test_tensor_parallel_2_matches_torch_oracle(llama_ckpt, tmp_path):
    results = run_vllm(llama_ckpt, tmp_path, "--eager", "--tp", "2")
    assert_matches_oracle(llama_ckpt, results)


def test_qwen2_with_qkv_bias_matches_torch_oracle(qwen2_ckpt, tmp_path):
    assert_matches_oracle(qwen2_ckpt, run_vllm(qwen2_ckpt, tmp_path, "--eager"))
    # its lm_head is tied to the embedding, which must stay in the serving dtype
    log = (tmp_path / "vllm.log").read_text()
    assert "lm_head kept in" not in log
    assert "input embedding looked up only, no GEMM copy packed" in log  # lm_head has its own


def test_duogpt_calibrated_checkpoint_matches_torch_oracle(calibrated_ckpt, tmp_path):
    assert_matches_oracle(calibrated_ckpt, run_vllm(calibrated_ckpt, tmp_path, "--eager"))


def test_sparsity_changes_the_output(llama_ckpt, tmp_path):
    """Guards the oracle itself: without the thresholds the model answers differently."""
    model = load_torch_model(llama_ckpt)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        sparse = model(ids).logits
        for module in model.modules():
            module._forward_pre_hooks.clear()
        dense = model(ids).logits
    assert (sparse - dense).abs().max() > 1e-2
