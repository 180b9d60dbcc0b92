"""Start-up benchmark: istio-init as a whole process against its floor, interleaved.

An init container delays every pod start, so what counts is the wall time of
the whole process, interpreter start included. Each row's floor is what no
Python init container can beat for the same result: the same interpreter
running `-c pass`, plus the kernel tools' own work for that result, run as
Istio's Go binary runs them:

- an apply: `<chosen tool>-restore --noflush` of the very same rules (both
  families' tools for an IPv6 pod), and for TPROXY the `ip rule` / `ip route`
  (and for IPv6 `ip -6 addr`) calls that make the same policy routing;
- a dry run: the interpreter alone;
- `check` of a namespace in sync: the interpreter plus one `iptables-save`.

Runs are interleaved (istio-init, floor, istio-init, floor, ...) so that
machine noise hits both sides alike, and every apply gets a fresh network
namespace shaped like a pod's (lo up, an `eth0` with a documentation
address). Peak RSS is read per process with wait4(), so it is istio-init's
own. A row passes when the ratio of the medians is within its target.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

SEED = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT",
        "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"]
TPROXY_MARK, TPROXY_TABLE = 1337, 133  # istio-init's (and Istio's) defaults


def cidr_args(count: int) -> list[str]:
    """The seed plus `count` -x host CIDRs (one ISTIO_OUTPUT rule each; 8,000 fill about one 128 KiB argument)."""
    cidrs = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/32" for i in range(1, count + 1)]
    return [*SEED[:-6], "-x", ",".join(cidrs), *SEED[-4:]]


def tproxy_args() -> list[str]:
    args = list(SEED)
    args[args.index("REDIRECT")] = "TPROXY"
    return args


@dataclass
class Stats:
    median_ms: float
    min_ms: float
    max_ms: float

    @classmethod
    def of(cls, samples: list[float]) -> "Stats":
        times = [t * 1000 for t in samples]
        return cls(round(statistics.median(times), 1), round(min(times), 1), round(max(times), 1))


@dataclass
class Row:
    name: str
    floor: str  # what the floor is, in words
    ours: Stats
    base: Stats
    target: float
    peak_rss_kib: int = 0
    floor_rss_kib: int = 0
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return round(self.ours.median_ms / self.base.median_ms, 2)

    @property
    def ok(self) -> bool:
        return self.ratio <= self.target


_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")


def timed(argv: list[str], stdin: bytes | None = None, netns: str | None = None) -> float:
    """Wall time of one command, from spawn to reaped exit; spawned inside `netns` when given.

    The benchmark enters the namespace itself around the spawn (setns), so
    that neither side pays an `nsenter` exec: istio-init and each of the
    floor's tools are timed as they run in a pod, started directly.
    """
    home = target = -1
    if netns is not None:
        home = os.open("/proc/self/ns/net", os.O_RDONLY)
        target = os.open(netns, os.O_RDONLY)
        _setns(target)
    try:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    finally:
        if netns is not None:
            _setns(home)
            os.close(home)
            os.close(target)
    _, err = proc.communicate(stdin)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[:6]}... failed ({proc.returncode}): {err.decode()[-500:]}")
    return elapsed


# The kernel carries a process's pre-exec peak RSS across exec, so a command
# spawned straight from this benchmark would report the benchmark's memory. A
# bare interpreter forks the command instead, and wait4() gives that
# grandchild's own peak, which starts from the small forker's size.
_PEAK_RSS = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss if os.waitstatus_to_exitcode(status) == 0 else -1)
"""


def peak_rss_kib(argv: list[str]) -> int:
    out = subprocess.run([sys.executable, "-I", "-S", "-c", _PEAK_RSS, *argv], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, check=True)
    rss = int(out.stdout.decode().split()[-1])
    if rss < 0:
        raise RuntimeError(f"{argv[:6]}... failed while measuring its memory")
    return rss


class Namespaces:
    """Fresh network namespaces shaped like a pod's, one per apply, all removed at the end."""

    def __init__(self) -> None:
        self.made: list[str] = []

    def fresh(self, ipv6: bool = False) -> str:
        """lo up and an `eth0` (one end of a veth pair) with 192.0.2.10/24, or 2001:db8::10/64 for an IPv6 pod."""
        name = f"iibench-{os.getpid()}-{len(self.made)}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.made.append(name)
        address = "2001:db8::10/64 dev eth0 nodad" if ipv6 else "192.0.2.10/24 dev eth0"
        script = (f"link set lo up\nlink add eth0 type veth peer name veth0\n"
                  f"address add {address}\nlink set eth0 up\n")
        subprocess.run(["ip", "-n", name, "-batch", "-"], input=script.encode(), check=True)
        return f"/run/netns/{name}"

    def remove_all(self) -> None:
        for name in self.made:
            subprocess.run(["ip", "netns", "delete", name], check=False)
        self.made.clear()


