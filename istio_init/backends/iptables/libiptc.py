"""The libiptc backend: python-iptables, one in-memory transaction per table.

With autocommit off, libiptc edits a private copy of a table and `commit()`
swaps it into the kernel in one call, so each table changes atomically without
spawning a process per rule. python-iptables does not take the xtables lock,
so this backend takes it (as `iptables -w` does) around reading and committing.

Two python-iptables 1.2.0 quirks shape the code. Building a `REDIRECT` target
for one family makes the other family's `REDIRECT` unfindable in the same
process, so IPv6 is applied in a child forked before any target is built
(importing iptc is fine). And a plain `import iptc` is slow (see
_import_iptc), so it is imported the fast way, only by this module, only when
the backend is used, and while the snapshot's iptables-save runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import sys
from types import ModuleType
from typing import Any, Mapping

from istio_init import timing
from istio_init.backends.iptables.reconcile import TableChange
from istio_init.backends.iptables.tools import WAIT_SECONDS, ToolTables, command, save_text
from istio_init.errors import ApplyError
from istio_init.host import locks
from istio_init.model import INSERT, Rule, Step
from istio_init.iptables_save.write import rule_spec

XTABLES_LOCK = "/run/xtables.lock"
_XTABLES_LIBDIRS = ("/usr/lib/x86_64-linux-gnu/xtables", "/usr/lib/aarch64-linux-gnu/xtables",
                    "/usr/lib64/xtables", "/usr/lib/xtables", "/lib/xtables", "/usr/libexec/xtables")


def lock_path() -> str:
    return os.environ.get("XTABLES_LOCKFILE") or XTABLES_LOCK


def xtables_lock(timeout: float = WAIT_SECONDS) -> contextlib.AbstractContextManager[None]:
    """Hold the lock every iptables binary takes before changing tables."""
    return locks.held(lock_path(), timeout, "another process")


_LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu",
                 "/lib/aarch64-linux-gnu", "/usr/lib64", "/lib64", "/usr/lib", "/lib")
# The sonames of the libraries python-iptables asks for, as Debian's iptables 1.8 ships them.
_KNOWN_SONAMES = {"c": "libc.so.6", "xtables": "libxtables.so.12", "ip4tc": "libip4tc.so.2",
                  "ip6tc": "libip6tc.so.2"}


def _find_shared_library(name: str) -> str | None:
    """`ctypes.util.find_library` without its subprocesses.

    The stock version runs `ldconfig -p` (and gcc and ld when that fails) for
    each library python-iptables looks up, on every pod start (docs/performance.md, "What start-up avoids").
    Here a known soname is confirmed with a stat, anything else is looked for
    as lib<name>.so.N in the usual directories, and None lets python-iptables
    go on to its own fallbacks (its bundled libxtwrapper is found that way).
    """
    known = _KNOWN_SONAMES.get(name)
    if known and any(os.path.exists(os.path.join(d, known)) for d in _LIBRARY_DIRS):
        return known
    if name == "xtwrapper":  # python-iptables' own helper, installed beside it as an extension module
        import sysconfig

        bundled = f"libxtwrapper{sysconfig.get_config_var('EXT_SUFFIX')}"
        return next((os.path.join(d, bundled) for d in sys.path if os.path.isfile(os.path.join(d, bundled))), None)
    prefix = f"lib{name}.so."
    for directory in _LIBRARY_DIRS:
        found = [entry for entry in _listing(directory) if entry.startswith(prefix)]
        if found:
            return min(found, key=len)  # libfoo.so.12, the soname, rather than libfoo.so.12.7.0
    return None


@functools.lru_cache(maxsize=None)
def _listing(directory: str) -> tuple[str, ...]:
    """A library directory's entries, read once: python-iptables asks for several names in a row."""
    try:
        return tuple(os.listdir(directory))
    except OSError:
        return ()


