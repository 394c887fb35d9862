"""Offline assets: the R data reader, the Austen corpus, calibration windows, the bundled model.

The R reader is checked on byte strings built here by hand from the R Internals manual
("Serialization Formats") and on one index R itself wrote. Tests that need the cache
(`duogpt fetch-data austen`, `duogpt prepare-model smollm2-135m`, both run by `make setup`)
skip when it is missing; nothing here touches the network.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from vllm_duogpt.calibrate import assets_cli, rdata
from vllm_duogpt.calibrate.austen import BOOKS, AustenNotCachedError, austen_books
from vllm_duogpt.calibrate.cache import build_once, cache_root
from vllm_duogpt.calibrate.calib_data import (
    calibration_text,
    eval_windows,
    load_calibration_windows,
    load_eval_text,
    tokenize,
)
from vllm_duogpt.calibrate.models import greedy_chat, resolve_model

P_AND_P_OPENING = "It is a truth universally acknowledged"

# ---------------------------------------------------------------------------------------------
# Hand-built R serialization (XDR): flags = type | object<<8 | attributes<<9 | tag<<10 | gp<<12.


def ints(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def flags(sxp: int, obj: bool = False, attr: bool = False, tag: bool = False, gp: int = 0) -> int:
    return sxp | obj << 8 | attr << 9 | tag << 10 | gp << 12


def charsxp(text: str | None, encoding: str = "utf-8", gp: int = 1 << 3) -> bytes:
    if text is None:
        return ints(flags(9), -1)
    raw = text.encode(encoding)
    return ints(flags(9, gp=gp), len(raw)) + raw


def strsxp(*items: str | None) -> bytes:
    return ints(flags(16), len(items)) + b"".join(charsxp(s, gp=1 << 6) for s in items)


def symbol(name: str) -> bytes:
    return ints(flags(1)) + charsxp(name, gp=1 << 6)


def ref(index: int) -> bytes:
    return ints(index << 8 | 255)


def attribute(tag: bytes, value: bytes) -> bytes:
    """One tagged pairlist cell; the caller chains them and ends with NILVALUE."""
    return ints(flags(2, tag=True)) + tag + value


NIL = ints(254)
HEADER_V2 = b"X\n" + ints(2, 0x040201, 0x020300)
HEADER_V3 = b"X\n" + ints(3, 0x040201, 0x030500, 5) + b"UTF-8"

# The gunzipped Rdata.rdx of Debian's r-cran-janeaustenr 1.0.0-1, written by R 4.2.1: the six
# books' (offset, length) pairs in Rdata.rdb; it uses a REFSXP for the repeated `names` symbol.
R_WRITTEN_INDEX = bytes.fromhex(
    "580a000000030004020100030500000000055554462d38000002130000000300000213000000060000000d00"
    "0000020000000000055f2b0000000d0000000200055f2b00055c8d0000000d00000002000abbb80002ac5c00"
    "00000d00000002000d68140002d32a0000000d0000000200103b3e000422bd0000000d0000000200145dfb00"
    "04113c000004020000000100040009000000056e616d657300000010000000060004000900000004656d6d61"
    "000400090000000d6d616e736669656c647061726b000400090000000f6e6f727468616e6765726162626579"
    "000400090000000a70657273756173696f6e000400090000000e70726964657072656a756469636500040009"
    "0000001073656e736573656e736962696c697479000000fe000002130000000000000402000001ff00000010"
    "00000000000000fe0000000a000000010000000100000402000001ff00000010000000030004000900000009"
    "7661726961626c6573000400090000000a7265666572656e636573000400090000000a636f6d707265737365"
    "64000000fe"
)


def test_character_vector_encodings_and_na() -> None:
    body = ints(flags(16), 5)
    body += charsxp("plain", gp=1 << 6)  # ASCII
    body += charsxp("Élinor", "utf-8", gp=1 << 3)  # UTF-8
    body += charsxp("Élinor", "latin-1", gp=1 << 2)  # latin-1
    body += charsxp("native", gp=0)  # native encoding: UTF-8 per the v3 header
    body += charsxp(None)  # NA_STRING
    obj = rdata.unserialize(HEADER_V3 + body)
    assert obj.sexptype == rdata.STRSXP
    assert obj.value == ["plain", "Élinor", "Élinor", "native", None]


def test_atomic_vectors_v2() -> None:
    logical = rdata.unserialize(HEADER_V2 + ints(flags(10), 3, 1, 0, rdata.NA_INTEGER))
    assert rdata.to_python(logical) == [True, False, None]
    real = rdata.unserialize(HEADER_V2 + ints(flags(14), 2) + struct.pack(">2d", 1.5, -2.0))
    assert real.value == [1.5, -2.0]
    raw = rdata.unserialize(HEADER_V2 + ints(flags(24), 3) + b"\x00\xffA")
    assert raw.value == b"\x00\xffA"
    assert rdata.unserialize(HEADER_V2 + NIL) is None


def test_data_frame_with_factor_and_references() -> None:
    # data.frame(book = factor(c("emma", "persuasion", "emma")), line = 1:3), the way R writes
    # it: columns first, then the frame's attributes; `class` is written once and then referenced
    # (reference table: 1 = levels, 2 = class, 3 = names, 4 = row.names).
    factor = ints(flags(13, obj=True, attr=True), 3, 1, 2, 1)
    factor += attribute(symbol("levels"), strsxp("emma", "persuasion"))
    factor += attribute(symbol("class"), strsxp("factor")) + NIL
    line = ints(flags(13), 3, 1, 2, 3)
    frame = ints(flags(19, obj=True, attr=True), 2) + factor + line
    frame += attribute(symbol("names"), strsxp("book", "line"))
    frame += attribute(ref(2), strsxp("data.frame"))
    frame += attribute(symbol("row.names"), ints(flags(13), 2, rdata.NA_INTEGER, -3)) + NIL

    obj = rdata.unserialize(HEADER_V3 + frame)
    assert obj.classes() == ["data.frame"]
    assert obj.names() == ["book", "line"]
    assert obj.attributes["row.names"].value == [rdata.NA_INTEGER, -3]
    assert rdata.to_python(obj) == {"book": ["emma", "persuasion", "emma"], "line": [1, 2, 3]}


def test_compact_intseq_altrep() -> None:
    info = ints(flags(2)) + symbol("compact_intseq") + ints(flags(2)) + symbol("base")
    info += ints(flags(2)) + ints(flags(13), 1, 13) + NIL
    state = ints(flags(14), 3) + struct.pack(">3d", 4.0, 10.0, 1.0)
    obj = rdata.unserialize(HEADER_V3 + ints(238) + info + state + NIL)
    assert obj.sexptype == rdata.INTSXP and obj.value == [10, 11, 12, 13]


@pytest.mark.parametrize(
    "data, message",
    [
        (b"A\n" + b"2\n", "XDR"),
        (b"X\n" + ints(4, 0, 0), "version 4"),
        (HEADER_V2 + ints(flags(16), 2) + charsxp("only one"), "truncated"),
        (HEADER_V2 + ints(flags(21), 0), "SEXPTYPE 21"),
    ],
)
def test_reader_rejects_what_it_cannot_read(data: bytes, message: str) -> None:
    with pytest.raises(rdata.RDataError, match=message):
        rdata.unserialize(data)


def test_index_written_by_r() -> None:
    index = rdata.unserialize(R_WRITTEN_INDEX)
    parts = rdata.to_python(index)
    assert set(parts) == {"variables", "references", "compressed"}
    assert parts["compressed"] == [True]
    assert sorted(parts["variables"]) == sorted(BOOKS)
    assert parts["variables"]["emma"] == [0, 352043]
    assert parts["variables"]["sensesensibility"] == [1334779, 266556]


@pytest.mark.parametrize("compress", [1, 2, 3])
def test_lazyload_db_round_trip(tmp_path: Path, compress: int) -> None:
    objects = {"emma": strsxp("EMMA", "", "By Jane Austen"), "tiny": ints(flags(13), 1, 7)}
    rdb, offsets = b"", {}
    for name, body in objects.items():
        payload = HEADER_V3 + body
        if compress == 1:  # R_compress1: length + zlib
            entry = struct.pack(">I", len(payload)) + zlib.compress(payload)
        elif compress == 2:  # R_compress2: length + type byte + bzip2
            entry = struct.pack(">I", len(payload)) + b"2" + bz2.compress(payload)
        else:  # R_compress3: length + type byte + xz
            entry = struct.pack(">I", len(payload)) + b"Z" + lzma.compress(payload)
        offsets[name] = (len(rdb), len(entry))
        rdb += entry
    variables = ints(flags(19, attr=True), len(objects))
    variables += b"".join(ints(flags(13), 2, *offsets[n]) for n in objects)
    variables += attribute(symbol("names"), strsxp(*objects)) + NIL
    index = ints(flags(19, attr=True), 3) + variables + ints(flags(19), 0)
    if compress == 1:  # makeLazyLoadDB stores compress = TRUE as a logical, 2 and 3 as doubles
        index += ints(flags(10), 1, 1)
    else:
        index += ints(flags(14), 1) + struct.pack(">d", compress)
    index += attribute(ref(1), strsxp("variables", "references", "compressed")) + NIL
    (tmp_path / "Rdata.rdb").write_bytes(rdb)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(HEADER_V3 + index))

    db = rdata.read_lazyload_db(tmp_path / "Rdata")
    assert db["emma"].value == ["EMMA", "", "By Jane Austen"]
    assert db["tiny"].value == [7]


# ---------------------------------------------------------------------------------------------
# Austen corpus (cache filled by `duogpt fetch-data austen`).


@pytest.fixture(scope="module")
def books() -> dict[str, str]:
    try:
        return austen_books(fetch=False)
    except AustenNotCachedError as exc:
        pytest.skip(str(exc))


def test_austen_books_present_and_sane(books: dict[str, str]) -> None:
    assert list(books) == list(BOOKS)
    assert all(len(text) > 300_000 for text in books.values())
    assert P_AND_P_OPENING in books["prideprejudice"][:500]
    assert books["emma"].startswith("EMMA")
    assert "Elizabeth" in books["prideprejudice"] and "Anne Elliot" in books["persuasion"]


def test_default_calibration_holds_out_pride_and_prejudice(books: dict[str, str]) -> None:
    text = calibration_text("austen")
    assert P_AND_P_OPENING not in text and "Elizabeth Bennet" not in text
    assert all(books[key] in text for key in BOOKS if key != "prideprejudice")
    assert P_AND_P_OPENING in load_eval_text()


# ---------------------------------------------------------------------------------------------
# Calibration windows, with a real word-level tokenizer: word `w<i>` is token i + 2, so a window
# cut from "w0 w1 ... w<n>" must be a run of consecutive ids.


@pytest.fixture(scope="module")
def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, "[EOS]": 1, **{f"w{i}": i + 2 for i in range(5000)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]")


def write_words(path: Path, count: int) -> Path:
    path.write_text(" ".join(f"w{i}" for i in range(count)))
    return path


def test_windows_shape_contiguity_and_seed(tmp_path: Path, word_tokenizer) -> None:
    corpus = str(write_words(tmp_path / "corpus.txt", 4000))
    windows = load_calibration_windows(corpus, word_tokenizer, nsamples=16, seqlen=32, seed=0)
    assert windows.shape == (16, 32) and windows.dtype == torch.long
    assert torch.equal(windows - windows[:, :1], torch.arange(32).expand(16, 32))
    assert int(windows.min()) >= 2 and int(windows.max()) < 4002
    again = load_calibration_windows(corpus, word_tokenizer, nsamples=16, seqlen=32, seed=0)
    other = load_calibration_windows(corpus, word_tokenizer, nsamples=16, seqlen=32, seed=1)
    assert torch.equal(windows, again) and not torch.equal(windows, other)


def test_jsonl_and_eval_windows(tmp_path: Path, word_tokenizer) -> None:
    path = tmp_path / "docs.jsonl"
    records = [{"text": "w0 w1 w2 w3 w4"}, {"text": "w5 w6 w7 w8 w9 w10", "id": 2}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    assert tokenize(load_eval_text(str(path)), word_tokenizer).tolist() == list(range(2, 13))
    windows = eval_windows(load_eval_text(str(path)), word_tokenizer, seqlen=4)
    assert windows.tolist() == [[2, 3, 4, 5], [6, 7, 8, 9]]
    assert eval_windows("w0 w1 w2 w3 w4", word_tokenizer, 2, max_windows=1).tolist() == [[2, 3]]


def test_calibration_errors(tmp_path: Path, word_tokenizer) -> None:
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "bad.jsonl").write_text('{"body": "w1"}\n')
    small = str(write_words(tmp_path / "small.txt", 100))
    cases = [
        (str(tmp_path / "empty.txt"), "is empty"),
        (str(tmp_path / "bad.jsonl"), "bad.jsonl:1: expected an object with a 'text' string"),
        (str(tmp_path / "missing.txt"), "does not exist"),
        (small, "has 100 tokens, need at least 128 for 4 windows of 32"),
        ("austen:emma,hamlet", "unknown Austen book"),
        ("shakespeare", "unknown calibration data 'shakespeare'; use 'austen'"),
        ("self", "pass model="),
    ]
    for spec, message in cases:
        with pytest.raises(ValueError, match=message):
            load_calibration_windows(spec, word_tokenizer, nsamples=4, seqlen=32, seed=0)
    with pytest.raises(ValueError, match="less than one window"):
        eval_windows("w1 w2", word_tokenizer, seqlen=8)


def test_resolve_model_local_and_errors(tmp_path: Path, capsys) -> None:
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ValueError, match="pass a local model directory"):
        resolve_model("no-such-model")
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path
    assert assets_cli.main(["prepare-model", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path)


def test_build_once_builds_once_under_concurrency(tmp_path: Path) -> None:
    calls: list[int] = []

    def build(out: Path) -> None:
        calls.append(1)
        time.sleep(0.2)  # hold the lock long enough for the other threads to queue on it
        (out / "payload.txt").write_text("done")

    target = tmp_path / "asset"
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: build_once(target, build), range(4)))
    assert results == [target] * 4 and len(calls) == 1
    assert (target / "payload.txt").read_text() == "done"

    def broken(out: Path) -> None:
        (out / "partial.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        build_once(tmp_path / "other", broken)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["asset"]


# ---------------------------------------------------------------------------------------------
# The bundled SmolLM2-135M-Instruct (cache filled by `duogpt prepare-model smollm2-135m`).


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = cache_root() / "models" / "smollm2-135m"
    if not (directory / "config.json").is_file():
        pytest.skip(f"{directory} missing; run `duogpt prepare-model smollm2-135m`")
    assert resolve_model("smollm2-135m") == directory
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return directory, model, AutoTokenizer.from_pretrained(directory)


def test_smollm2_converted_model_is_coherent(smollm2) -> None:
    directory, model, tokenizer = smollm2
    config = json.loads((directory / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert model.dtype == torch.float32
    reply = greedy_chat(
        model,
        tokenizer,
        [{"role": "user", "content": "What is the capital of France?"}],
        max_new_tokens=8,
    )
    assert "Paris" in reply


def test_austen_windows_are_slices_of_the_book(books, smollm2) -> None:
    _, _, tokenizer = smollm2
    windows = load_calibration_windows("austen:persuasion", tokenizer, 4, 64, seed=3)
    stream = tokenize(books["persuasion"], tokenizer)
    slices = stream.unfold(0, 64, 1)
    assert all(bool((slices == w).all(dim=1).any()) for w in windows)


def test_self_sampling_is_seeded(smollm2) -> None:
    _, model, tokenizer = smollm2
    first = load_calibration_windows("self", tokenizer, 2, 6, seed=0, model=model)
    second = load_calibration_windows("self", tokenizer, 2, 6, seed=0, model=model)
    assert first.shape == (2, 6) and torch.equal(first, second)
    assert (first[:, 0] == tokenizer.bos_token_id).all()
