"""spawn.py, the small process runner behind every iptables tool run (no subprocess module on the hot path)."""

from __future__ import annotations

import os
import sys
import time

import pytest

from istio_init.backends.iptables import tools
from istio_init.backends.iptables.spawn import LATER, Running, ToolTimeout, run
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


def test_input_given_later_is_read_whole_while_large_output_is_drained() -> None:
    """stdin=LATER: the tool starts first; feed writes 1 MB while the tool writes 300 KB before reading."""
    code = ("import sys; sys.stderr.write('e' * 300000); sys.stderr.flush(); data = sys.stdin.read(); "
            "sys.stdout.write(str(len(data)))")
    running = Running([PY, "-c", code], LATER)
    text = "x" * 1_000_000
    running.feed(text, 60)
    done = running.wait(60)
    assert done == (0, str(len(text)), "e" * 300000)


def test_a_tool_started_for_input_and_never_fed_reads_end_of_file() -> None:
    running = Running([PY, "-c", "import sys; print(repr(sys.stdin.read()))"], LATER)
    assert running.wait(30) == (0, "''\n", "")


def test_feeding_a_tool_that_already_exited_leaves_its_end_to_wait() -> None:
    running = Running([PY, "-c", "import sys; sys.exit(4)"], LATER)
    time.sleep(0.3)
    running.feed("x" * 1_000_000, 30)
    assert running.wait(30).returncode == 4


def test_a_tool_that_never_reads_its_input_is_killed_at_the_feed_deadline() -> None:
    running = Running([PY, "-c", "import time; time.sleep(30)"], LATER)
    start = time.monotonic()
    with pytest.raises(ToolTimeout):
        running.feed("x" * 1_000_000, 0.5)
    assert time.monotonic() - start < 10
    with pytest.raises(ChildProcessError):
        os.waitpid(running.pid, os.WNOHANG)  # already reaped


@pytest.mark.root
def test_restore_tools_started_early_commit_and_the_unused_one_ends(netns) -> None:
    """RestoreTables.start: the IPv4 tool commits what it is fed later; the IPv6 one, fed nothing, exits and is reaped."""
    code = """
import os
from istio_init.backends.iptables.reconcile import TableChange
from istio_init.backends.iptables.restore import RestoreTables
from istio_init.model import APPEND, Rule, Step
tables = RestoreTables("legacy")
tables.start([4, 6])
pids = [r.pid for r in tables.started.values()]
step = Step(APPEND, Rule("nat", "ISTIO_OUTPUT", "RETURN", destination="192.0.2.1/32"))
tables.commit({4: [TableChange("nat", (), (), ("ISTIO_OUTPUT",), (), (step,))]})
tables.stop()
for pid in pids:
    try:
        os.waitpid(pid, os.WNOHANG)
        raise SystemExit(f"{pid} not reaped")
    except ChildProcessError:
        pass
print(tables.started)
"""
    done = netns.run(sys.executable, "-c", code, env=dict(os.environ))
    assert done.stdout.strip() == "{}", done.stderr
    assert "-A ISTIO_OUTPUT -d 192.0.2.1/32 -j RETURN" in netns.save("iptables-legacy-save")
    assert "ISTIO_OUTPUT" not in netns.save("ip6tables-legacy-save")
