"""``vllm serve`` (through our CLI wrapper) answers a DuoGPT checkpoint over HTTP, the same for
16 concurrent requests as for the same requests one at a time, and the same as the torch oracle."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from factory import PROMPTS, make_checkpoint

from vllm_duogpt.server import VllmServer
from vllm_duogpt.torch_model import load_torch_model

pytestmark = pytest.mark.vllm
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("serve")
    ckpt = make_checkpoint(work / "ckpt")
    flags = ["--dtype", "float32", "--max-model-len", "256", "--enforce-eager"]
    with VllmServer(
        ckpt, flags, log_path=work / "serve.log", env={"VLLM_CPU_KVCACHE_SPACE": "1"}
    ) as srv:
        yield srv, ckpt


def complete(srv: VllmServer, prompt: str) -> dict:
    answer = srv.post(
        "/v1/completions",
        {
            "model": srv.model_name(),
            "prompt": prompt,
            "max_tokens": MAX_TOKENS,
            "temperature": 0.0,
            "ignore_eos": True,
            "return_token_ids": True,
        },
    )
    return answer["choices"][0]


def sixteen_prompts() -> list[str]:
    return [f"{PROMPTS[i % len(PROMPTS)]}{' ' * (i // len(PROMPTS))}" for i in range(16)]


def test_concurrent_answers_equal_sequential_ones(server):
    srv, _ = server
    prompts = sixteen_prompts()
    sequential = [complete(srv, p)["token_ids"] for p in prompts]
    with ThreadPoolExecutor(max_workers=16) as pool:
        concurrent = list(pool.map(lambda p: complete(srv, p)["token_ids"], prompts))
    assert concurrent == sequential
    assert all(len(tokens) == MAX_TOKENS for tokens in sequential)


def test_served_tokens_match_torch_oracle(server):
    import torch

    srv, ckpt = server
    model = load_torch_model(ckpt)
    choice = complete(srv, PROMPTS[0])
    prompt_ids = choice["prompt_token_ids"]
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)[0]
    assert choice["token_ids"] == expected[len(prompt_ids) :].tolist()


def test_server_reports_the_duogpt_method(server):
    srv, _ = server
    assert "duogpt" in srv.log_tail(200_000)
