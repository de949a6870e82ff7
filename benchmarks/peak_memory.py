"""Run a command and sample the summed RSS of every process on the machine beside it.

    python benchmarks/peak_memory.py --out run.tsv -- dglmm fit prep/ --formula ... --workers 2

Every ``--interval`` seconds one line ``seconds  summed_rss_gb`` goes to ``--out``; the
command's own output lines go there too, prefixed with their time (so a phase can be read
off beside the memory).  At the end the peak, its time, the wall time and the baseline (the
RSS summed before the command started) are printed.  The issue-14 figure is the peak minus
nothing: everything on the machine counts, the baseline is printed so that it can be judged.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time

import psutil


def summed_rss() -> int:
    total = 0
    for proc in psutil.process_iter(["memory_info"]):
        info = proc.info.get("memory_info")
        if info is not None:
            total += info.rss
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    baseline = summed_rss()
    t0 = time.perf_counter()
    peak = [baseline, 0.0]
    lines: list[str] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss = summed_rss()
            t = time.perf_counter() - t0
            if rss > peak[0]:
                peak[0], peak[1] = rss, t
            lines.append(f"{t:9.2f}\t{rss / 1e9:7.3f}")
            done.wait(args.interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        t = time.perf_counter() - t0
        lines.append(f"{t:9.2f}\t#\t{line.rstrip()}")
        sys.stdout.write(line)
    rc = proc.wait()
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"exit {rc}; wall {wall:.1f} s; peak summed RSS {peak[0] / 1e9:.2f} GB at "
          f"{peak[1]:.1f} s; baseline {baseline / 1e9:.2f} GB")  # fmt: skip
    return rc


if __name__ == "__main__":
    sys.exit(main())
