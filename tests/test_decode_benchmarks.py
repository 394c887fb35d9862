"""The vLLM decode benchmarks' own parts: the random models they build, the ratios they report
and the GPU script's end-to-end targets (benchmarks/random_llama.py, vllm_decode.py,
gpu_kernels.py). The engines themselves are covered by test_evaluate.py's ``duogpt bench`` test.

Oracles: the dense checkpoint's own weights (the DuoGPT checkpoint must hold them, pruned by
magnitude), and arithmetic on hand-written reports.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gpu_kernels
import pytest
import torch
from random_llama import build_models, dense_label
from vllm_decode import decode_ratios, median_lines, ratio_lines, render

from vllm_duogpt import format as fmt
from vllm_duogpt.calibrate.cache import cache_root

TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    vocab_size=50000,  # more rows than the tokenizer has, as LLaMA-3-8B's 128256 are
    tie_word_embeddings=False,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    if not (cache_root() / "models" / "smollm2-135m").is_dir():
        pytest.skip("SmolLM2's tokenizer missing; run `duogpt prepare-model smollm2-135m`")
    work = tmp_path_factory.mktemp("bench")
    return work, build_models(work, TINY, 0.5, 0.5, torch.bfloat16, value_dtype=torch.bfloat16)


def test_dense_and_duogpt_checkpoints_of_one_model(built) -> None:
    from transformers import LlamaForCausalLM

    _, models = built
    assert list(models) == ["dense-bf16", "duogpt"] and dense_label(torch.bfloat16) == "dense-bf16"
    dense = LlamaForCausalLM.from_pretrained(models["dense-bf16"]).state_dict()
    assert dense["model.embed_tokens.weight"].shape == (50000, 64)
    assert dense["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16

    state, thresholds, config = fmt.read_checkpoint(models["duogpt"])
    linears = [k for k in dense if ".layers." in k and k.endswith("proj.weight")]
    assert len(linears) == 14 and len(thresholds) == 14
    assert all(t > 0 for t in thresholds.values())
    assert config["quantization_config"]["act_sparsity"] == 0.5
    for key in linears:
        w, kept = dense[key], state[key]
        assert kept.dtype == torch.bfloat16
        # half of every row pruned, the largest magnitudes kept, exactly as they were
        assert ((kept == 0).sum(1) == w.shape[1] // 2).all(), key
        mask = kept != 0
        assert torch.equal(kept[mask], w[mask]), key
        smallest_kept = w.abs().where(mask, torch.inf).amin(1)
        largest_dropped = w.abs().where(~mask, 0).amax(1)
        assert (smallest_kept >= largest_dropped).all(), key
    assert torch.equal(state["lm_head.weight"], dense["lm_head.weight"])


def test_built_models_are_reused(built) -> None:
    work, models = built
    stamps = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()}
    assert build_models(work, TINY, 0.5, 0.5, torch.bfloat16, value_dtype=torch.bfloat16) == models
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()} == stamps


def report(dense_tok_s: dict[int, float], duogpt_tok_s: dict[int, float]) -> dict:
    """A ``run_bench`` report with only the fields the ratios read."""

    def engine(tok_s: dict[int, float], rss: int, weights: int) -> dict:
        batches = [{"batch": b, "decode_tok_s": v} for b, v in tok_s.items()]
        return {"batches": batches, "worker_rss_bytes": rss, "model_weight_bytes": weights}

    return {
        "results": {
            "dense-bf16": engine(dense_tok_s, 400, 100),
            "duogpt": engine(duogpt_tok_s, 300, 30),
        }
    }


def test_ratios_within_each_round_and_their_median() -> None:
    rounds = [
        report({1: 50.0, 16: 400.0}, {1: 100.0, 16: 380.0}),
        report({1: 40.0, 16: 400.0}, {1: 120.0, 16: 420.0}),
        report({1: 50.0, 16: 500.0}, {1: 125.0, 16: 500.0}),
    ]
    assert decode_ratios(rounds[0]) == {1: 2.0, 16: 0.95}
    assert ratio_lines(rounds[0]).splitlines() == [
        "batch 1: duogpt decode = 2.00x dense bf16",
        "batch 16: duogpt decode = 0.95x dense bf16",
        "worker RSS: 0.75x dense bf16; model weights held: 0.30x",
    ]
    assert median_lines(rounds).splitlines() == [
        "batch 1: duogpt decode = 2.50x dense bf16, median of 3 rounds (2.00x, 3.00x, 2.50x)",
        "batch 16: duogpt decode = 1.00x dense bf16, median of 3 rounds (0.95x, 1.05x, 1.00x)",
    ]
    assert gpu_kernels.end_to_end_checks(rounds) == [
        "PASS vLLM decode batch 1: 2.50x dense (>= 1.8), median of 3 round(s)",
        "PASS vLLM decode batch 16: 1.00x dense (>= 0.97), median of 3 round(s)",
    ]
    assert gpu_kernels.end_to_end_checks(rounds[:1]) == [
        "PASS vLLM decode batch 1: 2.00x dense (>= 1.8), median of 1 round(s)",
        "MISS vLLM decode batch 16: 0.95x dense (>= 0.97), median of 1 round(s)",
    ]


def test_render_gives_every_round_then_the_medians() -> None:
    rounds = [report({1: 50.0}, {1: 100.0}), report({1: 40.0}, {1: 120.0})]
    for r in rounds:
        for engine in r["results"].values():
            engine.update(checkpoint_file_bytes=2**20)
            for entry in engine["batches"]:
                entry.update(ttft_s=0.1, output_tok_s=entry["decode_tok_s"] / 2)
    text = render(rounds)
    assert text.index("round 1:") < text.index("round 2:") < text.index("median of 2 rounds")
    assert "2.00x dense bf16" in text and "3.00x dense bf16" in text
    assert "round 1:" not in render(rounds[:1])


def test_gpu_script_reports_a_missing_vllm(monkeypatch, tmp_path) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        gpu_kernels.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "vllm" else real(name, *a),
    )
    section = gpu_kernels.vllm_end_to_end(tmp_path / "work", rounds=1)
    assert section.targets == [] and "vLLM is not installed" in section.record["skipped"]
    assert "Not run: vLLM is not installed" in section.markdown
    assert not (tmp_path / "work").exists()  # nothing built for an engine that cannot run
