"""The DuoGPT checkpoint format: bitmask-compressed linears plus activation thresholds.

The byte-level specification is docs/format.md. This module is pure: it imports neither vLLM nor
transformers, so the calibration tool, the plugin and the inspection commands share it.

Per pruned linear ``P`` (its Hugging Face module name, e.g. ``model.layers.0.self_attn.q_proj``)
the checkpoint holds:

- ``P.weight_bitmask``   uint8 ``[N, ceil(K/8)]``: bit ``j % 8`` (LSB first) of byte ``j // 8`` of
  row ``r`` is 1 where ``W[r, j]`` is kept;
- ``P.weight_values``    model dtype ``[nnz]``: the kept values, row by row, left to right;
- ``P.weight_row_offsets`` int64 ``[N + 1]``: row ``r``'s values are
  ``values[offsets[r]:offsets[r + 1]]``;
- ``P.weight_shape``     int64 ``[2]``: ``[N, K]``;
- ``P.input_threshold``  float32 ``[1]``: the magnitude threshold of the linear's input.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT_NAME = "duogpt-bitmask"
FORMAT_VERSION = 1
QUANT_METHOD = "duogpt"

BITMASK = "weight_bitmask"
VALUES = "weight_values"
ROW_OFFSETS = "weight_row_offsets"
SHAPE = "weight_shape"
THRESHOLD = "input_threshold"
WEIGHT_PARTS = (BITMASK, VALUES, ROW_OFFSETS, SHAPE)
ALL_PARTS = (*WEIGHT_PARTS, THRESHOLD)

SAFETENSORS_FORMAT_KEY = "duogpt_format"
SAFETENSORS_VERSION_KEY = "duogpt_format_version"
INDEX_FILE = "model.safetensors.index.json"
VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BIT_WEIGHTS = 2 ** torch.arange(8, dtype=torch.int32)


class FormatError(ValueError):
    """A checkpoint or tensor that does not follow the DuoGPT format."""


def compress(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Compress a masked dense weight into bitmask, values, row offsets and shape.

    Entries equal to zero are the pruned ones.

    Args:
        weight: ``[N, K]`` float32, float16 or bfloat16 weight, pruned entries zero.

    Returns:
        The four weight parts keyed by their suffix (``weight_bitmask`` ...).

    Raises:
        FormatError: on a non-2-D, non-float or non-finite weight.
    """
    if weight.dim() != 2:
        raise FormatError(f"compress expects a 2-D weight, got shape {tuple(weight.shape)}")
    if weight.dtype not in VALUE_DTYPES:
        raise FormatError(f"compress: unsupported dtype {weight.dtype}; use one of {VALUE_DTYPES}")
    weight = weight.detach().cpu().contiguous()
    if not bool(torch.isfinite(weight).all()):
        raise FormatError("compress: weight holds NaN or Inf")
    rows, cols = weight.shape
    kept = weight != 0
    padded = torch.zeros(rows, _bytes_per_row(cols) * 8, dtype=torch.int32)
    padded[:, :cols] = kept.to(torch.int32)
    bitmask = (padded.view(rows, -1, 8) * _BIT_WEIGHTS).sum(-1).to(torch.uint8)
    counts = kept.sum(1, dtype=torch.int64)
    offsets = torch.zeros(rows + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=offsets[1:])
    return {
        BITMASK: bitmask,
        VALUES: weight[kept].clone(),
        ROW_OFFSETS: offsets,
        SHAPE: torch.tensor([rows, cols], dtype=torch.int64),
    }


def decompress(parts: Mapping[str, torch.Tensor], name: str = "weight") -> torch.Tensor:
    """Rebuild the masked dense weight from its parts, validating every invariant.

    Args:
        parts: the four weight parts keyed by suffix.
        name: the linear's name, used in error messages.

    Returns:
        The ``[N, K]`` dense weight in the values' dtype.

    Raises:
        FormatError: naming the tensor and the problem when a part is missing or inconsistent.
    """
    rows, cols = validate_parts(parts, name)
    kept = unpack_bitmask(parts[BITMASK], cols)
    dense = torch.zeros(rows, cols, dtype=parts[VALUES].dtype)
    dense[kept] = parts[VALUES]
    return dense