def _import_iptc() -> ModuleType:
    """Import python-iptables without its slow start-up paths.

    A plain `import iptc` is slow (docs/performance.md, "What start-up avoids"): without XTABLES_LIBDIR it runs
    `ldconfig -N -v` to find the extension directory; `ctypes.util` itself
    imports tempfile, shutil and random, and its `find_library` spawns
    ldconfig, gcc and ld; and python-iptables' `distutils.sysconfig` import goes
    through setuptools' distutils shim, which imports most of setuptools. For
    the duration of the import only, the directory is set when known,
    `ctypes.util` is a stand-in whose `find_library` is `_find_shared_library`,
    and distutils is made unimportable, so python-iptables takes the
    `sysconfig` fallback it uses on Python 3.12 (where distutils is gone)
    instead of Python 3.11's deprecated distutils or setuptools' shim for it.
    Afterwards everything is as it was, so a later `import ctypes.util` gets
    the real module.
    """
    if "iptc" in sys.modules:
        return sys.modules["iptc"]
    for libdir in _XTABLES_LIBDIRS:
        if os.path.isdir(libdir):
            os.environ.setdefault("XTABLES_LIBDIR", libdir)
            break
    import warnings

    stand_in = ModuleType("ctypes.util")
    stand_in.find_library = _find_shared_library  # type: ignore[attr-defined]
    had_util = "ctypes.util" in sys.modules
    real_util = sys.modules.get("ctypes.util")
    hidden = [name for name in ("distutils", "distutils.sysconfig") if name not in sys.modules]
    shims = [finder for finder in sys.meta_path if type(finder).__module__ == "_distutils_hack"]
    try:
        for finder in shims:
            sys.meta_path.remove(finder)
        sys.modules["ctypes.util"] = stand_in
        ctypes.util = stand_in  # type: ignore[attr-defined]
        for name in hidden:
            sys.modules[name] = None  # type: ignore[assignment]  # `import` raises ModuleNotFoundError
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import iptc  # type: ignore[import-untyped]
    except Exception as exc:  # python-iptables raises plain Exceptions when libraries are missing
        raise ApplyError(f"--iptables-backend libiptc: python-iptables cannot load libiptc: {exc}") from None
    finally:
        for name in hidden:
            sys.modules.pop(name, None)
        if had_util:
            sys.modules["ctypes.util"] = real_util  # type: ignore[assignment]
            ctypes.util = real_util  # type: ignore[attr-defined]
        else:
            sys.modules.pop("ctypes.util", None)
            if getattr(ctypes, "util", None) is stand_in:
                del ctypes.util  # type: ignore[attr-defined]
        sys.meta_path[:0] = shims
    module: ModuleType = iptc
    return module


def _import_iptc_timed() -> None:
    timing.mark("start iptables-save")
    _import_iptc()
    timing.mark("import python-iptables (while iptables-save runs)")


class _Family:
    """One family's iptc classes and the libiptc calls python-iptables does not wrap."""

    def __init__(self, iptc: ModuleType, family: int) -> None:
        self.iptc = iptc
        self.family = family
        if family == 6:
            self.table_class, self.rule_class = iptc.Table6, iptc.Rule6
            self._delete_num = iptc.ip6tc._libiptc.ip6tc_delete_num_entry
            entry_type = iptc.ip6tc.ip6t_entry
        else:
            self.table_class, self.rule_class = iptc.Table, iptc.Rule
            self._delete_num = iptc.ip4tc._libiptc.iptc_delete_num_entry
            entry_type = iptc.ip4tc.ipt_entry
        self._delete_num.restype = ctypes.c_int
        # The entry starts with the addresses part (struct ipt_ip / ip6t_ip6): addresses, masks,
        # interfaces, protocol and their inversion flags; the matches and target follow it.
        name, header = entry_type._fields_[0]
        assert getattr(entry_type, name).offset == 0
        self._header_size = ctypes.sizeof(header)
        # Rule shape (addresses replaced by "*") -> the python-iptables rule and its entry bytes.
        self._built: dict[Rule, tuple[Any, Any]] = {}

    def delete_number(self, table: Any, chain: str, number: int) -> None:
        """Delete rule `number` (1-based) of `chain`, as `iptables -D CHAIN N`."""
        if self._delete_num(chain.encode(), ctypes.c_uint(number - 1), table._handle) != 1:
            raise self.iptc.IPTCError(table.strerror())

    def add(self, table: Any, step: Step) -> None:
        """Add the step's rule to the table's uncommitted copy.

        The first rule of each shape goes through python-iptables (matches
        and target built and checked). Rules that differ from it only in their
        addresses (thousands of `-d CIDR -j RETURN`) re-use its entry bytes:
        the addresses are set on the built rule and its header copied into
        the entry, which libiptc copies when it is added. Building matches and
        targets was most of python-iptables' cost per rule.
        """
        rule = step.rule
        shape = rule._replace(source=rule.source and "*", destination=rule.destination and "*")
        cached = self._built.get(shape)
        if cached is None:
            built = self._new(rule)
            chain = self.iptc.Chain(table, rule.chain)
            if step.op == INSERT:
                chain.insert_rule(built, step.position - 1)
            else:
                chain.append_rule(built)
            self._built[shape] = (built, built.rule)
            return
        built, entry = cached
        if rule.source:
            built.src = rule.source
        if rule.destination:
            built.dst = ("!" if rule.negate_destination else "") + rule.destination
        ctypes.memmove(entry, ctypes.addressof(built.entry), self._header_size)
        if step.op == INSERT:
            table.insert_entry(rule.chain, entry, step.position - 1)
        else:
            table.append_entry(rule.chain, entry)

    def _new(self, rule: Rule) -> Any:
        built = self.rule_class()
        if rule.protocol:
            built.protocol = rule.protocol
        if rule.source:
            built.src = rule.source
        if rule.destination:
            built.dst = ("!" if rule.negate_destination else "") + rule.destination
        if rule.in_interface:
            built.in_interface = rule.in_interface
        if rule.out_interface:
            built.out_interface = rule.out_interface
        for match in rule.matches:
            made = built.create_match(match.module)
            for opt in match.options:
                made.set_parameter(opt.name, ("!" if opt.negated else "") + opt.value)
        target = built.create_target(rule.target)
        if rule.target == "NFLOG":
            _set_nflog(target, {opt.name: opt.value for opt in rule.target_options})
            return built
        for opt in rule.target_options:
            target.set_parameter(opt.name, opt.value)
        return built

    def apply_table(self, change: TableChange) -> None:
        chain, spec = "-", "(opening the table)"
        step: Step | None = None
        table = None
        try:
            table = self.table_class(change.table, autocommit=False)
            table.refresh()  # the cached handle may predate the lock
            spec = "(chain operations)"
            for chain, number in change.delete_rules:
                spec = f"-D {chain} {number}"
                self.delete_number(table, chain, number)
            for chain in change.flush_chains:
                spec = f"-F {chain}"
                table.flush_entries(chain)
            for chain in change.create_chains:
                spec = f"-N {chain}"
                table.create_chain(chain)
            for chain in change.delete_chains:
                spec = f"-F {chain}"
                table.flush_entries(chain)
            for chain in change.delete_chains:
                spec = f"-X {chain}"
                table.delete_chain(chain)
            for step in change.steps:
                chain, spec = step.rule.chain, ""  # spelled only for an error message: see below
                self.add(table, step)
            step, chain, spec = None, "-", "COMMIT"
            table.commit()
        except Exception as exc:  # IPTCError, XTablesError, ValueError from python-iptables
            if not spec and step is not None:
                where = f"-I {chain} {step.position}" if step.op == INSERT else f"-A {chain}"
                spec = f"{where} {rule_spec(step.rule)}"
            if table is not None:
                with contextlib.suppress(Exception):
                    table.refresh()  # drop the uncommitted copy
            raise ApplyError(f"libiptc {command(self.family)}: table {change.table}, chain {chain}, rule `{spec}`: "
                             f"{exc or type(exc).__name__}") from None


