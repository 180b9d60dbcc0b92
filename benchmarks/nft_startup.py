"""Start-up cost of the two ways to reach nf_tables: `nft -f -` versus libnftables in-process.

Each sample is one fresh interpreter (as one pod start is) that loads the same
transaction into a fresh, empty network namespace, made with `unshare --net`
around the interpreter so both sides pay the same. Run as root:

    .venv/bin/python benchmarks/nft_startup.py [TRANSACTION_FILE] [RUNS]

Rows: `nft -f -` (subprocess, stdin), `libnftables` (Debian's python3-nftables,
ctypes, imported from /usr/lib/python3/dist-packages), each alone and as an
apply uses them (read the ruleset as JSON, then load), and the bare
interpreter for reference. Interleaved, median and p90 in milliseconds.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

SEED = """add table inet istio-proxy-nat
add chain inet istio-proxy-nat output { type nat hook output priority -100 ; }
add chain inet istio-proxy-nat istio-output
add chain inet istio-proxy-nat istio-redirect
add rule inet istio-proxy-nat istio-redirect meta l4proto tcp counter redirect to :15001
add rule inet istio-proxy-nat output counter jump istio-output
add rule inet istio-proxy-nat istio-output ip daddr 127.0.0.1/32 counter return
add rule inet istio-proxy-nat istio-output counter jump istio-redirect
"""

SUBPROCESS = """
import subprocess, sys
text = open(sys.argv[1]).read()
done = subprocess.run(["nft", "-f", "-"], input=text, text=True, capture_output=True)
sys.exit(done.returncode)
"""

LIBRARY = """
import sys
sys.path.append("/usr/lib/python3/dist-packages")
from nftables import Nftables
text = open(sys.argv[1]).read()
nft = Nftables()
rc, out, err = nft.cmd(text)
sys.exit(rc)
"""

# What an apply does: read the live ruleset as JSON (for the rollback snapshot), load the transaction.
SUBPROCESS_RUN = """
import json, subprocess, sys
text = open(sys.argv[1]).read()
json.loads(subprocess.run(["nft", "-j", "list", "ruleset"], text=True, capture_output=True).stdout)
done = subprocess.run(["nft", "-f", "-"], input=text, text=True, capture_output=True)
sys.exit(done.returncode)
"""

LIBRARY_RUN = """
import json, os, sys
sys.path.append("/usr/lib/python3/dist-packages")
from nftables import Nftables
text = open(sys.argv[1]).read()
nft = Nftables()
nft.set_json_output(True)
json.loads(nft.cmd("list ruleset")[1])
nft.set_json_output(False)
fd = os.memfd_create("tx")
os.write(fd, text.encode())
rc, out, err = nft.cmd_from_file(f"/proc/self/fd/{fd}")
sys.exit(rc)
"""

BARE = "import sys; open(sys.argv[1]).read()"


def sample(code: str, path: str) -> float:
    start = time.perf_counter()
    subprocess.run(["unshare", "--net", sys.executable, "-c", code, path], check=True)
    return (time.perf_counter() - start) * 1000


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] else "/tmp/nft-startup-seed.nft"
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    if path == "/tmp/nft-startup-seed.nft":
        with open(path, "w") as out:
            out.write(SEED)
    rows = {"bare interpreter": BARE, "nft -f - (subprocess)": SUBPROCESS, "libnftables (ctypes)": LIBRARY,
            "read+load, nft": SUBPROCESS_RUN, "read+load, libnftables": LIBRARY_RUN}
    times: dict[str, list[float]] = {name: [] for name in rows}
    for name, code in rows.items():
        sample(code, path)  # warm the page cache
    for _ in range(runs):
        for name, code in rows.items():
            times[name].append(sample(code, path))
    print(f"{runs} interleaved runs, transaction {path}")
    for name, values in times.items():
        values.sort()
        p90 = values[int(len(values) * 0.9) - 1]
        print(f"  {name:28} median {statistics.median(values):7.1f} ms   p90 {p90:7.1f} ms")


if __name__ == "__main__":
    main()
