"""Calibration and evaluation token windows.

Calibration follows SparseGPT's recipe (method.md section 6): tokenize a corpus once, without
special tokens, and cut ``nsamples`` windows of ``seqlen`` tokens at seeded random offsets.
Evaluation cuts the held-out text into fixed, non-overlapping windows (perplexity the usual way).

Calibration specs:

- ``austen``: the five Austen novels other than *Pride and Prejudice* (held out for evaluation);
- ``austen:<book>[,<book>]``: chosen novels by package key (``emma``, ``persuasion``, ...);
- a file path: ``.jsonl`` (one JSON object per line with a ``text`` field) or plain text;
- ``c4`` / ``wikitext2``: the paper's corpora through the ``datasets`` package (needs the hub);
- ``self``: sequences sampled from the model itself at temperature 1, starting from BOS (data-free
  calibration, as in LLM-QAT); needs ``model``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vllm_duogpt.calibrate.austen import BOOKS, HELD_OUT, austen_books

logger = logging.getLogger(__name__)

DEFAULT_CALIBRATION = "austen"
DEFAULT_EVAL = "austen-pride"

_SPEC_HELP = (
    "use 'austen', 'austen:<book>[,<book>]' (books: " + ", ".join(BOOKS) + "), "
    "a .txt or .jsonl file path, 'c4', 'wikitext2' or 'self'"
)


def calibration_text(spec: str) -> str:
    """Return the raw calibration text of a text-based spec (every spec but ``c4`` and ``self``).

    Raises:
        ValueError: unknown spec, unknown book, missing or empty file.
    """
    if spec == "austen":
        books = austen_books()
        return "\n\n".join(text for key, text in books.items() if key != HELD_OUT)
    if spec.startswith("austen:"):
        keys = [k.strip() for k in spec.removeprefix("austen:").split(",") if k.strip()]
        unknown = [k for k in keys if k not in BOOKS]
        if not keys or unknown:
            raise ValueError(
                f"unknown Austen book(s) {unknown or keys!r} in {spec!r}; {_SPEC_HELP}"
            )
        books = austen_books()
        return "\n\n".join(books[k] for k in keys)
    if spec == "wikitext2":
        return "\n\n".join(_hub_texts("wikitext2", "train"))
    if spec in ("c4", "self"):
        raise ValueError(f"calibration data {spec!r} is not one text; use load_calibration_windows")
    if _looks_like_path(spec):
        return read_text_file(Path(spec))
    raise ValueError(f"unknown calibration data {spec!r}; {_SPEC_HELP}")


def load_calibration_windows(
    spec: str,
    tokenizer: Any,
    nsamples: int,
    seqlen: int,
    seed: int,
    model: torch.nn.Module | None = None,
) -> torch.Tensor:
    """Return ``nsamples`` calibration windows of ``seqlen`` tokens, deterministic in ``seed``.

    Args:
        spec: where the text comes from (see the module docstring).
        tokenizer: a Hugging Face tokenizer.
        nsamples: number of windows.
        seqlen: tokens per window.
        seed: seeds the window offsets (and the sampling for ``self``).
        model: the model to sample from; only for ``self``.

    Returns:
        LongTensor ``[nsamples, seqlen]`` on the CPU.

    Raises:
        ValueError: unknown spec, unusable source, or fewer than ``nsamples * seqlen`` tokens.
    """
    if nsamples < 1 or seqlen < 1:
        raise ValueError(f"nsamples and seqlen must be >= 1, got {nsamples} and {seqlen}")
    if spec == "self":
        if model is None:
            raise ValueError("calibration data 'self' samples from the model: pass model=")
        return sample_from_model(model, tokenizer, nsamples, seqlen, seed)
    if spec == "c4":
        tokens = _c4_tokens(tokenizer, nsamples * seqlen, seed)
    else:
        tokens = tokenize(calibration_text(spec), tokenizer)
    return random_windows(tokens, nsamples, seqlen, seed, source=spec)


def random_windows(
    tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int, source: str = "text"
) -> torch.Tensor:
    """Cut ``nsamples`` windows at seeded uniform random offsets of a 1-D token stream.

    Windows may overlap (as in SparseGPT), but the stream must hold at least ``nsamples *
    seqlen`` tokens so that the windows are not mostly repeats of each other.

    Raises:
        ValueError: too few tokens (the message says how many were found and needed).
    """
    needed = nsamples * seqlen
    if tokens.numel() < needed:
        raise ValueError(
            f"calibration data {source!r} has {tokens.numel()} tokens, need at least {needed} "
            f"for {nsamples} windows of {seqlen}; lower nsamples/seqlen or give more text"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen + 1, (nsamples,), generator=generator)
    return torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])


def tokenize(text: str, tokenizer: Any) -> torch.Tensor:
    """Tokenize a whole corpus into one 1-D LongTensor, without special tokens."""
    # verbose=False: the corpus is far longer than model_max_length, on purpose.
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return torch.tensor(ids["input_ids"], dtype=torch.long)


@torch.inference_mode()
def sample_from_model(
    model: torch.nn.Module,
    tokenizer: Any,
    nsamples: int,
    seqlen: int,
    seed: int,
    batch_size: int = 8,
) -> torch.Tensor:
    """Sample sequences from the model at temperature 1, each starting with BOS.

    Sampling draws from a seeded CPU generator, so the result does not depend on global RNG state.

    Returns:
        LongTensor ``[nsamples, seqlen]`` on the CPU; column 0 is BOS.
    """
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise ValueError("calibration data 'self' needs a tokenizer with a BOS or EOS token")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for start in tqdm(range(0, nsamples, batch_size), desc="sampling calibration data"):
        rows = min(batch_size, nsamples - start)
        step = torch.full((rows, 1), bos, dtype=torch.long)
        sequence, past = [step], None
        for _ in range(seqlen - 1):
            out = model(input_ids=step.to(device), past_key_values=past, use_cache=True)
            past = out.past_key_values
            probs = torch.softmax(out.logits[:, -1].float(), dim=-1).cpu()
            step = torch.multinomial(probs, 1, generator=generator)
            sequence.append(step)
        batches.append(torch.cat(sequence, dim=1))
    return torch.cat(batches)


def load_eval_text(spec: str = DEFAULT_EVAL) -> str:
    """Return an evaluation text.

    Args:
        spec: ``austen-pride`` (*Pride and Prejudice*, held out of calibration), ``wikitext2``
            (its test split, through ``datasets``) or a ``.txt``/``.jsonl`` file path.

    Raises:
        ValueError: unknown spec, missing or empty file.
    """
    if spec == "austen-pride":
        return austen_books()[HELD_OUT]
    if spec == "wikitext2":
        return "\n\n".join(_hub_texts("wikitext2", "test"))
    if _looks_like_path(spec):
        return read_text_file(Path(spec))
    raise ValueError(
        f"unknown evaluation data {spec!r}; use 'austen-pride', 'wikitext2' or a .txt/.jsonl path"
    )


def eval_windows(
    text: str, tokenizer: Any, seqlen: int, max_windows: int | None = None
) -> torch.Tensor:
    """Cut a text into consecutive non-overlapping windows of ``seqlen`` tokens (tail dropped).

    Returns:
        LongTensor ``[n, seqlen]``, n = min(#tokens // seqlen, max_windows).

    Raises:
        ValueError: the text is shorter than one window.
    """
    tokens = tokenize(text, tokenizer)
    count = tokens.numel() // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    if count < 1:
        raise ValueError(
            f"evaluation text has {tokens.numel()} tokens, less than one window of {seqlen}"
        )
    return tokens[: count * seqlen].view(count, seqlen)


def read_text_file(path: Path) -> str:
    """Read a plain-text file, or a ``.jsonl`` file's ``text`` fields joined by blank lines.

    Raises:
        ValueError: missing file, empty file, bad JSON line or a line without a ``text`` string.
    """
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist")
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{number}: expected an object with a 'text' string")
            texts.append(record["text"])
        raw = "\n\n".join(texts)
    if not raw.strip():
        raise ValueError(f"data file {path} is empty")
    return raw


def _looks_like_path(spec: str) -> bool:
    return Path(spec).suffix in (".txt", ".jsonl") or Path(spec).is_file()


def _load_hub_dataset(name: str, split: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"data {name!r} needs the `datasets` package (pip install datasets) and hub access; "
            "or use 'austen' or a local .txt/.jsonl file"
        ) from None
    try:
        if name == "wikitext2":
            return datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
        # One C4 shard, as SparseGPT does: enough text, a fraction of the download.
        shard = "en/c4-train.00000-of-01024.json.gz"
        return datasets.load_dataset("allenai/c4", data_files={"train": shard}, split=split)
    except Exception as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ValueError(
            f"could not load {name!r} from the Hugging Face hub ({reason}); "
            "use 'austen' or a local .txt/.jsonl file"
        ) from None


def _hub_texts(name: str, split: str) -> list[str]:
    return list(_load_hub_dataset(name, split)["text"])


def _c4_tokens(tokenizer: Any, needed: int, seed: int) -> torch.Tensor:
    """Tokenize seeded-random C4 documents (EOS-separated) until ``needed`` tokens are in hand."""
    data = _load_hub_dataset("c4", "train")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=generator).tolist()
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    # Twice what the windows need, so random offsets have room to spread.
    pieces, total = [], 0
    for index in order:
        ids = tokenize(data[index]["text"], tokenizer).tolist() + sep
        pieces.append(torch.tensor(ids, dtype=torch.long))
        total += len(ids)
        if total >= 2 * needed:
            break
    return torch.cat(pieces)
