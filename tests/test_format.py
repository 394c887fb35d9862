"""The checkpoint format: exact round trip, size accounting, pinned bytes and bad inputs."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_duogpt import format as fmt

SHAPES = [(1, 1), (1, 7), (3, 8), (5, 9), (13, 37), (64, 257)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def masked_weight(rows: int, cols: int, sparsity: float, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen)
    weight[torch.rand(rows, cols, generator=gen) < sparsity] = 0
    return weight.to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_round_trip_is_exact(shape, dtype, sparsity):
    weight = masked_weight(*shape, sparsity, dtype)
    parts = fmt.compress(weight)
    restored = fmt.decompress(parts)
    assert restored.dtype == dtype
    assert torch.equal(restored, weight)
    assert parts[fmt.VALUES].numel() == int((weight != 0).sum())


def test_hand_computed_parts():
    weight = torch.tensor(
        [[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 4.0], [0.0, 0.0, 3.0] + [0.0] * 6]
    )
    parts = fmt.compress(weight)
    # row 0 keeps columns 0, 2 (byte 0 = 0b101) and 8 (byte 1 = 0b1); row 1 keeps column 2
    assert parts[fmt.BITMASK].tolist() == [[5, 1], [4, 0]]
    assert parts[fmt.VALUES].tolist() == [1.0, 2.0, 4.0, 3.0]
    assert parts[fmt.ROW_OFFSETS].tolist() == [0, 3, 4]
    assert parts[fmt.SHAPE].tolist() == [2, 9]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_half_sparse_linear_takes_at_most_0_6_of_dense(dtype):
    weight = masked_weight(576, 1536, 0.5, dtype)
    parts = fmt.compress(weight)
    dense_bytes = weight.numel() * weight.element_size()
    assert fmt.compressed_nbytes(parts) <= 0.6 * dense_bytes


def tiny_state_dict():
    return {
        "model.embed_tokens.weight": torch.randn(11, 16),
        "model.layers.0.self_attn.q_proj.weight": masked_weight(16, 16, 0.5, torch.float32, 1),
        "model.layers.0.self_attn.q_proj.bias": torch.randn(16),
        "model.layers.0.mlp.down_proj.weight": masked_weight(16, 24, 0.5, torch.float32, 2),
        "model.norm.weight": torch.ones(16),
    }


THRESHOLDS = {"model.layers.0.self_attn.q_proj": 0.25, "model.layers.0.mlp.down_proj": 0.0}


def write_tiny(tmp_path, **kwargs):
    state = tiny_state_dict()
    out = fmt.write_checkpoint(
        tmp_path / "ckpt",
        state,
        THRESHOLDS,
        {"model_type": "llama"},
        {"method": "magnitude"},
        **kwargs,
    )
    return out, state


def test_save_and_reload(tmp_path):
    out, state = write_tiny(tmp_path)
    loaded, thresholds, config = fmt.read_checkpoint(out)
    assert thresholds == THRESHOLDS
    assert set(loaded) == set(state)
    for key, tensor in state.items():
        assert torch.equal(loaded[key], tensor), key
    qc = config["quantization_config"]
    assert (qc["quant_method"], qc["format"], qc["format_version"]) == (
        "duogpt",
        fmt.FORMAT_NAME,
        1,
    )
    assert qc["method"] == "magnitude"
    assert not list(tmp_path.glob(".ckpt.partial-*"))


def test_sharded_checkpoint_reloads(tmp_path):
    out, state = write_tiny(tmp_path, max_shard_bytes=512)
    assert (out / fmt.INDEX_FILE).is_file()
    assert len(fmt.safetensors_files(out)) > 1
    loaded, _, _ = fmt.read_checkpoint(out)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_file_pins_the_bitmask_bytes(tmp_path):
    weight = torch.zeros(2, 9)
    weight[0, 0], weight[0, 2], weight[0, 8], weight[1, 2] = 1, 2, 4, 3
    out = fmt.write_checkpoint(tmp_path / "g", {"l.weight": weight}, {"l": 0.5}, {}, {})
    raw = (out / "model.safetensors").read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + header_len])
    assert header["__metadata__"][fmt.SAFETENSORS_FORMAT_KEY] == fmt.FORMAT_NAME
    begin, end = header["l.weight_bitmask"]["data_offsets"]
    assert raw[8 + header_len + begin : 8 + header_len + end] == bytes([5, 1, 4, 0])
    begin, end = header["l.weight_values"]["data_offsets"]
    assert struct.unpack("<4f", raw[8 + header_len + begin : 8 + header_len + end]) == (1, 2, 4, 3)


def test_refuses_to_overwrite(tmp_path):
    write_tiny(tmp_path)
    with pytest.raises(FileExistsError):
        write_tiny(tmp_path)


def test_failed_write_leaves_nothing(tmp_path):
    state = tiny_state_dict()
    state["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("nan")
    with pytest.raises(fmt.FormatError, match="NaN"):
        fmt.write_checkpoint(tmp_path / "ckpt", state, THRESHOLDS, {}, {})
    assert list(tmp_path.iterdir()) == []


def test_truncated_file_is_named(tmp_path):
    out, _ = write_tiny(tmp_path)
    path = out / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(fmt.FormatError, match="model.safetensors"):
        fmt.read_checkpoint(out)


def rewrite(out, mutate):
    path = out / "model.safetensors"
    tensors = load_file(str(path))
    mutate(tensors)
    meta = {fmt.SAFETENSORS_FORMAT_KEY: fmt.FORMAT_NAME, fmt.SAFETENSORS_VERSION_KEY: "1"}
    save_file(tensors, str(path), metadata=meta)


Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t.update({f"{Q}.weight_values": t[f"{Q}.weight_values"][:-1]}), "bitmask keeps"),
        (lambda t: t.update({f"{Q}.weight_shape": torch.tensor([16, 17])}), "weight_bitmask"),
        (lambda t: t.update({f"{Q}.weight_shape": torch.tensor([16])}), "weight_shape"),
        (lambda t: t.pop(f"{Q}.input_threshold"), "missing input_threshold"),
        (lambda t: t.pop(f"{Q}.weight_row_offsets"), "missing weight_row_offsets"),
        (lambda t: t.update({f"{Q}.input_threshold": torch.tensor([-1.0])}), "must be finite"),
        (
            lambda t: t.update({f"{Q}.weight_row_offsets": t[f"{Q}.weight_row_offsets"].flip(0)}),
            "offsets disagree",
        ),
    ],
)
def test_inconsistent_tensors_name_the_tensor(tmp_path, mutate, message):
    out, _ = write_tiny(tmp_path)
    rewrite(out, mutate)
    with pytest.raises(fmt.FormatError, match=message) as info:
        fmt.read_checkpoint(out)
    assert Q in str(info.value)


def test_unknown_version_in_config(tmp_path):
    out, _ = write_tiny(tmp_path)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["format_version"] = 3
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(fmt.FormatError, match="unsupported format version 3; this build reads 1"):
        fmt.read_checkpoint(out)


def test_unknown_version_in_file_metadata(tmp_path):
    out, _ = write_tiny(tmp_path)
    path = out / "model.safetensors"
    tensors = load_file(str(path))
    save_file(
        tensors,
        str(path),
        metadata={fmt.SAFETENSORS_FORMAT_KEY: fmt.FORMAT_NAME, fmt.SAFETENSORS_VERSION_KEY: "2"},
    )
    with pytest.raises(fmt.FormatError, match="unsupported format version 2"):
        fmt.read_checkpoint(out)


def test_pickles_are_never_read(tmp_path):
    out, _ = write_tiny(tmp_path)
    (out / "model.safetensors").unlink()
    (out / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(fmt.FormatError, match="never reads pickles"):
        fmt.read_checkpoint(out)
