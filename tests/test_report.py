"""``duogpt report``: the model card and plots of a small checkpoint."""

from __future__ import annotations

import argparse
import json
import re

import pytest
from factory import make_checkpoint

from vllm_duogpt import format as fmt
from vllm_duogpt.report import (
    BYTES_PLOT,
    CALIBRATION_REPORT,
    LAYER_PLOT,
    PLOT_DIR,
    SWEEP_PLOT,
    add_report_parser,
    generate_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PPL = 37.2519


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("report") / "ckpt", weight_sparsity=0.5)


@pytest.fixture
def inputs(tmp_path):
    eval_json = tmp_path / "ppl.json"
    eval_json.write_text(json.dumps({
        "ppl": PPL, "nll": 1234.5, "tokens": 340, "windows": 4, "seqlen": 86,
        "backend": "torch", "model": "out/ckpt", "data": "austen-pride",
        "load_seconds": 1.5, "seconds": 2.5,
    }))  # fmt: skip
    batch = {"batch": 4, "ttft_s": 0.125, "total_s": 1.0, "decode_s": 0.875,
             "decode_tok_s": 288.0, "output_tok_s": 256.0}  # fmt: skip
    bench_json = tmp_path / "bench.json"
    bench_json.write_text(json.dumps({
        "method": "fp32 on CPU, 64 new tokens",
        "results": {
            "duogpt": {"model_weight_bytes": 3 * 2**20, "checkpoint_file_bytes": 2**21,
                       "worker_rss_bytes": 2**30, "batches": [batch]},
        },
    }))  # fmt: skip
    sweep_json = tmp_path / "sweep.json"
    sweep_json.write_text(json.dumps({
        "settings": {"eval_data": "austen-pride"},
        "rows": {
            "dense": {"key": "dense", "label": "dense", "method": None, "ppl": 25.4},
            "duogpt-w50x50": {"key": "duogpt-w50x50", "label": "alpha 0.25",
                              "method": "duogpt", "ppl": 54.1},
            "wanda-w50x50": {"key": "wanda-w50x50", "label": "wanda W50/X50",
                             "method": "wanda", "ppl": 97.6},
            "magnitude-w50x50": {"key": "magnitude-w50x50", "label": "magnitude W50/X50",
                                 "method": "magnitude", "ppl": 667.3},
        },
    }))  # fmt: skip
    return eval_json, bench_json, sweep_json


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_report_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    # An 800x600 plot with axes, text and data is tens of KB; an empty canvas is a few KB.
    assert len(data) > 15_000


def test_card_has_every_section_and_the_checkpoint_numbers(ckpt, inputs):
    eval_json, bench_json, sweep_json = inputs
    argv = ["report", str(ckpt), "--eval-json", str(eval_json), "--bench-json", str(bench_json),
            "--sweep-json", str(sweep_json)]  # fmt: skip
    assert _run(argv) == 0
    card = (ckpt / "README.md").read_text()
    for heading in ("## Calibration settings", "## Totals", "## Per-layer table", "## Accuracy",
                    "## Speed", "## Perplexity across settings"):  # fmt: skip
        assert heading in card

    _, thresholds, _ = fmt.read_checkpoint(ckpt)
    rows = [line for line in card.splitlines() if line.startswith("| model.layers.")]
    assert len(rows) == len(thresholds) == 14  # 2 layers x 7 projections
    assert f"sparse linears: {len(thresholds)}" in card
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        name, sparsity, tau, nbytes, dense, ratio, err = cells[0], *cells[2:]
        assert float(tau) == pytest.approx(thresholds[name], rel=1e-3)
        assert float(sparsity) == pytest.approx(0.5, abs=0.01)
        assert float(ratio) == pytest.approx(int(nbytes) / int(dense), abs=1e-3)
        assert err == "not recorded"

    assert "| calibration_method | magnitude |" in card and "| weight_sparsity | 0.5 |" in card
    assert f"{PPL:.4f}" in card and "austen-pride" in card
    assert "| duogpt | 4 | 0.125 | 288.0 | 256.0 | 3.0 | 2.0 |" in card
    links = re.findall(r"!\[[^\]]+\]\(([^)]+)\)", card)
    assert links == [f"{PLOT_DIR}/{LAYER_PLOT}", f"{PLOT_DIR}/{BYTES_PLOT}",
                     f"{PLOT_DIR}/{SWEEP_PLOT}"]  # fmt: skip
    for link in links:
        _assert_png(ckpt / link)
    leftovers = [p.name for p in [*ckpt.iterdir(), *(ckpt / PLOT_DIR).iterdir()]
                 if p.name.endswith(".tmp")]  # fmt: skip
    assert leftovers == []


def test_minimal_card_and_recorded_calibration_error(ckpt, tmp_path):
    _, thresholds, _ = fmt.read_checkpoint(ckpt)
    name = sorted(thresholds)[0]
    (ckpt / CALIBRATION_REPORT).write_text(json.dumps({"linears": [
        {"name": name, "rel_error": 0.0123},
    ]}))  # fmt: skip
    try:
        generate_report(ckpt)
    finally:
        (ckpt / CALIBRATION_REPORT).unlink()
    card = (ckpt / "README.md").read_text()
    assert "## Accuracy" not in card and "## Speed" not in card
    row = next(line for line in card.splitlines() if line.startswith(f"| {name} |"))
    assert row.rstrip().endswith("| 0.0123 |")
    assert card.count("not recorded") == len(thresholds) - 1


def test_bad_directory_is_a_one_line_format_error(tmp_path):
    with pytest.raises(fmt.FormatError) as info:
        generate_report(tmp_path)
    assert len(str(info.value).splitlines()) == 1 and "config.json not found" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_bad_eval_json_names_the_file(ckpt, tmp_path):
    bad = tmp_path / "ppl.json"
    bad.write_text(json.dumps({"nll": 1.0}))
    with pytest.raises(ValueError, match=r"ppl\.json: missing field"):
        generate_report(ckpt, [bad])


def test_cli_report_on_a_bad_directory_is_a_one_line_error(tmp_path, capsys):
    from vllm_duogpt.cli import main

    assert main(["report", str(tmp_path)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
