"""The entry point registers the ``duogpt`` method once and its config validates checkpoints."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

import vllm_duogpt
from vllm_duogpt import format as fmt


def test_entry_point_is_declared():
    plugins = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert any(ep.name == "duogpt" and ep.value == "vllm_duogpt:register" for ep in plugins)


def test_register_is_idempotent_and_adds_the_method():
    from vllm.model_executor.layers.quantization import (
        QUANTIZATION_METHODS,
        get_quantization_config,
    )

    vllm_duogpt.register()
    vllm_duogpt.register()
    assert QUANTIZATION_METHODS.count("duogpt") == 1
    assert get_quantization_config("duogpt").__name__ == "DuoGPTConfig"


def good_config() -> dict:
    return {"quant_method": "duogpt", "format": fmt.FORMAT_NAME, "format_version": 1}


def test_config_accepts_its_format():
    from vllm_duogpt.quant_config import DuoGPTConfig

    config = DuoGPTConfig.from_config({**good_config(), "weight_sparsity": 0.5})
    assert config.get_name() == "duogpt"
    assert config.settings["weight_sparsity"] == 0.5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format_version": 3}, "unsupported format version 3; this build reads 1"),
        ({"format": "sparse-bitmask"}, "Unsupported duogpt format 'sparse-bitmask'"),
        ({"quant_method": "gptq"}, "quant_method 'gptq' is not 'duogpt'"),
    ],
)
def test_config_names_the_bad_value(change, message):
    from vllm_duogpt.quant_config import DuoGPTConfig

    with pytest.raises(ValueError, match=message):
        DuoGPTConfig.from_config({**good_config(), **change})


def test_kernel_choice_prefers_the_cpu_kernel_and_can_be_forced(monkeypatch):
    import torch

    from vllm_duogpt.kernel_choice import choose_kernel
    from vllm_duogpt.kernels.cpu_kernel import cpu_kernel_available

    expected = "cpu-sparse" if cpu_kernel_available()[0] else "torch-reference"
    assert choose_kernel(torch.device("cpu"), torch.float32).name == expected
    monkeypatch.setenv("DUOGPT_KERNEL", "torch-reference")
    assert choose_kernel(torch.device("cpu"), torch.float32).name == "torch-reference"
    monkeypatch.setenv("DUOGPT_KERNEL", "triton")
    with pytest.raises(RuntimeError, match="not a CUDA GPU"):
        choose_kernel(torch.device("cpu"), torch.float32)


def test_embedding_packs_its_cpu_gemm_copy_only_for_a_product():
    """The input embedding skips vLLM's CPU GEMM copy at load and makes it on a first product."""
    from vllm.platforms import current_platform

    from vllm_duogpt.embedding_method import DuoGPTEmbeddingMethod

    if not current_platform.is_cpu():
        pytest.skip("the copy is a CPU-backend matter")
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(torch.randn(48, 16), requires_grad=False)
    method = DuoGPTEmbeddingMethod()
    method.process_weights_after_loading(layer)
    assert not hasattr(layer, "cpu_linear")
    ids = torch.tensor([3, 0, 47])
    assert torch.equal(method.embedding(layer, ids), layer.weight[ids])
    x = torch.randn(2, 16)
    torch.testing.assert_close(method.apply(layer, x), x @ layer.weight.T)
    assert hasattr(layer, "cpu_linear")
