"""Offline zero-shot tasks for lm-evaluation-harness, built from *Pride and Prejudice*.

The novel is held out of calibration (``calibrate.austen.HELD_OUT``), so the tasks measure what
pruning cost without the hub. Two tasks, written as local JSONL datasets plus lm-eval task YAMLs
(``dataset_path: json``) into one directory for ``lm_eval --include_path``:

- ``austen_endings`` (HellaSwag-style multiple choice): the context is the previous sentence of the
  paragraph plus the first part of a sentence; the choices are the true ending and three endings
  of other sentences with about as many words (so length gives nothing away), in seeded order.
  Metrics ``acc`` and ``acc_norm``.
- ``austen_lambada`` (LAMBADA-style last word): a passage of consecutive sentences whose last word
  is a content word that also occurs earlier in the passage (LAMBADA keeps passages whose last
  word the wider context predicts; an earlier occurrence is a cheap stand-in for its human
  filter); the target is that word without its punctuation. Metrics ``acc`` (the word is the greedy
  continuation) and ``perplexity``.

Both tasks carry the tag ``austen``, so ``--tasks austen`` runs the two.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TASK_TAG = "austen"
ENDINGS_TASK = "austen_endings"
LAMBADA_TASK = "austen_lambada"
NUM_CHOICES = 4
MIN_SENTENCE_WORDS = 12
MAX_SENTENCE_WORDS = 40
MIN_ENDING_WORDS = 5
MIN_PASSAGE_WORDS = 30
MAX_PASSAGE_WORDS = 150
# A period after these does not end a sentence.
ABBREVIATIONS = frozenset({"Mr.", "Mrs.", "Messrs.", "Dr.", "St.", "Esq.", "Col.", "Capt."})
# Function words are too easy to guess to make a last-word target.
STOPWORDS = frozenset(
    "that this them they their there these those with have been were what when where which "
    "would could should from your very will said much more than then into upon only some such "
    "well must shall being here also even ever just most other over".split()
)
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")
_CHAPTER = re.compile(r"^(chapter|volume)\b", re.IGNORECASE)


def paragraphs(text: str) -> list[list[str]]:
    """Split a Gutenberg-style text into paragraphs of words.

    Paragraphs are separated by blank lines; wrapped lines are joined; the underscores that
    mark italics are dropped; chapter headings and paragraphs without a lowercase letter
    (titles, signatures in capitals) are skipped.
    """
    result = []
    for block in re.split(r"\n\s*\n", text.replace("_", "")):
        words = block.split()
        if not words or _CHAPTER.match(words[0]) and len(words) <= 3:
            continue
        if not any(ch.islower() for ch in block):
            continue
        result.append(words)
    return result


def sentences(words: list[str]) -> list[list[str]]:
    """Split one paragraph's words into sentences (``.``, ``!`` or ``?``, maybe before quotes)."""
    result, current = [], []
    for word in words:
        current.append(word)
        if _SENTENCE_END.search(word) and word not in ABBREVIATIONS:
            result.append(current)
            current = []
    if current:
        result.append(current)
    return result


def endings_examples(text: str, max_examples: int | None = 1000, seed: int = 0) -> list[dict]:
    """HellaSwag-style examples: a sentence's first part and four candidate endings.

    Args:
        text: the source text.
        max_examples: keep a seeded random subset of this size (None: all).
        seed: seeds the distractors, the choice order and the subset.

    Returns:
        Dicts with ``context`` (str), ``choices`` (4 str), ``label`` (index of the true ending),
        in text order.
    """
    rng = random.Random(seed)
    items = []  # (context, ending words)
    for para in paragraphs(text):
        previous: list[str] = []
        for sentence in sentences(para):
            if MIN_SENTENCE_WORDS <= len(sentence) <= MAX_SENTENCE_WORDS:
                cut = len(sentence) - max(MIN_ENDING_WORDS, round(0.4 * len(sentence)))
                context = " ".join(previous + sentence[:cut])
                items.append((context, sentence[cut:]))
            previous = sentence
    by_length: dict[int, list[str]] = defaultdict(list)
    for _, ending in items:
        by_length[len(ending)].append(" ".join(ending))

    examples = []
    for context, ending_words in items:
        true_ending = " ".join(ending_words)
        n = len(ending_words)
        pool = [e for k in (n - 1, n, n + 1) for e in by_length.get(k, []) if e != true_ending]
        pool = sorted(set(pool))
        if len(pool) < NUM_CHOICES - 1:
            continue
        choices = [true_ending, *rng.sample(pool, NUM_CHOICES - 1)]
        rng.shuffle(choices)
        examples.append(
            {"context": context, "choices": choices, "label": choices.index(true_ending)}
        )
    return _subset(examples, max_examples, rng)


