"""Weight buffers on transparent huge pages (kernels/huge_pages.py).

The oracle for "on huge pages" is the Linux kernel's own accounting: the ``AnonHugePages`` line of
the buffer's mapping in ``/proc/self/smaps``. Those tests skip where the system's transparent huge
page mode does not allow the check; the value checks run everywhere.
"""

from __future__ import annotations

import gc
import mmap
import re
from pathlib import Path

import pytest
import torch

from vllm_duogpt.kernels.cpu_kernel import cpu_dual_sparse_linear, cpu_kernel_available
from vllm_duogpt.kernels.cpu_layout import pack_cpu_weight, unpack_cpu_weight
from vllm_duogpt.kernels.huge_pages import (
    HUGE_PAGE_BYTES,
    huge_page_empty,
    huge_pages_enabled,
    to_huge_pages,
)
from vllm_duogpt.kernels.reference import dual_sparse_linear_reference

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str:
    """The system's transparent huge page mode: ``always``, ``madvise``, ``never`` or ``none``."""
    if not THP_MODE.exists():
        return "none"
    return re.search(r"\[(\w+)\]", THP_MODE.read_text()).group(1)


needs_thp = pytest.mark.skipif(
    thp_mode() not in ("always", "madvise") or not huge_pages_enabled(),
    reason=f"transparent huge pages: {thp_mode()}",
)
only_where_advised = pytest.mark.skipif(
    thp_mode() != "madvise", reason=f"transparent huge pages: {thp_mode()}, not madvise"
)


def huge_kib_of_mapping(address: int) -> int:
    """``AnonHugePages`` (KiB) of the mapping of this process that holds ``address``."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        span = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if span:
            inside = int(span.group(1), 16) <= address < int(span.group(2), 16)
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.parametrize("numel", [7, 3 * HUGE_PAGE_BYTES // 4 + 5])
@pytest.mark.parametrize("dtype", [torch.int16, torch.float32, torch.bfloat16])
def test_copy_keeps_values_shape_and_dtype(numel: int, dtype: torch.dtype) -> None:
    source = torch.randn(numel).to(dtype).view(-1, 1)
    copy = to_huge_pages(source)
    gc.collect()  # the buffer must outlive every Python object but the tensor
    assert copy.shape == source.shape and copy.dtype == dtype
    assert torch.equal(copy, source)
    assert copy.data_ptr() != source.data_ptr()
    assert copy.untyped_storage().nbytes() == source.untyped_storage().nbytes()  # no slack held
    converted = to_huge_pages(source, torch.float64)
    assert converted.dtype == torch.float64 and torch.equal(converted, source.double())


@needs_thp
def test_large_buffer_gets_whole_huge_pages_only() -> None:
    """A buffer of 8.5 huge pages (its own mapping) gets 8, on a 2 MiB boundary; the last half
    stays on small pages."""
    buffer = huge_page_empty(17 * HUGE_PAGE_BYTES // 2, torch.uint8)
    assert buffer.data_ptr() % HUGE_PAGE_BYTES == 0
    buffer.fill_(1)
    huge_kib = huge_kib_of_mapping(buffer.data_ptr())
    assert 0 < huge_kib <= 8 * HUGE_PAGE_BYTES // 1024, huge_kib
    assert int(buffer.sum()) == buffer.numel()


@needs_thp
def test_small_buffers_share_huge_pages_without_overlap() -> None:
    buffers = [huge_page_empty(50_001, torch.int16) for _ in range(30)]  # 100 KB each
    for i, buffer in enumerate(buffers):
        buffer.fill_(i)
    for i, buffer in enumerate(buffers):
        assert buffer.data_ptr() % 64 == 0
        assert buffer.untyped_storage().nbytes() == 100_002
        assert bool((buffer == i).all()), f"buffer {i} was overwritten"
    assert huge_kib_of_mapping(buffers[0].data_ptr()) > 0


@only_where_advised
def test_switched_off_uses_small_pages(monkeypatch) -> None:
    """With ``DUOGPT_HUGE_PAGES=0`` nothing is advised, so (where huge pages come only on
    advice) the buffer's mapping holds none."""
    monkeypatch.setenv("DUOGPT_HUGE_PAGES", "0")
    assert not huge_pages_enabled()
    plain = huge_page_empty(4 * HUGE_PAGE_BYTES, torch.uint8).fill_(1)
    assert huge_kib_of_mapping(plain.data_ptr()) == 0
    monkeypatch.setenv("DUOGPT_HUGE_PAGES", "1")
    advised = huge_page_empty(4 * HUGE_PAGE_BYTES, torch.uint8).fill_(1)
    assert huge_kib_of_mapping(advised.data_ptr()) > 0


@needs_thp
@pytest.mark.skipif(not cpu_kernel_available()[0], reason=cpu_kernel_available()[1])
def test_packed_weight_is_on_huge_pages_and_multiplies_right() -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(4096, 1024, generator=gen)
    weight *= torch.rand(4096, 1024, generator=gen) >= 0.5
    packed = pack_cpu_weight(weight)
    assert huge_kib_of_mapping(packed.data.data_ptr()) > 0
    x = torch.randn(2, 1024, generator=gen)
    ref = dual_sparse_linear_reference(x, unpack_cpu_weight(packed).float(), 0.5)
    torch.testing.assert_close(cpu_dual_sparse_linear(x, packed, 0.5), ref, rtol=1e-5, atol=1e-4)


def test_refused_advice_leaves_ordinary_memory(monkeypatch) -> None:
    """A kernel without transparent huge pages refuses the advice (EINVAL): still a buffer."""
    if not huge_pages_enabled():
        pytest.skip("huge pages are off here")
    monkeypatch.setattr(mmap, "MADV_HUGEPAGE", 0x7FFF)  # an advice no kernel knows
    source = torch.arange(3 * HUGE_PAGE_BYTES, dtype=torch.int32)
    assert torch.equal(to_huge_pages(source), source)
