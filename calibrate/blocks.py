"""Decoder-block plumbing for the calibration driver: find blocks, capture their inputs and call
arguments, group a block's linears by shared input, and the hooks that feed the solver.

Works for any LLaMA-family model (Llama, Mistral, Qwen2/3...): blocks are ``model.model.layers``,
and the arguments a block is called with (rotary embeddings, causal or sliding-window masks) are
recorded from the model's own forward instead of being rebuilt here, so each architecture's
masking rules are honoured without knowing them. Linears are grouped by the identity of the
tensor they receive, in call order: q/k/v share one input, gate/up another (method.md section 2).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vllm_duogpt.calibrate.config import CalibrationError
from vllm_duogpt.kernels.reference import sparsify_activations

_CACHE_KWARGS = ("past_key_values", "use_cache")


class StopForward(Exception):
    """Raised from a hook once the wanted input is captured: the rest of the block is skipped."""


@dataclass
class LinearGroup:
    """Linears of one block that read the same input tensor.

    Attributes:
        names: module names relative to the block (``self_attn.q_proj``), in call order.
        modules: the linears, same order.
    """

    names: list[str]
    modules: list[nn.Linear]

    @property
    def in_features(self) -> int:
        return self.modules[0].in_features


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks of a LLaMA-family causal LM and their state-dict prefix.

    Raises:
        CalibrationError: the model has no ``model.layers`` list of blocks.
    """
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise CalibrationError(
            f"{type(model).__name__} has no model.layers decoder blocks; duogpt calibrate supports "
            "LLaMA-family causal LMs (Llama, Mistral, Qwen2/3)"
        )
    prefix = next(name for name, module in model.named_modules() if module is layers)
    return prefix, layers


def block_output(block: nn.Module, hidden: torch.Tensor, call: LayerCall) -> torch.Tensor:
    """Run one decoder block; transformers 5 returns a tensor, older releases a tuple."""
    out = block(hidden, *call.args, **call.kwargs)
    return out[0] if isinstance(out, tuple) else out


@dataclass
class LayerCall:
    """Positional and keyword arguments a decoder block receives after ``hidden_states``."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def to(self, device: torch.device) -> LayerCall:
        return LayerCall(_move(self.args, device), _move(self.kwargs, device))


def _move(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_move(o, device) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


class _Recorder(nn.Module):
    """Stands in for a decoder block: records what it is called with, returns its input."""

    def __init__(self, original: nn.Module, sink: Callable[[torch.Tensor, tuple, dict], None]):
        super().__init__()
        self.sink = sink
        # Some models read per-block attributes (sliding or full attention) from the block.
        for attr in ("attention_type", "layer_idx", "is_sliding"):
            if hasattr(original, attr):
                setattr(self, attr, getattr(original, attr))

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.sink(hidden_states, args, kwargs)
        return hidden_states


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, windows: torch.Tensor, out: torch.Tensor | None
) -> list[LayerCall]:
    """Record every block's call arguments and (optionally) the first block's inputs.

    Blocks are swapped for recorders, so the model's forward only embeds the tokens and builds
    rotary embeddings and masks the way the architecture does (fp32: the embeddings are upcast).

    Args:
        model: the causal LM (on the CPU).
        windows: ``[nsamples, seqlen]`` token ids.
        out: ``[nsamples, seqlen, hidden]`` fp32 buffer for block 0's inputs, or None to record
            only the call arguments (from the first window).

    Returns:
        One :class:`LayerCall` per block (batch of one sample, on the CPU).
    """
    _, layers = decoder_layers(model)
    calls: list[LayerCall | None] = [None] * len(layers)
    originals = list(layers)
    current: dict[str, int] = {"sample": 0}

    def make_sink(index: int) -> Callable[[torch.Tensor, tuple, dict], None]:
        def sink(hidden: torch.Tensor, args: tuple, kwargs: dict) -> None:
            if calls[index] is None:
                # Calibration runs every sample from scratch: no KV cache.
                kept = {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS}
                calls[index] = LayerCall(tuple(args), {**kept, "use_cache": False})
            if index == 0 and out is not None:
                out[current["sample"]].copy_(hidden[0])

        return sink

    embed = model.get_input_embeddings()
    rows = windows.shape[0] if out is not None else 1
    try:
        for i, block in enumerate(originals):
            layers[i] = _Recorder(block, make_sink(i))
        for s in range(rows):
            current["sample"] = s
            ids = windows[s : s + 1].to(embed.weight.device)
            embeds = embed(ids).to(torch.float32)
            model.model(inputs_embeds=embeds, use_cache=False)
    finally:
        for i, block in enumerate(originals):
            layers[i] = block
    missing = [i for i, c in enumerate(calls) if c is None]
    if missing:
        raise CalibrationError(f"decoder blocks {missing} were never called by the model's forward")
    return [c for c in calls if c is not None]


@torch.no_grad()
def linear_groups(block: nn.Module, hidden: torch.Tensor, call: LayerCall) -> list[LinearGroup]:
    """Group the block's linears by shared input, in the order the block calls them.

    Raises:
        CalibrationError: a linear is not called exactly once (MoE routing, fused or reused
            projections): the driver's one-input-per-group model does not hold.
    """
    names = {m: name for name, m in block.named_modules() if isinstance(m, nn.Linear)}
    if not names:
        raise CalibrationError(f"{type(block).__name__} holds no nn.Linear layers")
    calls: list[tuple[nn.Linear, torch.Tensor]] = []

    def record(module: nn.Module, args: tuple) -> None:
        calls.append((module, args[0]))

    handles = [m.register_forward_pre_hook(record) for m in names]
    try:
        block_output(block, hidden, call)
    finally:
        for h in handles:
            h.remove()
    counts = {m: sum(1 for c, _ in calls if c is m) for m in names}
    wrong = [f"{names[m]} x{n}" for m, n in counts.items() if n != 1]
    if wrong:
        raise CalibrationError(
            f"linears {wrong} are not called exactly once per forward of "
            f"{type(block).__name__}; only dense LLaMA-family blocks are supported"
        )
    groups: list[tuple[torch.Tensor, LinearGroup]] = []
    for module, x in calls:
        for seen, group in groups:
            if seen is x:
                group.names.append(names[module])
                group.modules.append(module)
                break
        else:
            groups.append((x, LinearGroup([names[module]], [module])))
    return [g for _, g in groups]


@contextmanager
def hooks(handles: list[torch.utils.hooks.RemovableHandle]) -> Iterator[None]:
    """Remove the given hooks on exit."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def sparsify_hook(threshold: float) -> Callable[[nn.Module, tuple], tuple]:
    """Forward pre-hook applying the runtime activation rule ``|x| < tau -> 0`` (section 3)."""

    def hook(module: nn.Module, args: tuple) -> tuple:
        return (sparsify_activations(args[0], threshold), *args[1:])

    return hook


def capture_hook(
    store: Callable[[torch.Tensor], None], stop: bool = True
) -> Callable[[nn.Module, tuple], None]:
    """Forward pre-hook handing the linear's input to ``store``, then (optionally) stopping."""

    def hook(module: nn.Module, args: tuple) -> None:
        store(args[0])
        if stop:
            raise StopForward

    return hook


def run_until_captured(block: nn.Module, hidden: torch.Tensor, call: LayerCall) -> None:
    """Run the block until a capture hook raises :class:`StopForward`."""
    try:
        block_output(block, hidden, call)
    except StopForward:
        return
    raise RuntimeError("the capture hook never fired: the linear was not called")