PYTHON = sys.executable  # the interpreter (venv) whose istio-init is timed; --python changes it


def istio_init_command() -> list[str]:
    found = shutil.which("istio-init", path=os.path.dirname(PYTHON))
    return [found] if found else [PYTHON, "-m", "istio_init"]


def inside(ns: str, argv: list[str]) -> list[str]:
    return ["nsenter", f"--net={ns}", *argv]


@dataclass
class Setup:
    """What one row's apply does, as learnt from one untimed run of istio-init in a pod-like namespace."""

    backend: str  # the iptables backend istio-init chose (auto resolved), or "nftables"
    texts: dict[int, bytes]  # family -> the restore text (nft: the transaction) of the same rules
    ip_calls: list[list[str]]  # the `ip` commands that make the same policy routing and addresses
    rules: int = 0  # how many rules the restore texts make


def learn(args: list[str], spaces: Namespaces, ipv6: bool) -> Setup:
    """Apply once, then read back the chosen backend, the rules per family and what `ip` would have to do."""
    ns = spaces.fresh(ipv6)
    done = subprocess.run(inside(ns, [*istio_init_command(), *args]), capture_output=True)
    if done.returncode != 0:
        raise RuntimeError(f"istio-init {' '.join(args)[:80]}... failed: {done.stderr.decode()[-800:]}")
    marker = b"iptables backend "
    line = next((ln for ln in done.stderr.splitlines() if marker in ln), b"")
    backend = line.split(marker, 1)[1].split()[0].decode() if line else "nftables"
    texts = {}
    rule_count = 0
    if backend == "nftables":
        texts[4] = subprocess.run([*istio_init_command(), *args, "-n"], capture_output=True, check=True).stdout
    else:
        for family, save in ((4, "iptables"), (6, "ip6tables")):
            flavour = "legacy" if backend in ("legacy", "libiptc") else "nft"
            text = subprocess.run(inside(ns, [f"{save}-{flavour}-save"]), capture_output=True, check=True).stdout
            if b"ISTIO_" in text:
                rule_count += text.count(b"\n-A ")
                texts[family] = address_lists(text)
    calls: list[list[str]] = []
    for family in (4, 6):
        rules = subprocess.run(inside(ns, ["ip", f"-{family}", "rule", "show", "fwmark", hex(TPROXY_MARK)]),
                               capture_output=True, check=True).stdout
        if rules.strip():
            calls.append(["ip", f"-{family}", "rule", "add", "fwmark", str(TPROXY_MARK), "lookup", str(TPROXY_TABLE)])
            calls.append(["ip", f"-{family}", "route", "add", "local", "default", "dev", "lo", "table",
                          str(TPROXY_TABLE)])
    lo6 = subprocess.run(inside(ns, ["ip", "-6", "address", "show", "dev", "lo"]), capture_output=True,
                         check=True).stdout
    if b"inet6 ::6/128" in lo6:
        calls.append(["ip", "-6", "address", "add", "::6/128", "dev", "lo"])
    spaces.remove_all()
    return Setup(backend, texts, calls, rule_count)


_ADDRESS_LIST_CHARS = 1000  # xtables refuses a parameter of 1,024 characters or more


def address_lists(text: bytes) -> bytes:
    """iptables-save text with each run of `-A CHAIN -d ADDRESS -j TARGET` lines as `-d A,B,...` lines.

    The restore tools expand such a list to one rule per address, in order,
    and parse it far faster than one line per rule; istio-init feeds them an
    -x list that way, so the floor does too: the same rules, the tool's
    cheapest input.
    """
    out: list[bytes] = []
    run: list[bytes] = []
    key: tuple[bytes, bytes] | None = None

    def flush() -> None:
        while run:
            taken, length = [], 0
            while run and (not taken or length + len(run[0]) + 1 <= _ADDRESS_LIST_CHARS):
                length += len(run[0]) + 1
                taken.append(run.pop(0))
            out.append(b"-A %s -d %s -j %s" % (key[0], b",".join(taken), key[1]))  # type: ignore[index]

    for line in text.splitlines():
        words = line.split()
        if len(words) == 6 and words[0] == b"-A" and words[2] == b"-d" and words[4] == b"-j":
            if key != (words[1], words[5]):
                flush()
                key = (words[1], words[5])
            run.append(words[3])
            continue
        flush()
        key = None
        out.append(line)
    flush()
    return b"\n".join(out) + b"\n"


