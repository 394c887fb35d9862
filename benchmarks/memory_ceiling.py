"""The memory ceiling of a decode pass that skips runs at random, as one table.

Compiles ``memory_ceiling.c`` (needs a C compiler with OpenMP; ``CC`` or ``cc``) and runs it for
each chunk size, fraction of chunks read, thread count and page size (4 KiB, or 2 MiB transparent
huge pages as the CPU layout uses where it can): useful GB/s of a pure read of the chosen chunks,
in address order, with the CPU kernel's software prefetch (16 KiB ahead). The
dual-sparse decode kernel cannot beat this for the same pattern: at activation sparsity X, with
runs of R bytes (2048 rows: about 2.3 KB at 50% weight sparsity, 4.3 KB dense), compare the row
(R, 1 - X) with the row (R, 1.0).

Usage::

    python benchmarks/memory_ceiling.py
    python benchmarks/memory_ceiling.py --chunks 2304,4352 --fractions 1,0.5 --threads 1,2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("memory_ceiling.c")


def build(out_dir: Path) -> Path:
    """Compile the C program for this machine; returns the executable."""
    exe = out_dir / "memory_ceiling"
    cc = os.environ.get("CC", "cc")
    cmd = [cc, "-O2", "-march=native", "-fopenmp", str(SOURCE), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"compiling {SOURCE.name} failed ({' '.join(cmd)}):\n{proc.stderr}")
    return exe


def measure(
    exe: Path, chunk: int, fraction: float, ahead: int, threads: int, huge_pages: bool
) -> float:
    """Useful GB/s of one configuration (best of the program's 5 passes)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(
        [str(exe), str(chunk), str(fraction), str(ahead), str(int(huge_pages))],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(proc.stdout.strip())


def main() -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", default="1152,2304,4352,8704,17408", help="bytes, comma list")
    parser.add_argument("--fractions", default="1,0.5", help="fractions of chunks read")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--ahead", type=int, default=16384, help="prefetch distance in bytes")
    parser.add_argument("--pages", default="4k,huge", help="page sizes: 4k, huge or both")
    args = parser.parse_args()

    chunks = [int(v) for v in args.chunks.split(",")]
    fractions = [float(v) for v in args.fractions.split(",")]
    threads = [int(v) for v in args.threads.split(",")]
    pages = args.pages.split(",")
    if not set(pages) <= {"4k", "huge"}:
        parser.error(f"--pages takes 4k and/or huge, got {args.pages}")
    columns = [(t, p) for t in threads for p in pages]
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(Path(tmp))
        header = f"{'chunk B':>8} {'fraction':>8} " + " ".join(
            f"{f'{t} thr {p}':>11}" for t, p in columns
        )
        print(f"prefetch {args.ahead} B ahead; useful GB/s, best of 5 passes")
        print(header)
        print("-" * len(header))
        for chunk in chunks:
            for fraction in fractions:
                rates = [
                    measure(exe, chunk, fraction, args.ahead, t, p == "huge") for t, p in columns
                ]
                print(f"{chunk:>8} {fraction:>8.2f} " + " ".join(f"{r:>11.1f}" for r in rates))


if __name__ == "__main__":
    main()
