"""exit_process returns control to a caller reading our pipes, even with a live child process."""

from __future__ import annotations

import subprocess
import sys
import textwrap

CHILD_HOLDS_PIPES = textwrap.dedent(
    """
    import multiprocessing, time
    from vllm_duogpt.process_exit import exit_process

    def sleep_forever():
        time.sleep(3600)

    if __name__ == "__main__":
        child = multiprocessing.get_context("spawn").Process(target=sleep_forever)
        child.start()
        print("result written", flush=False)
        exit_process(3)
    """
)


def test_exit_process_stops_children_and_keeps_output(tmp_path):
    script = tmp_path / "holder.py"
    script.write_text(CHILD_HOLDS_PIPES)
    # Without stopping the child, communicate() would wait for the child's copy of the pipes.
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3
    assert proc.stdout == "result written\n"
