"""spawn.py, the small process runner behind every iptables tool run (no subprocess module on the hot path)."""

from __future__ import annotations

import os
import sys
import time

import pytest

from istio_init.backends.iptables import tools
from istio_init.backends.iptables.spawn import Running, ToolTimeout, run
from istio_init.errors import ApplyError

PY = sys.executable


def test_output_errors_and_exit_code() -> None:
    done = run([PY, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"], None, 30)
    assert done == (3, "out\n", "err\n")


def test_stdin_larger_than_a_pipe_and_both_outputs_large_do_not_block() -> None:
    text = "x" * 1_000_000 + "\n"
    code = ("import sys; data = sys.stdin.read(); sys.stderr.write('e' * 300000); "
            "sys.stdout.write(str(len(data)) + 'o' * 300000)")
    done = run([PY, "-c", code], text, 60)
    assert done.returncode == 0 and done.stdout == str(len(text)) + "o" * 300000 and len(done.stderr) == 300000


def test_no_stdin_reads_end_of_file_and_no_other_descriptor_is_inherited() -> None:
    keep = os.open(os.devnull, os.O_RDONLY)  # close-on-exec, as every descriptor Python opens
    try:
        code = "import os, sys; print(repr(sys.stdin.read()), sorted(int(f) for f in os.listdir('/proc/self/fd')))"
        done = run([PY, "-c", code], None, 30)
    finally:
        os.close(keep)
    stdin_read, fds = done.stdout.split(" ", 1)
    assert stdin_read == "''"
    assert keep > 3 and keep not in [int(f) for f in fds.strip("[]\n").split(", ")]  # 3: listdir's own


def test_missing_tool_is_file_not_found_and_an_apply_error_through_tools() -> None:
    with pytest.raises(FileNotFoundError):
        Running(["istio-init-no-such-tool"])
    with pytest.raises(ApplyError, match="not found"):
        tools.run_tool(["istio-init-no-such-tool"])


def test_a_tool_past_its_deadline_is_killed_and_reaped() -> None:
    start = time.monotonic()
    running = Running([PY, "-c", "import time; time.sleep(30)"])
    with pytest.raises(ToolTimeout):
        running.wait(0.5)
    assert time.monotonic() - start < 10
    with pytest.raises(ChildProcessError):
        os.waitpid(running.pid, os.WNOHANG)  # already reaped


def test_a_tool_that_closes_its_pipes_but_lingers_still_meets_the_deadline() -> None:
    running = Running([PY, "-c", "import os, time; os.close(1); os.close(2); time.sleep(30)"])
    with pytest.raises(ToolTimeout):
        running.wait(0.5)
