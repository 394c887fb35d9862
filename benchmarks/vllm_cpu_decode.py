"""vLLM end-to-end decode on CPU: dense fp32 vs DuoGPT on a random ~1B LLaMA-shaped model.

Builds (once, into --work) a randomly initialised LLaMA-shaped model (hidden 2048, 16 layers,
intermediate 5632, 32 heads, 4 KV heads, SmolLM2's tokenizer and vocabulary), saves it dense in
fp32 and as a DuoGPT checkpoint pruned by magnitude with thresholds calibrated on its own
activations, then runs ``duogpt bench`` on both: decode tokens/s at each batch size, time to first
token and resident memory, each engine in its own process, one after the other. On a shared
machine the speed drifts between the two engines' runs, so ``--rounds N`` repeats the pair N
times and reports each round's ratios and their median.

    python benchmarks/vllm_cpu_decode.py --work out/bench-1b --out results/vllm_cpu_decode
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
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
    parser.add_argument("--rounds", type=int, default=1, help="dense + duogpt pairs to run")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    models = build_models(Path(args.work), args.weight_sparsity, args.act_sparsity)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    reports = []
    for round_no in range(1, args.rounds + 1):
        logging.info("round %d of %d", round_no, args.rounds)
        reports.append(
            run_bench(
                models,
                batches=parse_batches(args.batch),
                max_tokens=args.max_tokens,
                prompt_len=args.prompt_len,
                repeats=args.repeats,
            )
        )
    out.with_suffix(".json").write_text(json.dumps({"rounds": reports}, indent=2) + "\n")
    if len(reports) == 1:
        table = f"{format_table(reports[0])}\n\n{ratio_lines(reports[0])}"
    else:
        rounds = [
            f"round {i}:\n{format_table(r)}\n\n{ratio_lines(r)}" for i, r in enumerate(reports, 1)
        ]
        table = "\n\n".join([*rounds, median_lines(reports)])
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    return 0


def decode_ratios(report: dict) -> dict[int, float]:
    """Batch size -> duogpt decode tokens/s over dense fp32's, within one report."""
    dense, sparse = report["results"]["dense-fp32"], report["results"]["duogpt"]
    return {
        d["batch"]: s["decode_tok_s"] / d["decode_tok_s"]
        for d, s in zip(dense["batches"], sparse["batches"], strict=True)
    }


def median_lines(reports: list[dict]) -> str:
    """Each batch's ratio in every round and their median."""
    per_round = [decode_ratios(r) for r in reports]
    lines = []
    for batch in per_round[0]:
        values = [ratios[batch] for ratios in per_round]
        listed = ", ".join(f"{v:.2f}x" for v in values)
        lines.append(
            f"batch {batch}: duogpt decode = {statistics.median(values):.2f}x dense fp32, "
            f"median of {len(values)} rounds ({listed})"
        )
    return "\n".join(lines)


def ratio_lines(report: dict) -> str:
    """DuoGPT over dense fp32, measured in this run: decode speed per batch and resident memory."""
    dense, sparse = report["results"]["dense-fp32"], report["results"]["duogpt"]
    lines = [
        f"batch {batch}: duogpt decode = {ratio:.2f}x dense fp32"
        for batch, ratio in decode_ratios(report).items()
    ]
    rss = sparse["worker_rss_bytes"] / dense["worker_rss_bytes"]
    weights = sparse["model_weight_bytes"] / dense["model_weight_bytes"]
    lines.append(f"worker RSS: {rss:.2f}x dense fp32; model weights held: {weights:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
