"""vLLM end-to-end decode on CPU: dense fp32 vs DuoGPT on a random ~1B LLaMA-shaped model.

Builds (once, into --work) a randomly initialised LLaMA-shaped model (hidden 2048, 16 layers,
intermediate 5632, 32 heads, 4 KV heads, SmolLM2's tokenizer and vocabulary), saves it dense in
fp32 and as a DuoGPT checkpoint pruned by magnitude with thresholds calibrated on its own
activations, then runs ``duogpt bench`` on both: decode tokens/s at each batch size, time to first
token and resident memory, each engine in its own process, one after the other.

    python benchmarks/vllm_cpu_decode.py --work out/bench-1b --out results/vllm_cpu_decode
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

import torch

from vllm_duogpt.bench import format_table, parse_batches, run_bench
from vllm_duogpt.calibrate.models import resolve_model
from vllm_duogpt.calibrate.synthetic import write_sparse_checkpoint

SHAPE = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)


def build_models(work: Path, weight_sparsity: float, act_sparsity: float) -> dict[str, str]:
    """Dense fp32 and DuoGPT checkpoints of one random model (reused when already built)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    dense, sparse = work / "dense-fp32", work / f"duogpt-w{weight_sparsity:g}-x{act_sparsity:g}"
    if dense.exists() and sparse.exists():
        return {"dense-fp32": str(dense), "duogpt": str(sparse)}
    tokenizer_dir = resolve_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), **SHAPE)
    model = LlamaForCausalLM(config).eval()
    params = sum(p.numel() for p in model.parameters())
    logging.info("random LLaMA-shaped model: %.2fB parameters", params / 1e9)
    tokens = torch.randint(0, len(tokenizer), (4, 128), generator=torch.Generator().manual_seed(0))
    for path in (dense, sparse):
        shutil.rmtree(path, ignore_errors=True)
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(dense, safe_serialization=True)
    tokenizer.save_pretrained(dense)
    write_sparse_checkpoint(
        model, sparse, weight_sparsity, act_sparsity, tokens, torch.float16, dense
    )
    return {"dense-fp32": str(dense), "duogpt": str(sparse)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="out/bench-1b", help="where the models are built")
    parser.add_argument("--out", default="results/vllm_cpu_decode", help="table + JSON prefix")
    parser.add_argument("--batch", default="1,8", help="batch sizes")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--weight-sparsity", type=float, default=0.5)
    parser.add_argument("--act-sparsity", type=float, default=0.5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    models = build_models(Path(args.work), args.weight_sparsity, args.act_sparsity)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = run_bench(
        models,
        batches=parse_batches(args.batch),
        max_tokens=args.max_tokens,
        prompt_len=args.prompt_len,
        repeats=args.repeats,
        out=out.with_suffix(".json"),
    )
    table = format_table(report) + "\n\n" + ratio_lines(report)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    return 0


def ratio_lines(report: dict) -> str:
    """DuoGPT over dense fp32, measured in this run: decode speed per batch and resident memory."""
    dense, sparse = report["results"]["dense-fp32"], report["results"]["duogpt"]
    lines = []
    for d, s in zip(dense["batches"], sparse["batches"], strict=True):
        ratio = s["decode_tok_s"] / d["decode_tok_s"]
        lines.append(f"batch {d['batch']}: duogpt decode = {ratio:.2f}x dense fp32")
    rss = sparse["worker_rss_bytes"] / dense["worker_rss_bytes"]
    weights = sparse["model_weight_bytes"] / dense["model_weight_bytes"]
    lines.append(f"worker RSS: {rss:.2f}x dense fp32; model weights held: {weights:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
