"""End-to-end calibration of tiny random LLaMA-family models: sparsity, checkpoint contents,
agreement with a plain Hugging Face forward, baselines, errors, and kill -9 / resume identity."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from vllm_duogpt import format as fmt
from vllm_duogpt.calibrate.cli import add_calibrate_parser, run_calibrate
from vllm_duogpt.calibrate.config import CalibrationConfig, CalibrationError
from vllm_duogpt.calibrate.pipeline import calibrate
from vllm_duogpt.kernels.reference import sparsify_activations

VOCAB = 128
NSAMPLES, SEQLEN = 8, 32
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_config(arch: str, layers: int = 2):
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        initializer_range=0.2, tie_word_embeddings=False,
    )  # fmt: skip
    if arch == "llama":
        return LlamaConfig(**common)
    return Qwen2Config(**common, use_sliding_window=False)


def save_tiny(path: Path, arch: str = "llama", layers: int = 2, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model_cls = LlamaForCausalLM if arch == "llama" else Qwen2ForCausalLM
    model = model_cls(tiny_config(arch, layers)).eval()
    if arch == "qwen2":
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    model.save_pretrained(path)
    return path


def windows(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (NSAMPLES, SEQLEN), generator=generator)


def run(model_dir: Path, out: Path, **overrides):
    config = CalibrationConfig(model=str(model_dir), out=out, nsamples=NSAMPLES, seqlen=SEQLEN,
                               **overrides)  # fmt: skip
    return calibrate(config, windows())


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("llama") / "dense")


@pytest.fixture(scope="module")
def duogpt_run(llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("duogpt") / "ckpt"
    return run(llama_dir, out), out


def measured_act_sparsity(model_dir: Path, ckpt: Path, arch: str = "llama") -> dict[str, float]:
    """Oracle: load the checkpoint into a plain HF model, threshold every linear's input with a
    pre-hook and count zeros over a normal batched forward of the calibration windows."""
    state, thresholds, _ = fmt.read_checkpoint(ckpt)
    model_cls = LlamaForCausalLM if arch == "llama" else Qwen2ForCausalLM
    model = model_cls.from_pretrained(model_dir).eval()
    model.load_state_dict(state, strict=True)
    zeros: dict[str, float] = {}

    def hook_for(name: str, tau: float):
        def hook(module, args):
            x = sparsify_activations(args[0], tau)
            zeros[name] = float((x == 0).float().mean())
            return (x,)

        return hook

    for name, tau in thresholds.items():
        model.get_submodule(name).register_forward_pre_hook(hook_for(name, tau))
    with torch.no_grad():
        model(windows())
    return zeros


def test_end_to_end_sparsity_and_checkpoint(llama_dir, duogpt_run):
    report, out = duogpt_run
    assert len(report.linears) == 2 * len(PROJECTIONS)
    assert report.weight_sparsity == pytest.approx(0.5, abs=1e-9)
    assert report.act_sparsity == pytest.approx(0.5, abs=2e-3)
    assert report.seconds > 0 and report.peak_rss_bytes > 0 and report.peak_memory_bytes > 0
    state, thresholds, config = fmt.read_checkpoint(out)
    dense = LlamaForCausalLM.from_pretrained(llama_dir).state_dict()
    assert config["quantization_config"]["alpha"] == 0.25
    saved = json.loads((out / "calibration_report.json").read_text())["linears"]
    assert [r["name"] for r in saved] == [r.name for r in report.linears]
    assert sorted(thresholds) == sorted(
        f"model.layers.{i}.{part}.{p}"
        for i in range(2)
        for part, projs in (("self_attn", PROJECTIONS[:4]), ("mlp", PROJECTIONS[4:]))
        for p in projs
    )
    for r in report.linears:
        weight = state[f"{r.name}.weight"]
        assert float((weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-9)
        assert thresholds[r.name] == r.threshold > 0
        assert 0.0 < r.rel_error < float("inf") and r.seconds >= 0
    # q/k/v and gate/up share their input, hence their threshold.
    layer = "model.layers.1"
    assert thresholds[f"{layer}.self_attn.q_proj"] == thresholds[f"{layer}.self_attn.v_proj"]
    assert thresholds[f"{layer}.mlp.gate_proj"] == thresholds[f"{layer}.mlp.up_proj"]
    for key, tensor in dense.items():
        if not any(key.endswith(f"{p}.weight") for p in PROJECTIONS):
            assert torch.equal(state[key], tensor), key
    assert not Path(str(out) + ".partial").exists()


def test_pipeline_agrees_with_plain_forward(llama_dir, duogpt_run):
    # The driver's pruned trajectory must be what a normal forward of the checkpoint computes:
    # then its measured activation sparsity is the one a plain batched forward measures.
    report, out = duogpt_run
    oracle = measured_act_sparsity(llama_dir, out)
    for r in report.linears:
        assert r.act_sparsity == pytest.approx(0.5, abs=2e-3)
        assert oracle[r.name] == pytest.approx(r.act_sparsity, abs=1e-3), r.name


def test_qwen2_with_biases(tmp_path):
    model_dir = save_tiny(tmp_path / "qwen", arch="qwen2")
    report = run(model_dir, tmp_path / "ckpt", pattern="2:4")
    state, _, _ = fmt.read_checkpoint(tmp_path / "ckpt")
    dense = Qwen2ForCausalLM.from_pretrained(model_dir).state_dict()
    assert torch.equal(state["model.layers.0.self_attn.q_proj.bias"],
                       dense["model.layers.0.self_attn.q_proj.bias"])  # fmt: skip
    for r in report.linears:
        zeros = (state[f"{r.name}.weight"] == 0).reshape(r.shape[0], -1, 4).sum(-1)
        assert bool((zeros == 2).all()), r.name
    oracle = measured_act_sparsity(model_dir, tmp_path / "ckpt", arch="qwen2")
    for r in report.linears:
        assert oracle[r.name] == pytest.approx(r.act_sparsity, abs=1e-3), r.name


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_baselines(llama_dir, tmp_path, method):
    report = run(llama_dir, tmp_path / "ckpt", method=method)
    assert report.weight_sparsity == pytest.approx(0.5, abs=1e-9)
    _, _, config = fmt.read_checkpoint(tmp_path / "ckpt")
    assert config["quantization_config"]["calibration_method"] == method
    assert config["quantization_config"]["alpha"] == 0.0


def test_activation_only_and_weight_only(llama_dir, tmp_path):
    dense = LlamaForCausalLM.from_pretrained(llama_dir).state_dict()
    run(llama_dir, tmp_path / "act", weight_sparsity=0.0)
    state, thresholds, _ = fmt.read_checkpoint(tmp_path / "act")
    assert all(torch.equal(state[k], dense[k]) for k in dense)
    assert all(t > 0 for t in thresholds.values())
    report = run(llama_dir, tmp_path / "weights", act_sparsity=0.0)
    _, thresholds, _ = fmt.read_checkpoint(tmp_path / "weights")
    assert all(t == 0.0 for t in thresholds.values())
    assert report.weight_sparsity == pytest.approx(0.5, abs=1e-9)
    assert report.act_sparsity < 0.01


def test_too_little_memory_names_the_flags(llama_dir, tmp_path, monkeypatch):
    from vllm_duogpt.calibrate import memory

    monkeypatch.setattr(memory, "_free_host_bytes", lambda: 1 << 20)
    with pytest.raises(CalibrationError, match=r"--nsamples or --seqlen"):
        run(llama_dir, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt.partial").exists()


def test_bad_inputs_are_one_line_errors(llama_dir, tmp_path):
    with pytest.raises(CalibrationError, match="max_position_embeddings"):
        calibrate(CalibrationConfig(model=str(llama_dir), out=tmp_path / "a", seqlen=512))
    with pytest.raises(CalibrationError, match=r"--nsamples, --seqlen"):
        calibrate(CalibrationConfig(model=str(llama_dir), out=tmp_path / "b", nsamples=4,
                                    seqlen=SEQLEN), windows())  # fmt: skip
    (tmp_path / "exists").mkdir()
    with pytest.raises(CalibrationError, match="already exists"):
        run(llama_dir, tmp_path / "exists")
    for bad in (dict(weight_sparsity=1.0), dict(act_sparsity=-0.1), dict(pattern="3:2"),
                dict(pattern="2:4", weight_sparsity=0.7), dict(method="obs")):  # fmt: skip
        with pytest.raises(CalibrationError) as info:
            CalibrationConfig(model="m", out=tmp_path / "c", **bad)
        assert "\n" not in str(info.value)
    gpt2_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2)).save_pretrained(
        gpt2_dir
    )
    parser = argparse.ArgumentParser()
    add_calibrate_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["calibrate", "--model", str(gpt2_dir), "--out", str(tmp_path / "g")])
    assert run_calibrate(args) == 2


RUNNER = textwrap.dedent(
    """
    import logging, sys, torch
    from pathlib import Path
    from vllm_duogpt.calibrate.config import CalibrationConfig
    from vllm_duogpt.calibrate.pipeline import calibrate
    logging.basicConfig(level=logging.INFO)
    model, out, windows, resume = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
    config = CalibrationConfig(model=model, out=out, nsamples=16, seqlen=32, resume=resume)
    calibrate(config, torch.load(windows))
    """
)


def _spawn(script: Path, model_dir: Path, out: Path, data: Path, resume: bool):
    """Start a calibration in a fresh process; its output goes to ``<out>.log``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    log = Path(f"{out}.{'resume' if resume else 'run'}.log")
    argv = [sys.executable, str(script), str(model_dir), str(out), str(data), str(int(resume))]
    with open(log, "w") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(argv, env=env, stdout=handle, stderr=subprocess.STDOUT), log


