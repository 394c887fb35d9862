"""vLLM end-to-end decode on CPU: dense fp32 vs DuoGPT on a random ~1B LLaMA-shaped model.

Builds (once, into --work) a randomly initialised LLaMA-shaped model (hidden 2048, 16 layers,
intermediate 5632, 32 heads, 4 KV heads, SmolLM2's tokenizer and vocabulary; random_llama.py),
saves it dense in fp32 and as a DuoGPT checkpoint (fp16 values) pruned by magnitude with
thresholds calibrated on its own activations, then runs ``duogpt bench`` on both: decode tokens/s
at each batch size, time to first token and resident memory, each engine in its own process, one
after the other. On a shared machine the speed drifts between the two engines' runs, so
``--rounds N`` repeats the pair N times and reports each round's ratios and their median
(vllm_decode.py).

    python benchmarks/vllm_cpu_decode.py --work out/bench-1b --out results/vllm_cpu_decode
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from random_llama import LLAMA_1B, build_models
from vllm_decode import render, run_rounds

from vllm_duogpt.bench import parse_batches


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

    models = build_models(Path(args.work), LLAMA_1B, args.weight_sparsity, args.act_sparsity)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    reports = run_rounds(
        models,
        args.rounds,
        batches=parse_batches(args.batch),
        max_tokens=args.max_tokens,
        prompt_len=args.prompt_len,
        repeats=args.repeats,
    )
    out.with_suffix(".json").write_text(json.dumps({"rounds": reports}, indent=2) + "\n")
    table = render(reports)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
