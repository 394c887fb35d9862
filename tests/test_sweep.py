"""``duogpt sweep``: grid planning, reuse, the files it writes and what is in them."""

from __future__ import annotations

import json
import logging
import random

import pytest
from factory import CORPUS, build_model, build_tokenizer

from vllm_duogpt import format as fmt
from vllm_duogpt.eval_cli import main as eval_main
from vllm_duogpt.evaluate import perplexity
from vllm_duogpt.report import PLOT_DIR, SWEEP_PLOT, generate_report
from vllm_duogpt.sweep import (
    FRONTIER_PLOT,
    SWEEP_JSON,
    SWEEP_TABLE,
    SweepPoint,
    SweepSettings,
    pareto_front,
    parse_fractions,
    plan_points,
    run_sweep,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVAL_SEQLEN, EVAL_WINDOWS = 32, 4


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sweep") / "dense"
    build_tokenizer(path)
    build_model("llama", 320).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    words = " ".join(CORPUS).split()
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("sweep-text") / "text.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(3000)))
    return path


def settings_for(dense_dir, text_file, act_sparsities):
    return SweepSettings(
        model=str(dense_dir), methods=["duogpt", "wanda"], weight_sparsities=[0.5],
        act_sparsities=act_sparsities, calib_data=str(text_file), nsamples=4, seqlen=32,
        eval_data=str(text_file), eval_seqlen=EVAL_SEQLEN, eval_windows=EVAL_WINDOWS,
    )  # fmt: skip


def test_plan_shares_method_independent_points():
    keys = [p.key for p in plan_points(["duogpt", "wanda"], [0.0, 0.5], [0.0, 0.4])]
    assert keys == [
        "dense", "activation-only-w0-x0.4",
        "duogpt-w0.5-x0", "duogpt-w0.5-x0.4", "wanda-w0.5-x0", "wanda-w0.5-x0.4",
    ]  # fmt: skip
    assert SweepPoint("duogpt", 0.5, 0.4).label == "duogpt W50/X40"
    with pytest.raises(ValueError, match="--methods"):
        plan_points(["magnitude"], [0.5], [0.0])


def test_fractions_are_parsed_and_checked():
    assert parse_fractions("0.5,0.3,0.5", "--weight-sparsity") == [0.3, 0.5]
    for bad in ("", "0.5,1.0", "half"):
        with pytest.raises(ValueError, match="--act-sparsity"):
            parse_fractions(bad, "--act-sparsity")


def test_pareto_front_keeps_only_unbeaten_points():
    points = [(1.0, 10.0), (1.5, 12.0), (1.4, 15.0), (2.0, 11.0), (3.0, 30.0)]
    assert pareto_front(points) == [(1.0, 10.0), (2.0, 11.0), (3.0, 30.0)]


def test_sweep_writes_measured_rows_and_reuses_checkpoints(dense_dir, text_file, tmp_path, caplog):
    out = tmp_path / "sweep"
    data = run_sweep(settings_for(dense_dir, text_file, [0.0, 0.5]), out)
    rows = data["rows"]
    assert sorted(rows) == sorted(
        ["dense", "activation-only-w0-x0.5", "duogpt-w0.5-x0", "duogpt-w0.5-x0.5",
         "wanda-w0.5-x0", "wanda-w0.5-x0.5"]
    )  # fmt: skip
    for row in rows.values():
        assert row["ppl"] > 1 and row["linear_ms_per_token"] > 0 and row["speedup"] > 0
    assert rows["dense"]["speedup"] == 1.0 and rows["dense"]["kernel"] == "torch-fp32-dense"
    assert all(r["kernel"] != "torch-fp32-dense" for k, r in rows.items() if k != "dense")

    # Perplexities are those of the written checkpoints, computed independently here.
    for key in ("dense", "duogpt-w0.5-x0.5"):
        direct = perplexity(rows[key]["checkpoint"], str(text_file), EVAL_SEQLEN, EVAL_WINDOWS,
                            backend="torch")  # fmt: skip
        assert rows[key]["ppl"] == pytest.approx(direct.ppl, rel=1e-6)
    state, thresholds, config = fmt.read_checkpoint(out / "checkpoints" / "activation-only-w0-x0.5")
    assert config["quantization_config"]["weight_sparsity"] == 0.0
    assert min(thresholds.values()) > 0
    state, thresholds, _ = fmt.read_checkpoint(out / "checkpoints" / "wanda-w0.5-x0")
    assert max(thresholds.values()) == 0.0
    assert all(float((t == 0).float().mean()) >= 0.49 for k, t in state.items() if "proj" in k)

    on_disk = json.loads((out / SWEEP_JSON).read_text())
    assert on_disk["rows"].keys() == rows.keys()
    assert "| wanda | 0.5 | 0.5 |" in (out / SWEEP_TABLE).read_text()
    assert (out / FRONTIER_PLOT).read_bytes().startswith(PNG_MAGIC)

    # The model card of one of the points plots the sweep.
    ckpt = out / "checkpoints" / "duogpt-w0.5-x0.5"
    assert generate_report(ckpt, sweep_json=out / SWEEP_JSON).exists()
    assert (ckpt / PLOT_DIR / SWEEP_PLOT).read_bytes().startswith(PNG_MAGIC)

    # A larger grid in the same directory calibrates only the new points.
    mtime = (ckpt / "config.json").stat().st_mtime_ns
    caplog.clear()
    caplog.set_level(logging.INFO, logger="vllm_duogpt.sweep")
    bigger = run_sweep(settings_for(dense_dir, text_file, [0.0, 0.3, 0.5]), out)
    assert (ckpt / "config.json").stat().st_mtime_ns == mtime
    assert "duogpt W50/X50: reusing" in caplog.text
    assert "duogpt-w0.5-x0.3" in bigger["rows"]
    assert bigger["rows"]["duogpt-w0.5-x0.5"]["ppl"] == rows["duogpt-w0.5-x0.5"]["ppl"]


def test_cli_rejects_unknown_method(dense_dir, tmp_path, capsys):
    code = eval_main(["sweep", str(dense_dir), "--methods", "magnitude", "--out", str(tmp_path)])
    assert code == 2
    assert "--methods" in capsys.readouterr().err