def validate_parts(parts: Mapping[str, torch.Tensor], name: str) -> tuple[int, int]:
    """Check the four weight parts of one linear against each other.

    Returns:
        ``(N, K)``.

    Raises:
        FormatError: naming ``name`` and the first problem found.
    """
    missing = [p for p in WEIGHT_PARTS if p not in parts]
    if missing:
        raise FormatError(f"{name}: missing {', '.join(missing)}")
    bitmask, values, offsets, shape = (parts[p] for p in WEIGHT_PARTS)
    if shape.dtype != torch.int64 or tuple(shape.shape) != (2,):
        raise FormatError(
            f"{name}.{SHAPE}: expected int64 [2], got {shape.dtype} {list(shape.shape)}"
        )
    rows, cols = (int(v) for v in shape)
    if rows <= 0 or cols <= 0:
        raise FormatError(f"{name}.{SHAPE}: non-positive shape [{rows}, {cols}]")
    expected_mask = (rows, _bytes_per_row(cols))
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != expected_mask:
        raise FormatError(
            f"{name}.{BITMASK}: expected uint8 {list(expected_mask)} for shape [{rows}, {cols}], "
            f"got {bitmask.dtype} {list(bitmask.shape)}"
        )
    if values.dim() != 1 or values.dtype not in VALUE_DTYPES:
        raise FormatError(
            f"{name}.{VALUES}: expected a 1-D float tensor, got {values.dtype} {list(values.shape)}"
        )
    if offsets.dtype != torch.int64 or tuple(offsets.shape) != (rows + 1,):
        raise FormatError(
            f"{name}.{ROW_OFFSETS}: expected int64 [{rows + 1}], "
            f"got {offsets.dtype} {list(offsets.shape)}"
        )
    bits = _unpack_bits(bitmask)
    if cols % 8 and bool(bits[:, cols:].any()):
        raise FormatError(f"{name}.{BITMASK}: padding bits beyond column {cols} are set")
    row_counts = bits[:, :cols].sum(1, dtype=torch.int64)
    kept_total = int(row_counts.sum())
    if kept_total != values.numel():
        raise FormatError(
            f"{name}: bitmask keeps {kept_total} weights but {VALUES} holds {values.numel()}"
        )
    if int(offsets[0]) != 0 or not torch.equal(offsets[1:] - offsets[:-1], row_counts):
        raise FormatError(f"{name}.{ROW_OFFSETS}: offsets disagree with the bitmask's row counts")
    return rows, cols


def unpack_bitmask(bitmask: torch.Tensor, cols: int) -> torch.Tensor:
    """Expand a ``[N, ceil(K/8)]`` uint8 bitmask into a ``[N, K]`` bool mask."""
    return _unpack_bits(bitmask)[:, :cols].bool()


def compressed_nbytes(parts: Mapping[str, torch.Tensor]) -> int:
    """Bytes the weight parts of one linear take on disk (tensor data only)."""
    return sum(parts[p].numel() * parts[p].element_size() for p in WEIGHT_PARTS)


def quantization_config(info: Mapping[str, Any]) -> dict[str, Any]:
    """The ``quantization_config`` block for ``config.json``.

    Args:
        info: calibration settings to record (method, sparsities, pattern, data...).
    """
    return {
        "quant_method": QUANT_METHOD,
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        **{k: v for k, v in info.items() if k not in ("quant_method", "format", "format_version")},
    }


def check_format_version(version: Any, where: str) -> None:
    """Raise a FormatError unless ``version`` is the one this build reads."""
    if str(version) != str(FORMAT_VERSION):
        raise FormatError(
            f"{where}: unsupported format version {version}; this build reads {FORMAT_VERSION}"
        )


