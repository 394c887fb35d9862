"""``duogpt inspect`` and ``duogpt export --dense`` on a small checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from factory import make_checkpoint

from vllm_duogpt import format as fmt
from vllm_duogpt.cli import main
from vllm_duogpt.torch_model import load_exported_model, load_torch_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("inspect") / "ckpt", weight_sparsity=0.5)


def test_inspect_json_reports_every_linear(ckpt, capsys):
    assert main(["inspect", str(ckpt), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    state, thresholds, _ = fmt.read_checkpoint(ckpt)
    by_name = {row["name"]: row for row in report["linears"]}
    assert set(by_name) == set(thresholds)
    for name, row in by_name.items():
        weight = state[f"{name}.weight"]
        assert (row["rows"], row["cols"]) == tuple(weight.shape)
        assert row["weight_sparsity"] == pytest.approx(float((weight == 0).float().mean()))
        assert row["input_threshold"] == pytest.approx(thresholds[name])
        assert row["dense_bytes"] == weight.numel() * weight.element_size()
        assert row["ratio"] < 0.6
    totals = report["totals"]
    assert totals["linear_compressed_bytes"] == sum(r["compressed_bytes"] for r in by_name.values())
    assert report["quantization_config"]["quant_method"] == "duogpt"


def test_inspect_table(ckpt, capsys):
    assert main(["inspect", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in out
    assert "dense" in out.splitlines()[-1]


def test_inspect_bad_directory_is_one_line_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config.json not found" in err


def test_export_dense_runs_in_transformers_like_the_checkpoint(ckpt, tmp_path):
    out = tmp_path / "dense"
    assert main(["export", str(ckpt), "--dense", str(out)]) == 0
    exported = load_exported_model(out)
    reference = load_torch_model(ckpt)
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    with torch.no_grad():
        assert torch.allclose(exported(ids).logits, reference(ids).logits, atol=1e-5)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert (out / "tokenizer.json").is_file()


def test_export_refuses_to_overwrite(ckpt, tmp_path, capsys):
    (tmp_path / "dense").mkdir()
    assert main(["export", str(ckpt), "--dense", str(tmp_path / "dense")]) == 2
    assert "already exists" in capsys.readouterr().err