def lambada_examples(text: str, max_examples: int | None = 1000, seed: int = 0) -> list[dict]:
    """LAMBADA-style examples: a passage and the last word to predict.

    A passage is a run of consecutive sentences (across paragraphs) of ``MIN_PASSAGE_WORDS`` to
    ``MAX_PASSAGE_WORDS`` words that ends with a content word of four or more letters seen
    earlier in the passage; passages do not overlap.

    Returns:
        Dicts with ``context`` (the passage before the word, no trailing space), ``target`` (the
        word without punctuation) and ``text`` (``context + " " + target``), in text order.
    """
    examples = []
    passage: list[list[str]] = []
    for sentence in (s for para in paragraphs(text) for s in sentences(para)):
        passage.append(sentence)
        while sum(map(len, passage)) > MAX_PASSAGE_WORDS:
            passage.pop(0)
        words = [w for s in passage for w in s]
        if len(words) < MIN_PASSAGE_WORDS:
            continue
        # Trailing punctuation only: a word after an opening quote is not a clean target.
        target = words[-1].rstrip("\"'.,;:!?)-")
        if len(target) < 4 or not target.isalpha() or target.lower() in STOPWORDS:
            continue
        if target.lower() not in {_bare(w).lower() for w in words[:-1]}:
            continue
        context = " ".join(words[:-1])
        examples.append({"context": context, "target": target, "text": f"{context} {target}"})
        passage = []
    return _subset(examples, max_examples, random.Random(seed))


def _bare(word: str) -> str:
    return word.strip("\"'.,;:!?)(-")


def _subset(examples: list[dict], max_examples: int | None, rng: random.Random) -> list[dict]:
    if max_examples is None or len(examples) <= max_examples:
        return examples
    keep = sorted(rng.sample(range(len(examples)), max_examples))
    return [examples[i] for i in keep]


def _task_yaml(task: str, data_file: Path, body: str) -> str:
    # data_files must be absolute: lm-eval resolves it from the working directory, not the YAML.
    return (
        f"tag:\n  - {TASK_TAG}\n"
        f"task: {task}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {json.dumps(str(data_file.resolve()))}\n"
        "test_split: test\n"
        f"{body}"
        "metadata:\n  version: 1.0\n"
    )


_ENDINGS_BODY = """\
output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: choices
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""

_LAMBADA_BODY = """\
output_type: loglikelihood
doc_to_text: "{{context}}"
doc_to_target: "{{target}}"
target_delimiter: " "
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_tasks(
    out_dir: str | os.PathLike[str],
    text: str | None = None,
    max_examples: int | None = 1000,
    seed: int = 0,
) -> dict[str, int]:
    """Write both tasks (JSONL data and task YAMLs) into ``out_dir``.

    Args:
        out_dir: the directory for ``lm_eval --include_path`` (created; files overwritten).
        text: the source text; default *Pride and Prejudice* (fetched once if missing).
        max_examples: examples per task (seeded subset; None: all).
        seed: seeds the examples.

    Returns:
        Task name -> number of examples written.
    """
    if text is None:
        from vllm_duogpt.calibrate.austen import HELD_OUT, austen_books

        text = austen_books()[HELD_OUT]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for task, examples, body in (
        (ENDINGS_TASK, endings_examples(text, max_examples, seed), _ENDINGS_BODY),
        (LAMBADA_TASK, lambada_examples(text, max_examples, seed), _LAMBADA_BODY),
    ):
        data_file = out / f"{task}.jsonl"
        _write_jsonl(data_file, examples)
        (out / f"{task}.yaml").write_text(_task_yaml(task, data_file, body))
        counts[task] = len(examples)
        logger.info("%s: %d examples in %s", task, len(examples), data_file)
    return counts


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The records of a JSONL file."""
    with Path(path).open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)
