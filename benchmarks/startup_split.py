"""Where one istio-init run's time goes: interpreter start, importing istio-init, its own work, exit.

`scripts/bench` says how a whole run compares with its floor; this says what
the run is made of, to know which part a change must shrink. Each sample is
one process of the venv's interpreter running `main`, as the installed
command does, with clock readings (CLOCK_MONOTONIC, shared with this process)
at the script's first line, after `istio_init.entry` is imported, and when
`main` returns; the last part is the exit, until this process has reaped it.
A second series imports every istio_init module the same run imports (as
`-X importtime` lists them) before its first reading: its `main` is the run's
own work, and the difference between the two `main`s is what importing the
rest of istio-init costs. Applies go into a fresh pod-like namespace each
(`bench.Namespaces`). Run as root:

    .venv/bin/python benchmarks/startup_split.py [--python .venv-bench/bin/python] [-n RUNS] [--row ROW]

ROW is seed (the default), dry, 1000, 8000 or check. The two series are
interleaved; medians in milliseconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (the benchmark's namespaces and rows, next to this file)

# The sample: clock readings to stderr as `T start entry-imported main-returned`, then exit as the
# console script does (flush, os._exit). PRELOAD is replaced by the imports of the second series.
SAMPLE = """import time
t0 = time.monotonic_ns()
import os, sys
PRELOAD
from istio_init.entry import main
t1 = time.monotonic_ns()
try:
    main(sys.argv[1:])
except SystemExit:
    pass
t2 = time.monotonic_ns()
sys.stdout.flush()
sys.stderr.write(f"\\nT {t0} {t1} {t2}\\n")
sys.stderr.flush()
os._exit(0)
"""

PARTS = ("interpreter start", "importing istio_init.entry", "main", "exit")
ROWS = {"seed": bench.SEED, "dry": [*bench.SEED, "-n", "--ipv6", "false"], "1000": bench.cidr_args(1000),
        "8000": bench.cidr_args(8000), "check": ["check", *bench.SEED]}


def imported_modules(python: str, args: list[str], netns: str | None) -> list[str]:
    """The istio_init modules one run imports, in the order `-X importtime` finishes them."""
    command = [python, "-X", "importtime", "-c", SAMPLE.replace("PRELOAD", ""), *args]
    done = subprocess.run(bench.inside(netns, command) if netns else command, capture_output=True, text=True)
    names = [line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")]
    return [name for name in names if name.startswith("istio_init")]


def sample(python: str, code: str, args: list[str], netns: str | None) -> tuple[float, ...]:
    """One run: the four parts in milliseconds."""
    home = target = -1
    read_end, write_end = os.pipe()
    if netns is not None:
        home = os.open("/proc/self/ns/net", os.O_RDONLY)
        target = os.open(netns, os.O_RDONLY)
        bench._setns(target)
    try:
        started = time.monotonic_ns()
        pid = os.posix_spawn(python, [python, "-c", code, *args], os.environ,
                             file_actions=[(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                                           (os.POSIX_SPAWN_DUP2, write_end, 2)])
    finally:
        if netns is not None:
            bench._setns(home)
            os.close(home)
            os.close(target)
        os.close(write_end)
    err = b""
    while chunk := os.read(read_end, 65536):
        err += chunk
    os.close(read_end)
    os.waitpid(pid, 0)
    reaped = time.monotonic_ns()
    line = next((ln for ln in err.decode(errors="replace").splitlines() if ln.startswith("T ")), None)
    if line is None:
        raise RuntimeError(f"the run gave no clock readings: {err.decode(errors='replace')[-800:]}")
    first, imported, returned = map(int, line.split()[1:])
    return tuple((b - a) / 1e6 for a, b in ((started, first), (first, imported), (imported, returned),
                                             (returned, reaped)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=os.path.join(os.path.dirname(sys.executable), "python"),
                        help="the venv interpreter whose istio-init is measured")
    parser.add_argument("-n", type=int, default=25, help="runs per series")
    parser.add_argument("--row", choices=sorted(ROWS), default="seed")
    opts = parser.parse_args()
    if os.geteuid() != 0:
        print("startup_split: needs root (network namespaces)", file=sys.stderr)
        return 2
    args = ROWS[opts.row]
    applies = opts.row != "dry"
    lock_file = os.path.join("/tmp", f"istio-init-split-{os.getpid()}.lock")
    os.environ["ISTIO_INIT_LOCKFILE"] = lock_file  # as the benchmark: a private lock, removed at the end
    spaces = bench.Namespaces()
    series: dict[str, list[tuple[float, ...]]] = {"as installed": [], "istio_init imported first": []}
    try:
        def fresh() -> str | None:
            if not applies:
                return None
            ns = spaces.fresh()
            if opts.row == "check":  # a namespace in sync: the seed applied first
                subprocess.run(bench.inside(ns, [opts.python, "-c", SAMPLE.replace("PRELOAD", ""), *bench.SEED]),
                               capture_output=True, check=True)
            return ns

        modules = imported_modules(opts.python, args, fresh())
        spaces.remove_all()
        codes = {"as installed": SAMPLE.replace("PRELOAD", ""),
                 "istio_init imported first": SAMPLE.replace("PRELOAD", "import " + ", ".join(modules))}
        for _ in range(opts.n):
            for name, code in codes.items():
                series[name].append(sample(opts.python, code, args, fresh()))
                spaces.remove_all()
    finally:
        spaces.remove_all()
        if os.path.exists(lock_file):
            os.unlink(lock_file)
    print(f"{opts.row}: medians of {opts.n} runs, ms ({len(modules)} istio_init modules imported)")
    print(f"{'':28}" + "".join(f"{name:>28}" for name in series))
    for index, part in enumerate(PARTS):
        print(f"{part:28}" + "".join(f"{statistics.median(s[index] for s in runs):28.2f}" for runs in series.values()))
    totals = [statistics.median(sum(s) for s in runs) for runs in series.values()]
    print(f"{'total':28}" + "".join(f"{total:28.2f}" for total in totals))
    mains = [statistics.median(s[2] for s in runs) for runs in series.values()]
    imports = statistics.median(s[1] for s in series["as installed"]) + mains[0] - mains[1]
    print(f"importing istio-init: about {imports:.2f} ms; main with istio_init imported first (its own work, "
          f"and the kernel tools it waits for): {mains[1]:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