def floor_apply(setup: Setup, ns: str) -> float:
    """The kernel tools' own work for the same result: restore each family's rules, then the `ip` calls."""
    total = timed([PYTHON, "-c", "pass"])
    for family, text in setup.texts.items():
        if setup.backend == "nftables":
            tool = ["nft", "-f", "-"]
        else:
            flavour = "legacy" if setup.backend in ("legacy", "libiptc") else "nft"
            tool = [f"{'ip6tables' if family == 6 else 'iptables'}-{flavour}-restore", "--noflush"]
        total += timed(tool, stdin=text, netns=ns)
    for call in setup.ip_calls:
        total += timed(call, netns=ns)
    return total


def bench_apply(name: str, args: list[str], runs: int, spaces: Namespaces, target: float,
                ipv6: bool = False) -> Row:
    """istio-init applying `args` into a fresh pod-like namespace, against the floor doing the same."""
    setup = learn(args, spaces, ipv6)
    command = [*istio_init_command(), *args]
    ours, base = [], []
    for _ in range(runs):
        ours.append(timed(command, netns=spaces.fresh(ipv6)))
        base.append(floor_apply(setup, spaces.fresh(ipv6)))
        spaces.remove_all()
    rss = peak_rss_kib(inside(spaces.fresh(ipv6), command))
    spaces.remove_all()
    tools = ("nft -f" if setup.backend == "nftables" else
             " + ".join(f"{'ip6tables' if f == 6 else 'iptables'}-{'nft' if setup.backend == 'nft' else 'legacy'}"
                        f"-restore" for f in setup.texts))
    calls = f" + {len(setup.ip_calls)} ip calls" if setup.ip_calls else ""
    return Row(name, f"pass + {tools}{calls}", Stats.of(ours), Stats.of(base), target, rss,
               peak_rss_kib([PYTHON, "-c", "pass"]),
               {"backend": setup.backend, "rules": setup.rules})


def bench_dry_run(name: str, args: list[str], runs: int, target: float) -> Row:
    """The dry run (no namespace needed) against the interpreter alone."""
    command = [*istio_init_command(), *args, "-n", "--ipv6", "false"]
    floor = [PYTHON, "-c", "pass"]
    ours, base = [], []
    for _ in range(runs):
        ours.append(timed(command))
        base.append(timed(floor))
    return Row(name, "pass", Stats.of(ours), Stats.of(base), target, peak_rss_kib(command), peak_rss_kib(floor))


def bench_check(name: str, args: list[str], runs: int, spaces: Namespaces, target: float) -> Row:
    """`istio-init check` of a namespace holding exactly the seed's rules, against pass + iptables-save."""
    ns = spaces.fresh()
    subprocess.run(inside(ns, [*istio_init_command(), *args]), capture_output=True, check=True)
    command = [*istio_init_command(), "check", *args]
    ours, base = [], []
    for _ in range(runs):
        ours.append(timed(command, netns=ns))
        base.append(timed([PYTHON, "-c", "pass"]) + timed(["iptables-legacy-save"], netns=ns))
    rss = peak_rss_kib(inside(ns, command))
    spaces.remove_all()
    return Row(name, "pass + iptables-legacy-save", Stats.of(ours), Stats.of(base), target, rss,
               peak_rss_kib([PYTHON, "-c", "pass"]))


RSS_TARGET_KIB = 20 * 1024  # the seed apply's peak RSS


class Skipped(Exception):
    """A row that cannot run on this machine; its message says why."""


def bench_run_pod_sandbox(name: str, runs: int, spaces: Namespaces) -> Row:
    """The CNI form's row: containerd's RunPodSandbox of a meshed pod with the agent chained, against
    the same node without it (benchmarks/bench_containerd.py); the RSS is the agent's."""
    from bench_containerd import run_pod_sandbox

    private_lock = os.environ.pop("ISTIO_INIT_LOCKFILE", None)  # the agent takes each pod's own lock, as on a node
    try:
        result = run_pod_sandbox(runs)
    finally:
        if private_lock is not None:
            os.environ["ISTIO_INIT_LOCKFILE"] = private_lock
    if isinstance(result, str):
        raise Skipped(result)
    chained, plain, agent_rss = result
    return Row(name, "the same containerd node without istio-init-cni", Stats.of(chained), Stats.of(plain), 1.3,
               agent_rss)

