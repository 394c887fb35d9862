"""Ray-distributed calibration (``--workers``) on a local cluster of 2 CPU workers.

The single-process run is the oracle: same masks, weights and thresholds up to fp32 summation
order; a worker killed mid-run costs a retry of its block, not the result.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest
import torch
from test_pipeline import VOCAB, save_tiny

from vllm_duogpt import format as fmt
from vllm_duogpt.calibrate.config import CalibrationConfig, CalibrationError
from vllm_duogpt.calibrate.pipeline import calibrate

ray = pytest.importorskip("ray")

# Enough samples that the run lasts a while (the kill must land mid-run), few enough layers that
# fp32 rounding does not yet flip mask entries (it does on deep models; see the README).
NSAMPLES, SEQLEN, LAYERS = 16, 64, 3


def run(model_dir, out, **overrides):
    windows = torch.randint(
        0, VOCAB, (NSAMPLES, SEQLEN), generator=torch.Generator().manual_seed(5)
    )
    config = CalibrationConfig(model=str(model_dir), out=out, nsamples=NSAMPLES, seqlen=SEQLEN,
                               **overrides)  # fmt: skip
    return calibrate(config, windows)


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module (the pools join it instead of starting their own)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("ray") / "dense", layers=LAYERS, seed=3)


@pytest.fixture(scope="module")
def single_process(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "ckpt"
    run(model_dir, out, method="duogpt")
    return fmt.read_checkpoint(out)


def assert_same_checkpoint(got_dir, expected) -> None:
    want_state, want_thresholds, _ = expected
    state, thresholds, _ = fmt.read_checkpoint(got_dir)
    assert sorted(state) == sorted(want_state)
    assert sorted(thresholds) == sorted(want_thresholds)
    for name, tau in want_thresholds.items():
        assert thresholds[name] == pytest.approx(tau, rel=1e-4), name
    for key, want in want_state.items():
        got = state[key]
        if key.endswith("proj.weight"):
            assert torch.equal(got == 0, want == 0), f"{key}: masks differ"
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=key)


def worker_processes() -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any("CalibrationWorker" in part for part in process.info["cmdline"] or []):
            found.append(process)
    return found


def test_two_workers_give_the_single_process_checkpoint(
    cluster, model_dir, single_process, tmp_path
):
    report = run(model_dir, tmp_path / "ray", method="duogpt", workers=2)
    assert_same_checkpoint(tmp_path / "ray", single_process)
    assert len(report.worker_peak_bytes) == 2
    assert all(b > 0 for b in report.worker_peak_bytes)
    deadline = time.monotonic() + 30  # ray.kill is asynchronous
    while worker_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not worker_processes(), "the pool left its workers running"


def test_a_killed_worker_costs_a_retry_not_the_result(
    cluster, model_dir, single_process, tmp_path, caplog
):
    out = tmp_path / "survivor"
    state_file = tmp_path / "survivor.partial" / "state.json"
    outcome: dict[str, object] = {}

    def calibrate_in_background() -> None:
        try:
            outcome["report"] = run(model_dir, out, method="duogpt", workers=2)
        except Exception as err:  # reported by the assertions below
            outcome["error"] = err

    thread = threading.Thread(target=calibrate_in_background)
    thread.start()
    deadline = time.monotonic() + 300
    while not state_file.exists() and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    victims = worker_processes()
    assert state_file.exists() and len(victims) == 2, "block 0 never finished on 2 workers"
    victims[0].kill()
    thread.join(timeout=600)
    assert "error" not in outcome, outcome.get("error")
    assert out.exists() and not state_file.exists()
    assert "retrying the block on 1 worker(s)" in caplog.text
    assert_same_checkpoint(out, single_process)


def test_more_workers_than_samples_is_an_error(cluster, model_dir, tmp_path):
    with pytest.raises(CalibrationError, match="--workers"):
        run(model_dir, tmp_path / "x", workers=NSAMPLES + 1)
    assert not (tmp_path / "x").exists()


def test_one_worker_never_imports_ray(model_dir, tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, torch
        from vllm_duogpt.calibrate.config import CalibrationConfig
        from vllm_duogpt.calibrate.pipeline import calibrate
        config = CalibrationConfig(model={str(model_dir)!r}, out={str(tmp_path / "one")!r},
                                   nsamples={NSAMPLES}, seqlen={SEQLEN}, workers=1)
        calibrate(config, torch.randint(0, 128, ({NSAMPLES}, {SEQLEN})))
        print("ray imported" if "ray" in sys.modules else "no ray")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("no ray")


def test_workers_flag_is_validated():
    with pytest.raises(CalibrationError, match="--workers"):
        CalibrationConfig(model="m", out="o", workers=0)