def write_checkpoint(
    out_dir: str | os.PathLike[str],
    state_dict: Mapping[str, torch.Tensor],
    sparse_linears: Mapping[str, float],
    hf_config: Mapping[str, Any],
    quantization_info: Mapping[str, Any],
    copy_files_from: str | os.PathLike[str] | None = None,
    max_shard_bytes: int = 2 << 30,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write a DuoGPT checkpoint directory atomically.

    The directory is assembled next to ``out_dir`` and renamed into place at the end, so a killed
    run never leaves something that looks like a finished checkpoint.

    Args:
        out_dir: destination directory; must not exist yet.
        state_dict: the full Hugging Face state dict; each pruned linear's ``P.weight`` is a dense
            tensor whose pruned entries are zero.
        sparse_linears: pruned linear name ``P`` -> threshold of its input.
        hf_config: the dense model's ``config.json`` contents.
        quantization_info: calibration settings recorded in ``quantization_config``.
        copy_files_from: a model directory whose tokenizer and generation files are copied.
        max_shard_bytes: largest safetensors shard.
        extra_files: more text files for the directory (name -> content), e.g. the
            calibration's per-linear report.

    Returns:
        The checkpoint directory.

    Raises:
        FormatError: when ``out_dir`` exists or a named linear has no weight.
        FileExistsError: when ``out_dir`` already exists.
    """
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new --out or delete it")
    missing = [name for name in sparse_linears if f"{name}.weight" not in state_dict]
    if missing:
        raise FormatError(f"no weight in the state dict for sparse linears: {missing[:3]}")
    with atomic_directory(out) as staging:
        tensors = dict(_compressed_tensors(state_dict, sparse_linears))
        _write_shards(staging, tensors, max_shard_bytes)
        config = dict(hf_config)
        config["quantization_config"] = quantization_config(quantization_info)
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if copy_files_from is not None:
            copy_side_files(Path(copy_files_from), staging)
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
    return out


@contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """A staging directory next to ``out``, renamed to ``out`` only if the block succeeds.

    A killed or failed writer leaves at most a hidden ``.NAME.partial-*`` directory, never
    something that looks like a finished ``out``.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_checkpoint(
    ckpt_dir: str | os.PathLike[str],
) -> tuple[dict[str, torch.Tensor], dict[str, float], dict[str, Any]]:
    """Read a DuoGPT checkpoint into a dense state dict.

    Args:
        ckpt_dir: checkpoint directory.

    Returns:
        ``(state_dict, thresholds, config)``: the dense state dict (pruned linears decompressed
        into ``P.weight``), the threshold of every sparse linear's input, and ``config.json``.

    Raises:
        FormatError: on anything that is not a valid checkpoint, naming the file or tensor.
    """
    config = read_config(ckpt_dir)
    raw = dict(iter_checkpoint_tensors(ckpt_dir))
    state_dict: dict[str, torch.Tensor] = {}
    thresholds: dict[str, float] = {}
    for name, parts in group_sparse_parts(raw).items():
        if THRESHOLD not in parts:
            raise FormatError(f"{name}: missing {THRESHOLD}")
        state_dict[f"{name}.weight"] = decompress(parts, name)
        thresholds[name] = threshold_value(parts[THRESHOLD], name)
    for key, tensor in raw.items():
        if not key.endswith(ALL_PARTS):
            state_dict[key] = tensor
    return state_dict, thresholds, config


def read_config(ckpt_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Load ``config.json`` and check that it declares this format and version."""
    path = Path(ckpt_dir) / "config.json"
    if not path.is_file():
        raise FormatError(f"{path} not found: not a checkpoint directory")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise FormatError(f"{path}: invalid JSON ({err})") from err
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != QUANT_METHOD:
        raise FormatError(f"{path}: quantization_config.quant_method is not {QUANT_METHOD!r}")
    if qc.get("format") != FORMAT_NAME:
        raise FormatError(f"{path}: unknown format {qc.get('format')!r}; expected {FORMAT_NAME!r}")
    check_format_version(qc.get("format_version"), str(path))
    return config


def iter_checkpoint_tensors(
    ckpt_dir: str | os.PathLike[str],
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every tensor of a checkpoint's safetensors files, checking their metadata.

    Raises:
        FormatError: on a missing, truncated or foreign safetensors file.
    """
    for path in safetensors_files(ckpt_dir):
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                if meta.get(SAFETENSORS_FORMAT_KEY) != FORMAT_NAME:
                    raise FormatError(f"{path}: metadata does not declare {FORMAT_NAME!r}")
                check_format_version(meta.get(SAFETENSORS_VERSION_KEY), str(path))
                for key in handle.keys():
                    yield key, handle.get_tensor(key)
        except FormatError:
            raise
        except Exception as err:  # safetensors raises its own error types for bad files
            raise FormatError(f"{path}: unreadable safetensors file ({err})") from err


def safetensors_files(ckpt_dir: str | os.PathLike[str]) -> list[Path]:
    """The checkpoint's safetensors files, from the index when there is one."""
    root = Path(ckpt_dir)
    index = root / INDEX_FILE
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [root / n for n in names]
    else:
        files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FormatError(f"{root}: no .safetensors files (this format never reads pickles)")
    for path in files:
        if not path.is_file():
            raise FormatError(f"{path}: listed in {INDEX_FILE} but missing")
    return files


def group_sparse_parts(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Group compressed-linear tensors by linear name: ``{P: {suffix: tensor}}``."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        prefix, _, suffix = key.rpartition(".")
        if suffix in ALL_PARTS:
            groups.setdefault(prefix, {})[suffix] = tensor
    return groups


def threshold_value(tensor: torch.Tensor, name: str) -> float:
    """The scalar threshold stored in ``P.input_threshold``, validated."""
    if tensor.numel() != 1 or not tensor.dtype.is_floating_point:
        raise FormatError(
            f"{name}.{THRESHOLD}: expected one float, got {tensor.dtype} {list(tensor.shape)}"
        )
    value = float(tensor.reshape(()))
    if not value >= 0.0 or value == float("inf"):
        raise FormatError(f"{name}.{THRESHOLD}: must be finite and >= 0, got {value}")
    return value


def _compressed_tensors(
    state_dict: Mapping[str, torch.Tensor], sparse_linears: Mapping[str, float]
) -> Iterator[tuple[str, torch.Tensor]]:
    for key, tensor in state_dict.items():
        prefix = key[: -len(".weight")] if key.endswith(".weight") else None
        if prefix in sparse_linears:
            for suffix, part in compress(tensor).items():
                yield f"{prefix}.{suffix}", part
            threshold = torch.tensor([sparse_linears[prefix]], dtype=torch.float32)
            yield f"{prefix}.{THRESHOLD}", threshold
        else:
            yield key, tensor.detach().cpu().contiguous()


def _write_shards(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    metadata = {
        "format": "pt",
        SAFETENSORS_FORMAT_KEY: FORMAT_NAME,
        SAFETENSORS_VERSION_KEY: str(FORMAT_VERSION),
    }
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


_SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy the tokenizer and generation files of a model directory."""
    for name in _SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _bytes_per_row(cols: int) -> int:
    return (cols + 7) // 8


def _unpack_bits(bitmask: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(bitmask.shape[0], -1)