# name -> the row (title, runs, namespaces), with its target ratio (docs/performance.md). The default is every row, in order.
ROWS: dict[str, Callable[[str, int, Namespaces], Row]] = {
    "seed": lambda n, r, s: bench_apply(n, SEED, r, s, 1.5),
    "1000": lambda n, r, s: bench_apply(n, cidr_args(1000), r, s, 1.5),
    "tproxy": lambda n, r, s: bench_apply(n, tproxy_args(), r, s, 1.5),
    "ipv6": lambda n, r, s: bench_apply(n, SEED, r, s, 1.5, ipv6=True),
    "dry": lambda n, r, s: bench_dry_run(n, SEED, r, 1.3),
    "check": lambda n, r, s: bench_check(n, SEED, r, s, 1.5),
    "8000": lambda n, r, s: bench_apply(n, cidr_args(8000), r, s, 1.3),
    "sandbox": bench_run_pod_sandbox,
}
TITLES = {"seed": "seed apply", "1000": "1,000-CIDR apply", "tproxy": "seed TPROXY apply",
          "ipv6": "IPv6 seed apply", "dry": "seed dry run", "check": "check, in sync", "8000": "8,000-CIDR apply",
          "sandbox": "RunPodSandbox, CNI"}


def machine() -> dict[str, str]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), "")
    except OSError:
        pass
    python = subprocess.run([PYTHON, "-c", "import sys; print(sys.version.split()[0])"], capture_output=True,
                            text=True).stdout.strip()
    return {"cpu": f"{os.cpu_count()} x {cpu}", "kernel": platform.release(), "python": python,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--runs", type=int, default=15, help="runs per side and row (default 15)")
    parser.add_argument("--rows", default=",".join(ROWS),
                        help=f"rows to run, comma-separated (default all: {','.join(ROWS)})")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter of the venv whose istio-init is timed (and runs the floor)")
    opts = parser.parse_args(argv)
    global PYTHON
    PYTHON = os.path.abspath(opts.python)  # the runs happen in a temporary directory
    unknown = [r for r in opts.rows.split(",") if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown} (rows: {', '.join(ROWS)})")
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces)", file=sys.stderr)
        return 2
    os.chdir(tempfile.gettempdir())
    # A private istio-init lock: runs elsewhere on the machine (test suites) must not make these wait.
    lock_file = os.path.join(tempfile.gettempdir(), f"istio-init-bench-{os.getpid()}.lock")
    os.environ["ISTIO_INIT_LOCKFILE"] = lock_file
    load_before = os.getloadavg()
    spaces = Namespaces()
    rows: list[Row] = []
    try:
        for key in opts.rows.split(","):
            try:
                rows.append(ROWS[key](TITLES[key], opts.runs, spaces))
            except Skipped as why:
                print(f"... {TITLES[key]}: skipped: {why}", file=sys.stderr, flush=True)
                continue
            if not opts.json:
                print(f"... {TITLES[key]}: {rows[-1].ratio}x", file=sys.stderr, flush=True)
    finally:
        spaces.remove_all()
        if os.path.exists(lock_file):
            os.unlink(lock_file)
    load_after = os.getloadavg()
    seed = next((r for r in rows if r.name == TITLES["seed"]), None)
    rss_ok = seed is None or seed.peak_rss_kib <= RSS_TARGET_KIB
    facts = {**machine(), "runs": str(opts.runs),
             "load": f"{load_before[0]:.2f} before, {load_after[0]:.2f} after (1-minute average)"}
    if opts.json:
        print(json.dumps({"facts": facts, "rows": [dict(asdict(r), ratio=r.ratio, ok=r.ok) for r in rows],
                          "seed_peak_rss_ok": rss_ok}, indent=2))
    else:
        print(f"{'row':20} {'istio-init ms':>15} {'floor ms':>15} {'ratio':>6} {'target':>7} {'result':>6}  "
              f"{'RSS MiB':>7}  floor")
        print(f"{'':20} {'median (min)':>15} {'median (min)':>15}")
        for r in rows:
            print(f"{r.name:20} {r.ours.median_ms:>8} ({r.ours.min_ms:>4}) {r.base.median_ms:>8} ({r.base.min_ms:>4}) "
                  f"{r.ratio:>6} {r.target:>6}x {'pass' if r.ok else 'MISS':>6}  {r.peak_rss_kib / 1024:>7.1f}  {r.floor}")
        if seed is not None:
            print(f"{'seed peak RSS':20} {seed.peak_rss_kib / 1024:>8.1f} MiB (the interpreter alone: "
                  f"{seed.floor_rss_kib / 1024:.1f} MiB); target 20 MiB: {'pass' if rss_ok else 'MISS'}")
        print("ratio = median / median; pass when ratio <= target. " +
              "; ".join(f"{k}: {v}" for k, v in facts.items()))
    missed = [r for r in rows if not r.ok] or not rss_ok
    return 1 if (opts.check and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
