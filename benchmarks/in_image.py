"""The seed apply inside the init-container image, against the same floor in the same image.

Run by scripts/bench-image as the image's python3 (`docker run --entrypoint python3 ...`),
in a container with only NET_ADMIN and NET_RAW and no network but lo, as a pod's init
container gets. Each side alternates with the other; before each run the nat table is put
back to empty, so every apply starts from a fresh table as on a pod's first start. The floor
is the same interpreter importing click, plus iptables-legacy-restore --noflush of the same
rules (auto picks libiptc on legacy tables, which is what a pod without nft tables gets).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

SEED = ["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT",
        "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"]
EMPTY_NAT = "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n"


def timed(argv: list[str], stdin: bytes | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(argv, input=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def reset() -> None:
    subprocess.run(["iptables-legacy-restore"], input=EMPTY_NAT.encode(), check=True)


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    rules = subprocess.run(["istio-init", *SEED, "-n"], capture_output=True, check=True).stdout
    ours, floor = [], []
    for _ in range(runs):
        reset()
        ours.append(timed(["istio-init", *SEED]))
        reset()
        floor.append(timed([sys.executable, "-c", "import click"])
                     + timed(["iptables-legacy-restore", "--noflush"], stdin=rules))
    a, b = statistics.median(ours) * 1000, statistics.median(floor) * 1000
    print(json.dumps({"runs": runs, "istio_init_ms": round(a, 1), "floor_ms": round(b, 1),
                      "ratio": round(a / b, 2), "istio_init_min_ms": round(min(ours) * 1000, 1),
                      "floor_min_ms": round(min(floor) * 1000, 1)}))


if __name__ == "__main__":
    main()