# struct xt_entry_target (u16 size, char name[29], u8 revision) is followed by xt_nflog_info:
# u32 len, u16 group, u16 threshold, u16 flags, u16 pad, char prefix[64].
_TARGET_HEADER = 32
_NFLOG_F_COPY_LEN = 1


def _set_nflog(target: Any, options: Mapping[str, str]) -> None:
    """NFLOG's options written into its struct, never parsed by python-iptables.

    Its parse of --nflog-prefix corrupts the heap (the process crashes at a
    later, unrelated allocation), and its final check saves the target and
    parses every option again; so the fields are set here and the check,
    whose only test is the prefix's length (the planner's short ASCII
    names), is skipped. The values are the planner's own.
    """
    data = ctypes.addressof(target.target) + _TARGET_HEADER
    if "nflog-size" in options:
        ctypes.c_uint32.from_address(data).value = int(options["nflog-size"])
        ctypes.c_uint16.from_address(data + 8).value |= _NFLOG_F_COPY_LEN
    if "nflog-group" in options:
        ctypes.c_uint16.from_address(data + 4).value = int(options["nflog-group"])
    prefix = options.get("nflog-prefix", "").encode()[:63] + b"\0"
    ctypes.memmove(data + 12, prefix, len(prefix))
    object.__setattr__(target, "final_check", lambda: None)


class LibiptcTables(ToolTables):
    """The legacy (x_tables) kernel tables, changed through python-iptables (read and put back with the
    legacy tools)."""

    def __init__(self) -> None:
        super().__init__("libiptc", "legacy")

    def session(self) -> contextlib.AbstractContextManager[None]:
        return xtables_lock()

    def snapshot(self, family: int) -> str:
        return save_text(self.tools, family, meanwhile=_import_iptc_timed)

    def commit_family(self, family: int, changes: list[TableChange]) -> None:
        fam = _Family(_import_iptc(), family)
        for change in changes:
            fam.apply_table(change)

    def commit(self, changes: Mapping[int, list[TableChange]]) -> None:
        """Both families' changes (IPv6 in a forked child)."""
        todo = dict(changes)
        # Both families to change: IPv6 in a child forked before any target is built.
        child = self._fork_family(6, todo.pop(6)) if 4 in todo and 6 in todo else None
        error: BaseException | None = None
        try:
            for family, family_changes in todo.items():
                self.commit_family(family, family_changes)
        except BaseException as exc:  # the child must be waited for whatever happened here
            error = exc
        finally:
            child_error = _wait_child(*child) if child else None
        if error or child_error:
            raise error or child_error  # type: ignore[misc]

    def _fork_family(self, family: int, changes: list[TableChange]) -> tuple[int, int]:
        """Apply one family in a child process; returns (pid, read end of its error pipe)."""
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(read_end)
                self.commit_family(family, changes)
                code = 0
            except BaseException as exc:  # everything must reach the parent as a message
                os.write(write_end, (str(exc) or type(exc).__name__).encode()[:4000])
            finally:
                os._exit(code)
        os.close(write_end)
        return pid, read_end


def _wait_child(pid: int, read_end: int) -> ApplyError | None:
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode(errors="replace")
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except OSError as exc:
            if exc.errno != errno.EINTR:
                raise
    if os.waitstatus_to_exitcode(status) == 0:
        return None
    return ApplyError(message or f"libiptc ip6tables: the IPv6 process failed (status {status})")