def test_kill_and_resume_is_identical(tmp_path):
    model_dir = save_tiny(tmp_path / "dense", layers=4, seed=1)
    data = tmp_path / "windows.pt"
    torch.save(torch.randint(0, VOCAB, (16, 32), generator=torch.Generator().manual_seed(2)), data)
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)

    whole, whole_log = _spawn(script, model_dir, tmp_path / "whole", data, resume=False)
    killed_out = tmp_path / "killed"
    state_file = tmp_path / "killed.partial" / "state.json"
    victim, _ = _spawn(script, model_dir, killed_out, data, resume=False)
    deadline = time.monotonic() + 120
    while not state_file.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert whole.wait(timeout=180) == 0, whole_log.read_text()
    assert not killed_out.exists(), "the run finished before it could be killed"
    assert json.loads(state_file.read_text())["next_block"] >= 1

    with pytest.raises(CalibrationError, match="--resume"):  # partial state needs --resume
        calibrate(CalibrationConfig(model=str(model_dir), out=killed_out, nsamples=16, seqlen=32),
                  torch.load(data))  # fmt: skip
    with pytest.raises(CalibrationError, match="alpha"):  # ... and the same settings
        calibrate(CalibrationConfig(model=str(model_dir), out=killed_out, nsamples=16, seqlen=32,
                                    resume=True, alpha=0.5), torch.load(data))  # fmt: skip

    resumed, resumed_log = _spawn(script, model_dir, killed_out, data, resume=True)
    assert resumed.wait(timeout=180) == 0, resumed_log.read_text()
    assert "resuming" in resumed_log.read_text()
    expected, expected_thresholds, _ = fmt.read_checkpoint(tmp_path / "whole")
    got, got_thresholds, _ = fmt.read_checkpoint(killed_out)
    assert got_thresholds == expected_thresholds
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key
