"""The calibration driver (method.md section 6): model in, DuoGPT checkpoint out.

Two trajectories go through the model one decoder block at a time: the dense path (inputs of
block l in the dense model, ``X~``) and the pruned path (inputs of block l in the model pruned so
far, activation sparsity on, ``X^``). For each block, group by group in call order
([q, k, v] -> [o] -> [gate, up] -> [down]):

1. calibrate the group's threshold on the pruned path, with everything upstream (including this
   block's earlier groups) already pruned and sparsified, so the calibrated fraction is the one
   the runtime sees;
2. stream the samples through both paths, accumulating H, G and a for the group's shared input;
3. solve every member and write its pruned weight into the working block.

A last pass runs both paths through the finished block: its outputs become the next block's
inputs, and each linear's output is compared with its dense counterpart (relative error).

Baselines share the driver: ``sparsegpt`` is the solver with ``alpha = 0`` and H from the same
pruned-path (sparsified) inputs, so against ``duogpt`` it isolates the residual correction;
``wanda`` and ``magnitude`` only mask. Activation-only runs (``weight_sparsity = 0``) calibrate
thresholds and leave weights untouched; weight-only runs (``act_sparsity = 0``) store threshold 0.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from vllm_duogpt.calibrate.blocks import (
    LayerCall,
    LinearGroup,
    block_output,
    capture_block_inputs,
    capture_hook,
    decoder_layers,
    hooks,
    linear_groups,
    run_until_captured,
    sparsify_hook,
)
from vllm_duogpt.calibrate.config import CalibrationConfig, CalibrationError
from vllm_duogpt.calibrate.memory import MemoryPlan, format_bytes, peak_rss_bytes, plan_memory
from vllm_duogpt.calibrate.partial import (
    PartialState,
    load_state,
    load_trajectories,
    save_block,
    windows_digest,
)
from vllm_duogpt.calibrate.solver import (
    LayerStats,
    SolveResult,
    accumulate,
    init_stats,
    prune_duogpt,
    prune_magnitude,
    prune_wanda,
)
from vllm_duogpt.calibrate.thresholds import ThresholdEstimator

logger = logging.getLogger(__name__)


@dataclass
class LinearReport:
    """Metrics of one calibrated linear.

    ``seconds`` covers its group's threshold and statistics passes plus its own solve; ``loss`` is
    the solver's objective change (``SolveResult.loss``); ``rel_error`` is
    ``||y_pruned - y_dense|| / ||y_dense||`` over the calibration tokens; ``act_sparsity`` is the
    measured fraction of zeros in the input it sees.
    """

    name: str
    shape: tuple[int, int]
    seconds: float
    loss: float
    rel_error: float
    weight_sparsity: float
    act_sparsity: float
    threshold: float
    damping: float


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
    """

    out_dir: Path
    seconds: float
    peak_memory_bytes: int
    peak_rss_bytes: int
    weight_sparsity: float
    act_sparsity: float
    linears: list[LinearReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


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


def _derived_seed(seed: int, block: int, group: int) -> int:
    # Independent of run history, so a resumed run subsamples the same activations.
    return (seed * 1_000_003 + block * 1_009 + group) % (1 << 63)


class _Driver:
    """State of one run: the trajectories, the block call arguments and the progress."""

    def __init__(
        self,
        config: CalibrationConfig,
        device: torch.device,
        calls: list[LayerCall],
        dense: torch.Tensor,
        pruned: torch.Tensor,
        plan: MemoryPlan,
    ) -> None:
        self.config = config
        self.device = device
        self.calls = calls
        self.dense = dense
        self.pruned = pruned
        self.plan = plan
        self.held_peak = 0

    def _sample(self, trajectory: torch.Tensor, s: int) -> torch.Tensor:
        return trajectory[s : s + 1].to(self.device)

    def _hold(self, extra: int) -> None:
        self.held_peak = max(
            self.held_peak, self.plan.trajectories + self.plan.block + self.plan.activations + extra
        )

    @torch.no_grad()
    def threshold(self, block: nn.Module, group: LinearGroup, call: LayerCall, seed: int) -> float:
        """Section 3 threshold of the group's input, on the pruned path as it now runs."""
        if self.config.act_sparsity == 0.0:
            return 0.0
        estimator = ThresholdEstimator(self.config.act_sparsity, self.config.nsamples, seed)
        with hooks([group.modules[0].register_forward_pre_hook(capture_hook(estimator.update))]):
            for s in range(self.config.nsamples):
                run_until_captured(block, self._sample(self.pruned, s), call)
        return estimator.threshold()

    @torch.no_grad()
    def statistics(
        self, dense_block: nn.Module, block: nn.Module, group: LinearGroup, call: LayerCall
    ) -> LayerStats:
        """Stream every sample through both paths into H, G, a of the group's input (4, 6.3)."""
        k = group.in_features
        stats = init_stats(k, self.device)
        self._hold(2 * k * k * 4)
        residual = self.config.method == "duogpt"
        seen: dict[str, torch.Tensor] = {}

        def keep(key: str) -> Callable[[torch.Tensor], None]:
            return lambda x: seen.__setitem__(key, x)

        # Registered after the group's sparsify hooks, so it sees X^ already thresholded.
        handles = [group.modules[0].register_forward_pre_hook(capture_hook(keep("hat")))]
        dense_first = dense_block.get_submodule(group.names[0])
        handles.append(dense_first.register_forward_pre_hook(capture_hook(keep("dense"))))
        with hooks(handles):
            for s in range(self.config.nsamples):
                if residual:
                    run_until_captured(dense_block, self._sample(self.dense, s), call)
                run_until_captured(block, self._sample(self.pruned, s), call)
                x_dense = seen["dense"].reshape(-1, k) if residual else None
                accumulate(stats, seen["hat"].reshape(-1, k), x_dense)
        return stats

    def solve(self, weight: torch.Tensor, stats: LayerStats | None) -> SolveResult | None:
        """Prune one weight with the configured method (None: weights stay as they are)."""
        cfg = self.config
        if cfg.weight_sparsity == 0.0:
            return None
        pattern = cfg.solver_pattern
        if cfg.method == "magnitude":
            return prune_magnitude(weight, cfg.weight_sparsity, pattern)
        assert stats is not None
        if cfg.method == "wanda":
            return prune_wanda(weight, stats, cfg.weight_sparsity, pattern)
        alpha = cfg.alpha if cfg.method == "duogpt" else 0.0
        return prune_duogpt(
            weight, stats, cfg.weight_sparsity, pattern, alpha,
            blocksize=cfg.blocksize, percdamp=cfg.percdamp, lazy_values=cfg.lazy_values,
        )  # fmt: skip

    @torch.no_grad()
    def advance(
        self, dense_block: nn.Module, block: nn.Module, call: LayerCall
    ) -> tuple[dict[str, float], dict[str, float]]:
        """Run both paths through the finished block (in place) and measure every linear.

        Returns:
            ``(rel_error, act_sparsity)`` by linear name relative to the block.
        """
        dense_out: dict[str, torch.Tensor] = {}
        err: dict[str, torch.Tensor] = {}
        ref: dict[str, torch.Tensor] = {}
        zeros: dict[str, int] = {}
        total: dict[str, int] = {}

        def on_dense(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
                dense_out[name] = output

            return hook

        def on_pruned(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
                target = dense_out.pop(name)
                diff = (output - target).double().square().sum()
                err[name] = err.get(name, 0) + diff
                ref[name] = ref.get(name, 0) + target.double().square().sum()
                zeros[name] = zeros.get(name, 0) + int((args[0] == 0).sum())
                total[name] = total.get(name, 0) + args[0].numel()

            return hook

        names = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
        handles = [dense_block.get_submodule(n).register_forward_hook(on_dense(n)) for n in names]
        handles += [block.get_submodule(n).register_forward_hook(on_pruned(n)) for n in names]
        with hooks(handles):
            for s in range(self.config.nsamples):
                out_dense = block_output(dense_block, self._sample(self.dense, s), call)
                out_pruned = block_output(block, self._sample(self.pruned, s), call)
                self.dense[s].copy_(out_dense[0])
                self.pruned[s].copy_(out_pruned[0])
        rel = {n: float((err[n] / ref[n].clamp_min(1e-30)).sqrt()) for n in names}
        act = {n: zeros[n] / max(total[n], 1) for n in names}
        return rel, act

    @torch.no_grad()
    def block(self, index: int, cpu_block: nn.Module) -> tuple[list[LinearReport], list[str]]:
        """Calibrate one decoder block in place (its linear weights are overwritten)."""
        call = self.calls[index].to(self.device)
        dense_block = copy.deepcopy(cpu_block).to(device=self.device, dtype=torch.float32)
        block = copy.deepcopy(dense_block)
        self._hold(0)
        groups = linear_groups(block, self._sample(self.pruned, 0), call)
        solving = self.config.weight_sparsity > 0 and self.config.method != "magnitude"
        reports: list[LinearReport] = []
        notes: list[str] = []
        sparsify: list[torch.utils.hooks.RemovableHandle] = []
        with hooks(sparsify):
            for g, group in enumerate(groups):
                start = time.perf_counter()
                seed = _derived_seed(self.config.seed, index, g)
                tau = self.threshold(block, group, call, seed)
                if tau > 0.0:
                    hook = sparsify_hook(tau)
                    sparsify += [m.register_forward_pre_hook(hook) for m in group.modules]
                stats = self.statistics(dense_block, block, group, call) if solving else None
                shared = time.perf_counter() - start
                for name, module in zip(group.names, group.modules, strict=True):
                    t0 = time.perf_counter()
                    result = self.solve(module.weight, stats)
                    loss, damping = 0.0, 0.0
                    if result is not None:
                        module.weight.copy_(result.W)
                        notes += [f"{name}: {w}" for w in result.warnings]
                        loss, damping = result.loss, result.damping_used
                    del result  # its W and mask would double the block's footprint
                    weight = module.weight
                    reports.append(
                        LinearReport(
                            name=name,
                            shape=(weight.shape[0], weight.shape[1]),
                            seconds=shared + time.perf_counter() - t0,
                            loss=loss,
                            rel_error=float("nan"),
                            weight_sparsity=float((weight == 0).sum()) / weight.numel(),
                            act_sparsity=float("nan"),
                            threshold=tau,
                            damping=damping,
                        )
                    )
                del stats
            rel, act = self.advance(dense_block, block, call)
        for r in reports:
            r.rel_error, r.act_sparsity = rel[r.name], act[r.name]
            target = cpu_block.get_submodule(r.name).weight
            target.copy_(block.get_submodule(r.name).weight.to(target.device, target.dtype))
        return reports, notes


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
    driver = _Driver(config, device, calls, dense, pruned, plan)
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
            save_block(partial_dir, index, weights, dense, pruned, state, fingerprint, digest)
            peak = _peak_memory(device, driver.held_peak)
            logger.info(
                "block %d/%d done in %.1fs, peak memory %s",
                index + 1, len(layers), time.perf_counter() - start, format_bytes(peak),
            )  # fmt: skip

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
    )
    shutil.rmtree(partial_dir, ignore_errors=True)
    seconds = resumed_seconds + time.perf_counter() - started
    report = _final_report(out, state, seconds, _peak_memory(device, held_peak))
    logger.info(
        "calibrated %d linears in %.1fs: weight sparsity %.4f, activation sparsity %.4f, "
        "peak memory %s, peak RSS %s -> %s",
        len(report.linears), report.seconds, report.weight_sparsity, report.act_sparsity,
        format_bytes(report.peak_memory_bytes), format_bytes(report.peak_rss_bytes), out,
    )  # fmt: skip
    return report


def _peak_memory(device: torch.device, held_peak: int) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return held_peak


def _final_report(
    out: Path, state: PartialState, seconds: float, peak_memory: int
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
    )
