"""Time the Dask loading path: ``dglmm.dask_driver.make_evaluator`` (read, learn the spec,
shuffle by group, build and persist the blocks) on 2 single-threaded workers of the embedded
cluster (threads, or processes with ``--local-processes``).

    python benchmarks/bench_load.py /tmp/bench/calls1m /tmp/bench/calls1m_prep --repeats 5

Reports, per data path, the median and all wall times of ``make_evaluator`` (cluster
start-up excluded), the rows and bytes of the blocks, and the peak RSS of each worker
process and of the client during the last repeat (the workers' peaks are reset before each
repeat through ``/proc/self/clear_refs``; where that is not writable the peak since start).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

FORMULA = ("dropped ~ duration + night + international + tenure + C(plan) + duration:tenure"
           " + (1 + duration | subscriber)")


def _rss() -> tuple[int, int]:
    """(current RSS, peak RSS) in bytes of this process, from /proc/self/status."""
    cur = peak = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return cur, peak


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--formula", default=FORMULA)
    ap.add_argument("--family", default="binomial")
    ap.add_argument("--profile", action="store_true", help="print the workers' profile")
    ap.add_argument("--local-processes", action="store_true",
                    help="worker processes (default: the embedded cluster's worker threads)")
    args = ap.parse_args()

    from dglmm.dask_driver import connect, make_evaluator
    from dglmm.evaluator import kernel_model
    from dglmm.families import get_family

    logging.getLogger("distributed.shuffle._scheduler_plugin").setLevel(logging.ERROR)
    fam = get_family(args.family, None)
    with connect(n_workers=args.workers, processes=args.local_processes) as handle:
        client = handle.client
        client.wait_for_workers(args.workers)
        for path in args.paths:
            times = []
            for _r in range(args.repeats):
                client.run(_trim)
                client.run(_reset_peak)
                _reset_peak()
                base = client.run(_rss)
                t0 = time.perf_counter()
                ev, spec = make_evaluator(handle, path, args.formula, fam, 1,
                                          kernel_model=kernel_model)  # fmt: skip
                dt = time.perf_counter() - t0
                times.append(dt)
                peaks = client.run(_rss)
                n_obs, nbytes = ev.n_obs, ev.block_nbytes
                ev.close()
                del ev
            print(f"{path}: median {statistics.median(times):.3f} s  "
                  f"(runs {', '.join(f'{t:.3f}' for t in times)})")
            print(f"  rows {n_obs}, blocks {nbytes / 1e6:.1f} MB "
                  f"({nbytes / max(n_obs, 1):.0f} B/row)")
            for w in sorted(peaks):
                b_cur = base[w][0]
                cur, peak = peaks[w]
                print(f"  worker {w}: RSS before {b_cur / 1e6:.0f} MB, peak {peak / 1e6:.0f} MB "
                      f"(+{(peak - b_cur) / 1e6:.0f} MB), after {cur / 1e6:.0f} MB")
            print(f"  client peak RSS {_rss()[1] / 1e6:.0f} MB")
        if args.profile:
            prof = client.profile()
            _print_profile(prof)


def _print_profile(prof: dict, depth: int = 0, limit: int = 18, total: int | None = None):
    total = total or prof.get("count", 1)
    if depth > limit:
        return
    for child in sorted(prof.get("children", {}).values(), key=lambda c: -c["count"]):
        share = child["count"] / total
        if share < 0.02:
            continue
        ident = child.get("identifier", child.get("description", {}))
        desc = child.get("description", {})
        name = f"{desc.get('name', '?')} {os.path.basename(str(desc.get('filename', '')))}:" \
               f"{desc.get('line_number', '')}" if isinstance(desc, dict) else str(ident)
        print(f"{'  ' * depth}{share:5.1%} {name}")
        _print_profile(child, depth + 1, limit, total)


if __name__ == "__main__":
    main()
