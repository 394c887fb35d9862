"""Small real models for tests: a trained BPE tokenizer, random Llama/Qwen2 models, and their
magnitude-pruned DuoGPT checkpoints with calibrated activation thresholds."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from vllm_duogpt.calibrate.synthetic import write_sparse_checkpoint

CORPUS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune,",
    "must be in want of a wife. However little known the feelings or views of such a man may be",
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the",
    "surrounding families, that he is considered the rightful property of some one or other of",
    "their daughters. The quick brown fox jumps over the lazy dog; 0123456789 !?.,;:'\"()",
]
PROMPTS = [
    "It is a truth universally",
    "The quick brown fox",
    "their daughters",
    "a single man in possession of",
]


def build_tokenizer(out_dir: Path) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (about 300 tokens) on a fixed corpus and save it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out_dir)
    return fast


def build_model(arch: str, vocab_size: int, seed: int = 0) -> torch.nn.Module:
    """A random 2-layer model whose head counts allow TP=2 (4 heads, 2 KV heads)."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        # A large init makes the next-token distribution peaked, so greedy decoding is not
        # decided by float rounding differences between implementations.
        initializer_range=0.5,
        # Qwen2 ties lm_head to the embedding (as SmolLM2 does), Llama does not: both vLLM paths.
        tie_word_embeddings=arch == "qwen2",
        bos_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False))
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    else:
        raise ValueError(f"unknown arch {arch!r}")
    return model.eval()


def make_checkpoint(
    out_dir: Path,
    arch: str = "llama",
    weight_sparsity: float = 0.5,
    act_sparsity: float = 0.5,
    seed: int = 0,
) -> Path:
    """Write a magnitude-pruned DuoGPT checkpoint of a random model (tokenizer included)."""
    tok_dir = out_dir.parent / f".{out_dir.name}-tokenizer"
    tokenizer = build_tokenizer(tok_dir)
    model = build_model(arch, len(tokenizer), seed)
    tokens = torch.randint(
        2, len(tokenizer), (4, 32), generator=torch.Generator().manual_seed(seed)
    )
    # Stored in fp16 like a real checkpoint: every kernel keeps 16-bit values exactly, so vLLM
    # (computing in fp32) and the fp32 torch oracle multiply by identical weights.
    return write_sparse_checkpoint(
        model, out_dir, weight_sparsity, act_sparsity, tokens, torch.float16, tok_dir
    )
