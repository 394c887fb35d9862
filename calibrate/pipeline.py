"""The calibration run (method.md section 6): model in, DuoGPT checkpoint out.

Two trajectories go through the model one decoder block at a time: the dense path (inputs of
block l in the dense model, ``X~``) and the pruned path (inputs of block l in the model pruned so
far, activation sparsity on, ``X^``). :mod:`driver` calibrates each block; this module loads the
model and data, plans memory, shows progress, checkpoints after every block (resume with
``--resume``) and writes the final checkpoint with :func:`vllm_duogpt.format.write_checkpoint`.

Baselines share the driver: ``sparsegpt`` is the solver with ``alpha = 0`` and H from the same
pruned-path (sparsified) inputs, so against ``duogpt`` it isolates the residual correction;
``wanda`` and ``magnitude`` only mask. Activation-only runs (``weight_sparsity = 0``) calibrate
thresholds and leave weights untouched; weight-only runs (``act_sparsity = 0``) store threshold 0.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from vllm_duogpt.calibrate.blocks import capture_block_inputs, decoder_layers
from vllm_duogpt.calibrate.config import CalibrationConfig, CalibrationError
from vllm_duogpt.calibrate.driver import (
    BlockCalibrator,
    LinearReport,
    LocalShardPool,
    ShardPool,
)
from vllm_duogpt.calibrate.memory import format_bytes, peak_rss_bytes, plan_memory
from vllm_duogpt.calibrate.partial import (
    PartialState,
    load_state,
    load_trajectories,
    save_block,
    windows_digest,
)

logger = logging.getLogger(__name__)


@dataclass
class CalibrationReport:
    """Outcome of :func:`calibrate`.

    Attributes:
        out_dir: the written checkpoint.
        seconds: calibration wall time (including time before a resume).
        peak_memory_bytes: ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU, the bytes of
            trajectories, blocks and statistics the driver held at its peak.
        peak_rss_bytes: peak resident memory of the process.
        weight_sparsity: zeros over all calibrated linears' weights.
        act_sparsity: zeros over all calibrated linears' inputs.
        linears: per-linear metrics, in model order.
        warnings: solver notes (raised damping, dead inputs).
        worker_peak_bytes: with Ray workers, each worker's peak memory (device memory on GPUs,
            resident set size on CPUs); empty without.
    """

    out_dir: Path
    seconds: float
    peak_memory_bytes: int
    peak_rss_bytes: int
    weight_sparsity: float
    act_sparsity: float
    linears: list[LinearReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    worker_peak_bytes: list[int] = field(default_factory=list)


def _device(config: CalibrationConfig) -> torch.device:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise CalibrationError("--device cuda but no CUDA device is visible; use --device cpu")
    return torch.device(config.device)


def _load_model(model_dir: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    except (ValueError, KeyError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CalibrationError(f"cannot load {model_dir} as a causal LM: {first}") from err
    return model.eval()


def _calibration_windows(
    config: CalibrationConfig, model_dir: Path, model: nn.Module
) -> torch.Tensor:
    from transformers import AutoTokenizer

    from vllm_duogpt.calibrate.calib_data import load_calibration_windows

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    try:
        return load_calibration_windows(
            config.calib_data,
            tokenizer,
            config.nsamples,
            config.seqlen,
            config.seed,
            model=model if config.calib_data == "self" else None,
        )
    except ValueError as err:
        raise CalibrationError(str(err)) from err


def _check_windows(windows: torch.Tensor, config: CalibrationConfig, vocab_size: int) -> None:
    if tuple(windows.shape) != (config.nsamples, config.seqlen):
        raise CalibrationError(
            f"calibration windows have shape {list(windows.shape)}, expected "
            f"[{config.nsamples}, {config.seqlen}] (--nsamples, --seqlen)"
        )
    if windows.dtype != torch.long or int(windows.min()) < 0 or int(windows.max()) >= vocab_size:
        raise CalibrationError(f"calibration windows must be token ids in [0, {vocab_size})")


def _log_linear(full_name: str, r: LinearReport) -> None:
    logger.info(
        "%s [%dx%d] time %.2fs loss %.4g rel.err %.4f w.sparsity %.3f x.sparsity %.3f tau %.4g",
        full_name, r.shape[0], r.shape[1], r.seconds, r.loss, r.rel_error,
        r.weight_sparsity, r.act_sparsity, r.threshold,
    )  # fmt: skip


def _unique_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop tied duplicates (``lm_head.weight`` sharing the embedding): safetensors refuses
    shared storage, and loaders re-tie them from ``tie_word_embeddings``."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    unique = {}
    for key, tensor in state_dict.items():
        ident = (tensor.data_ptr(), tuple(tensor.shape))
        if ident in seen:
            logger.info("not writing %s: it shares storage with an earlier tensor", key)
            continue
        seen.add(ident)
        unique[key] = tensor
    return unique


def calibrate(
    config: CalibrationConfig, calibration_windows: torch.LongTensor | None = None
) -> CalibrationReport:
    """Calibrate a model with DuoGPT (or a baseline) and write the sparse checkpoint.

    Args:
        config: the run's settings.
        calibration_windows: ``[nsamples, seqlen]`` token ids; None loads ``config.calib_data``
            with the model's tokenizer.

    Returns:
        Timing, memory and per-linear metrics of the run.

    Raises:
        CalibrationError: unusable inputs (model, data, sizes, existing output), in one line.
    """
    from vllm_duogpt.calibrate.models import resolve_model
    from vllm_duogpt.format import write_checkpoint

    started = time.perf_counter()
    device = _device(config)
    if config.out.exists():
        raise CalibrationError(f"--out {config.out} already exists; choose another or delete it")
    partial_dir = config.partial_dir
    if partial_dir.exists() and not config.resume:
        raise CalibrationError(
            f"{partial_dir} holds an interrupted run; pass --resume to continue it or delete it"
        )
    try:
        model_dir = resolve_model(config.model)
    except (ValueError, FileNotFoundError) as err:
        raise CalibrationError(str(err)) from err
    hf_config = json.loads((model_dir / "config.json").read_text())
    max_positions = hf_config.get("max_position_embeddings")
    if max_positions and config.seqlen > max_positions:
        raise CalibrationError(
            f"--seqlen {config.seqlen} exceeds the model's max_position_embeddings "
            f"{max_positions}; pass --seqlen {max_positions} or less"
        )
    model = _load_model(model_dir)
    prefix, layers = decoder_layers(model)
    windows = calibration_windows
    if windows is None:
        windows = _calibration_windows(config, model_dir, model)
    _check_windows(windows, config, model.get_input_embeddings().weight.shape[0])
    hidden = model.get_input_embeddings().weight.shape[1]
    heads = int(getattr(model.config, "num_attention_heads", 1))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    plan = plan_memory(config, layers[0], hidden, heads, device)

    fingerprint = config.fingerprint()
    digest = windows_digest(windows)
    loaded = load_state(partial_dir, fingerprint, digest) if config.resume else None
    if loaded is not None:
        state, weights = loaded
        with torch.no_grad():
            for key, value in weights.items():
                model.get_parameter(key).copy_(value)
        dense, pruned = load_trajectories(partial_dir)
        dense, pruned = dense.to(plan.trajectory_device), pruned.to(plan.trajectory_device)
        calls = capture_block_inputs(model, windows, None)
        logger.info("resuming %s at block %d/%d", partial_dir, state.next_block, len(layers))
    else:
        state = PartialState()
        shape = (config.nsamples, config.seqlen, hidden)
        dense = torch.empty(shape, dtype=torch.float32, device=plan.trajectory_device)
        calls = capture_block_inputs(model, windows, dense)
        pruned = dense.clone()
    resumed_seconds = state.seconds
    pool = _shard_pool(config, device, calls)
    driver = BlockCalibrator(config, pool, dense, pruned, plan)
    try:
        _calibrate_blocks(driver, layers, prefix, state, started, device, fingerprint, digest)
        worker_peaks = pool.peak_bytes()
    finally:
        pool.close()

    held_peak = driver.held_peak
    del driver, dense, pruned
    info = config.quantization_info()
    out = write_checkpoint(
        config.out,
        _unique_tensors(model.state_dict()),
        state.thresholds,
        hf_config,
        info,
        copy_files_from=model_dir,
        # Per-linear metrics (time, loss, error vs dense, sparsities) for `duogpt report`.
        extra_files={"calibration_report.json": json.dumps({"linears": state.reports}, indent=2)},
    )
    shutil.rmtree(partial_dir, ignore_errors=True)
    seconds = resumed_seconds + time.perf_counter() - started
    report = _final_report(out, state, seconds, _peak_memory(device, held_peak), worker_peaks)
    logger.info(
        "calibrated %d linears in %.1fs: weight sparsity %.4f, activation sparsity %.4f, "
        "peak memory %s, peak RSS %s -> %s",
        len(report.linears), report.seconds, report.weight_sparsity, report.act_sparsity,
        format_bytes(report.peak_memory_bytes), format_bytes(report.peak_rss_bytes), out,
    )  # fmt: skip
    return report


def _shard_pool(config: CalibrationConfig, device: torch.device, calls: list) -> ShardPool:
    """This process for one worker; Ray actors (imported only then) for more."""
    if config.workers == 1:
        return LocalShardPool(config, device, calls)
    from vllm_duogpt.calibrate.ray_pool import RayShardPool

    return RayShardPool(config, calls)


def _calibrate_blocks(
    driver: BlockCalibrator,
    layers: nn.ModuleList,
    prefix: str,
    state: PartialState,
    started: float,
    device: torch.device,
    fingerprint: dict[str, Any],
    digest: str,
) -> None:
    """Calibrate the blocks from ``state.next_block`` on, saving resume state after each."""
    config = driver.config
    resumed_seconds = state.seconds
    with logging_redirect_tqdm():
        bar = tqdm(
            range(state.next_block, len(layers)),
            initial=state.next_block, total=len(layers), desc="calibrating", unit="block",
        )  # fmt: skip
        for index in bar:
            start = time.perf_counter()
            reports, notes = driver.block(index, layers[index])
            for r in reports:
                full = f"{prefix}.{index}.{r.name}"
                _log_linear(full, r)
                state.thresholds[full] = r.threshold
                state.reports.append({**asdict(r), "name": full})
            for note in notes:
                logger.warning("%s.%d.%s", prefix, index, note)
            state.warnings += [f"{prefix}.{index}.{n}" for n in notes]
            state.next_block = index + 1
            state.seconds = resumed_seconds + time.perf_counter() - started
            weights = {
                f"{prefix}.{index}.{r.name}.weight": layers[index].get_submodule(r.name).weight
                for r in reports
            }
            saving = time.perf_counter()
            save_block(
                config.partial_dir, index, weights, driver.dense, driver.pruned, state,
                fingerprint, digest,
            )  # fmt: skip
            now = time.perf_counter()
            logger.info(
                "block %d/%d done in %.1fs (checkpoint %.1fs), peak memory %s",
                index + 1, len(layers), now - start, now - saving,
                format_bytes(_peak_memory(device, driver.held_peak)),
            )  # fmt: skip


def _peak_memory(device: torch.device, held_peak: int) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return held_peak


def _final_report(
    out: Path, state: PartialState, seconds: float, peak_memory: int, worker_peaks: list[int]
) -> CalibrationReport:
    linears = []
    for r in state.reports:
        fields: dict[str, Any] = dict(r)
        fields["shape"] = tuple(fields["shape"])
        linears.append(LinearReport(**fields))
    params = sum(r.shape[0] * r.shape[1] for r in linears)
    pruned = sum(r.weight_sparsity * r.shape[0] * r.shape[1] for r in linears)
    inputs = sum(r.shape[1] for r in linears)
    act = sum(r.act_sparsity * r.shape[1] for r in linears)
    return CalibrationReport(
        out_dir=out,
        seconds=seconds,
        peak_memory_bytes=peak_memory,
        peak_rss_bytes=peak_rss_bytes(),
        weight_sparsity=pruned / max(params, 1),
        act_sparsity=act / max(inputs, 1),
        linears=linears,
        warnings=list(state.warnings),
        worker_peak_bytes=worker_peaks,
    )
