"""Run greedy generation through vLLM in its own process and print the result as JSON.

Each vLLM engine gets a fresh process (engines do not shut down cleanly enough to start several in
one test process); tests call this with ``python tests/vllm_runner.py ...``.
"""

from __future__ import annotations

import argparse
import json
import os


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--prompts", required=True, help="JSON list of prompts")
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--quantization", default="duogpt")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if args.tp > 1:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")

    from vllm import LLM, SamplingParams

    llm = LLM(
        model=args.model,
        quantization=args.quantization or None,
        dtype="float32",
        tensor_parallel_size=args.tp,
        enforce_eager=args.eager,
        max_model_len=256,
        seed=0,
    )
    # the oracle does not stop at EOS either
    params = SamplingParams(
        temperature=0.0, max_tokens=args.max_tokens, logprobs=0, ignore_eos=True
    )
    outputs = llm.generate(json.loads(args.prompts), params)
    result = [
        {
            "prompt_token_ids": list(out.prompt_token_ids),
            "token_ids": list(out.outputs[0].token_ids),
            "logprobs": [
                step[token].logprob
                for step, token in zip(
                    out.outputs[0].logprobs, out.outputs[0].token_ids, strict=True
                )
            ],
            "text": out.outputs[0].text,
        }
        for out in outputs
    ]
    with open(args.out, "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main()
