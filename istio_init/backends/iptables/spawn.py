"""Running one iptables tool: spawn, feed stdin, collect stdout and stderr, with a deadline.

Every apply runs `iptables-save` (and the restore backends `iptables-restore`),
and the `subprocess` module is slow to import (docs/performance.md, "What start-up avoids") (it brings locale,
threading, selectors and signal). What the tools need is small: posix_spawn
with stdout and stderr on pipes, stdin from an in-memory file (so a large
restore text never blocks against an unread pipe), both pipes drained with
poll until the deadline, and the exit status. Like subprocess, the child gets
only descriptors 0-2 (Python opens every other descriptor close-on-exec),
and a child still running at the deadline is killed and reaped.
"""

from __future__ import annotations

import os
import select
import time

from istio_init.records import NamedTuple

# The tools' text is bytes: a rule someone else made (or an old python-iptables
# cut) can hold an interface name that is not UTF-8. Carried as lone surrogates,
# such a rule is read, compared and written back byte for byte instead of
# failing every later run with UnicodeDecodeError.
TOOL_TEXT_ERRORS = "surrogateescape"


class Finished(NamedTuple):
    """A finished tool, as subprocess.CompletedProcess spells the parts istio-init reads."""

    returncode: int  # negative: killed by that signal
    stdout: str
    stderr: str


_PIPE_CHUNK = 65536
LATER = "\0later"  # Running's stdin: a pipe, written with Running.feed (no tool input holds a NUL)


class ToolTimeout(Exception):
    """The tool was still running at the deadline (it has been killed)."""


class Running:
    """A started tool; `wait` collects it. Raises FileNotFoundError when argv[0] is not on PATH.

    With `stdin=LATER` the tool starts reading a pipe that `feed` fills once the
    input is known: a restore tool then loads (exec, libraries, extensions) while
    the caller still decides what to write. Until its first table line it holds
    no lock and touches no table; fed nothing, it reads end of file and exits.
    """

    def __init__(self, argv: list[str], stdin: str | None = None) -> None:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        self._feed = -1
        if stdin is None:
            in_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        elif stdin is LATER:
            in_fd, self._feed = os.pipe()
        else:
            in_fd = os.memfd_create("istio-init-stdin", os.MFD_CLOEXEC)
            data = memoryview(stdin.encode(errors=TOOL_TEXT_ERRORS))
            while data:
                data = data[os.write(in_fd, data):]
            os.lseek(in_fd, 0, os.SEEK_SET)
        actions = [(os.POSIX_SPAWN_DUP2, in_fd, 0), (os.POSIX_SPAWN_DUP2, out_w, 1),
                   (os.POSIX_SPAWN_DUP2, err_w, 2)]
        try:
            self.pid = os.posix_spawnp(argv[0], argv, os.environ, file_actions=actions)
        except BaseException:
            os.close(out_r)
            os.close(err_r)
            if self._feed >= 0:
                os.close(self._feed)
            raise
        finally:
            for fd in (in_fd, out_w, err_w):
                os.close(fd)
        self._fds = {out_r: bytearray(), err_r: bytearray()}
        self._out, self._err = out_r, err_r

    def feed(self, text: str, timeout: float) -> None:
        """Write the tool's whole input (`stdin=LATER`) and close it. A tool that already exited
        has read all it will: `wait` then says how it ended.

        Its output is drained meanwhile, so a tool that writes much before reading all
        its input never blocks against us. ToolTimeout (the tool killed) past `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        data = memoryview(text.encode(errors=TOOL_TEXT_ERRORS))
        try:
            os.set_blocking(self._feed, False)
            poller = select.poll()
            poller.register(self._feed, select.POLLOUT)
            for fd in self._fds:
                poller.register(fd, select.POLLIN)
            while data:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._close_feed()
                    self._kill()
                    for fd in self._fds:
                        os.close(fd)
                    raise ToolTimeout()
                for fd, event in poller.poll(left * 1000):
                    if fd == self._feed:
                        if event & (select.POLLERR | select.POLLHUP):
                            return  # the tool is gone
                        try:
                            data = data[os.write(fd, data[:_PIPE_CHUNK]):]
                        except BlockingIOError:
                            pass
                        continue
                    chunk = os.read(fd, 65536)
                    if chunk:
                        self._fds[fd] += chunk
                    else:
                        poller.unregister(fd)
        except BrokenPipeError:
            pass
        finally:
            self._close_feed()

    def _close_feed(self) -> None:
        if self._feed >= 0:
            os.close(self._feed)
            self._feed = -1

    def wait(self, timeout: float) -> Finished:
        """Drain both pipes and reap the tool; ToolTimeout (after killing it) past `timeout` seconds.

        A tool started with `stdin=LATER` and never fed reads end of file now.
        """
        self._close_feed()
        deadline = time.monotonic() + timeout
        poller = select.poll()
        for fd in self._fds:
            poller.register(fd, select.POLLIN)
        waiting = set(self._fds)
        # Readable once the tool has exited, so a tool that closed its pipes but lingers still
        # meets the deadline (Linux 5.3 and later; before that the final wait blocks).
        exited = os.pidfd_open(self.pid) if hasattr(os, "pidfd_open") else -1
        if exited >= 0:
            poller.register(exited, select.POLLIN)
            waiting.add(exited)
        try:
            while waiting:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._kill()
                    raise ToolTimeout()
                for fd, _ in poller.poll(left * 1000):
                    chunk = os.read(fd, 65536) if fd != exited else b""
                    if chunk:
                        self._fds[fd] += chunk
                    else:
                        poller.unregister(fd)
                        waiting.discard(fd)
        finally:
            for fd in (*self._fds, *([exited] if exited >= 0 else [])):
                os.close(fd)
        _, status = os.waitpid(self.pid, 0)
        return Finished(os.waitstatus_to_exitcode(status), self._fds[self._out].decode(errors=TOOL_TEXT_ERRORS),
                        self._fds[self._err].decode(errors=TOOL_TEXT_ERRORS))

    def _kill(self) -> None:
        import signal

        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)


def run(argv: list[str], stdin: str | None, timeout: float) -> Finished:
    """Run a tool to completion (FileNotFoundError, ToolTimeout as above)."""
    return Running(argv, stdin).wait(timeout)
