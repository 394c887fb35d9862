"""Measured decode time of a model's decoder linears: one token, the serving kernel, real inputs.

A cheap speed axis for sweeps, where starting a vLLM engine per point would cost a minute each:
every decoder linear is timed at batch 1 on the inputs it really sees (captured from a forward
pass over a window of real text, at several token positions), through the same kernel class the
vLLM plugin serves with (``kernel_choice.choose_kernel``: the CPU kernel here) for a DuoGPT
checkpoint, and through fp32 ``torch.nn.functional.linear`` (what vLLM runs for a dense fp32
model) for a dense one, its weights on huge pages as the packed ones are (kernels/huge_pages.py).
Attention, norms and the LM head are not included: this is the part of decode that sparsity
changes, not end-to-end tokens/s (``duogpt bench`` measures that).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from vllm_duogpt import format as fmt
from vllm_duogpt.calibrate.blocks import decoder_layers, hooks
from vllm_duogpt.evaluate import load_hf_model, model_kind
from vllm_duogpt.kernels.huge_pages import to_huge_pages
from vllm_duogpt.torch_model import build_torch_model


@dataclass(frozen=True)
class LinearTiming:
    """Decoder-linear time per decoded token.

    Attributes:
        seconds_per_token: the fastest of ``repeats`` runs of all decoder linears back to back
            at batch 1, averaged over the captured token positions.
        linears: how many linears were timed.
        kernel: ``torch-fp32-dense`` or the dual-sparse kernel's name.
        threads: torch threads during the measurement.
    """

    seconds_per_token: float
    linears: int
    kernel: str
    threads: int


def _decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    prefix, layers = decoder_layers(model)
    return {
        f"{prefix}.{i}.{name}": module
        for i, layer in enumerate(layers)
        for name, module in layer.named_modules()
        if isinstance(module, nn.Linear)
    }


@torch.inference_mode()
def capture_inputs(
    model: nn.Module, names: list[str], tokens: torch.Tensor, positions: int
) -> dict[str, torch.Tensor]:
    """Each named linear's input at the last ``positions`` tokens of ``tokens`` (``[1, T]``).

    For a DuoGPT model the threshold hooks run first, so the inputs are already sparsified;
    the kernels apply the same threshold again, which changes nothing.
    """
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            seen[name] = args[0][0, -positions:].to(torch.float32).contiguous()

        return hook

    with hooks([model.get_submodule(n).register_forward_pre_hook(keep(n)) for n in names]):
        model(tokens)
    return seen


def _fastest_seconds(call: Callable[[], object], repeats: int) -> float:
    call()  # first-call costs (allocation, thread start-up) are not decode
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    # The minimum: calls this short are only ever slowed down by the rest of the machine.
    return min(times)


def decoder_linear_time(
    model_dir: str | os.PathLike[str],
    tokens: torch.Tensor,
    positions: int = 4,
    repeats: int = 30,
) -> LinearTiming:
    """Time every decoder linear of a dense model or DuoGPT checkpoint for one decoded token.

    Args:
        model_dir: dense model directory or DuoGPT checkpoint.
        tokens: ``[1, T]`` token ids of real text; inputs are captured at its last positions.
        positions: token positions timed, each as one batch-1 decode step through all linears.
        repeats: timed steps per position (the fastest is kept).

    Raises:
        ValueError: an exported masked-dense directory (time the DuoGPT checkpoint instead), or
            fewer than ``positions`` tokens.
    """
    from vllm_duogpt.kernel_choice import choose_kernel

    kind = model_kind(model_dir)
    if kind == "exported":
        raise ValueError(f"{model_dir} is an exported dense copy; time the DuoGPT checkpoint")
    if tokens.dim() != 2 or tokens.shape[0] != 1 or tokens.shape[1] < positions:
        raise ValueError(f"tokens must be [1, T>={positions}], got {tuple(tokens.shape)}")
    if kind == "duogpt":
        # Read once: the model, and the stored dtype and threshold of every linear.
        state, thresholds, config = fmt.read_checkpoint(model_dir)
        model = build_torch_model(state, thresholds, config, source=str(model_dir))
    else:
        model = load_hf_model(model_dir)
    linears = _decoder_linears(model)
    inputs = capture_inputs(model, list(linears), tokens, positions)
    calls: list[Callable[[torch.Tensor], object]] = []
    if kind == "duogpt":
        kernel = choose_kernel(torch.device("cpu"), torch.float32)
        for name, linear in linears.items():
            layer = nn.Module()
            layer.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
            layer.duogpt_threshold = thresholds.get(name, 0.0)
            layer.duogpt_checkpoint_dtype = state[f"{name}.weight"].dtype
            kernel.prepare(layer)
            calls.append(lambda x, layer=layer: kernel.apply(layer, x, None))
        kernel_name = kernel.name
    else:
        for linear in linears.values():
            # on huge pages like the packed weights: the ratio compares kernels, not page sizes
            weight = to_huge_pages(linear.weight.detach(), torch.float32)
            calls.append(lambda x, weight=weight: torch.nn.functional.linear(x, weight))
        kernel_name = "torch-fp32-dense"
    del model
    per_position = []
    with torch.inference_mode():
        for p in range(positions):
            # One decode step's linears, back to back, timed as a whole.
            xs = [inputs[name][p : p + 1] for name in linears]

            def step(xs: list[torch.Tensor] = xs) -> None:
                for call, x in zip(calls, xs, strict=True):
                    call(x)

            per_position.append(_fastest_seconds(step, repeats))
    return LinearTiming(
        seconds_per_token=statistics.fmean(per_position),
        linears=len(linears),
        kernel=kernel_name,
        threads=torch.get_num_threads(),
    )
