"""istio-init's record types: `typing.NamedTuple`'s class syntax without importing typing.

Every data type here (Config, FlagSpec, Rule, RulePlan, ...) is a typed
NamedTuple. Importing `typing` pulls in `re`, `enum`, `functools` and
`collections`, a large part of what istio-init adds to the interpreter's own
start on a dry run (docs/performance.md, "What start-up avoids").
So modules take `NamedTuple` (and `TYPE_CHECKING`, and for a generic record
`Generic` and `TypeVar`) from here: mypy sees
typing's own (the `if TYPE_CHECKING` branch), and at run time `NamedTuple`
builds the same kind of class: a tuple subclass with one C field accessor per
field, defaults, `_fields`, `_field_defaults`, `_replace`, `_asdict`, `_make`,
a `Name(field=value, ...)` repr, and the class body's methods and docstring.
A field's default may be a `Declared`: the default plus what else the field's
one statement says (config.py declares each Config field with its flag row).
tests/test_records.py holds it to collections.namedtuple's behaviour.
"""

from __future__ import annotations

TYPE_CHECKING = False
MAX_PRECOMPILED = 24  # records_new.py holds the constructors of 0 to this many fields
# and of these wider ones: Config's, built on every start (tests/test_records.py guards its arity).
WIDE_PRECOMPILED = (41,)


def precompiled_arities() -> tuple[int, ...]:
    """The arities whose constructors records_new.py holds, in its order."""
    return (*range(MAX_PRECOMPILED + 1), *WIDE_PRECOMPILED)


def constructor_source(arity: int) -> str:
    """The source of the constructor of records with `arity` fields (records_new.py is these, precompiled_arities())."""
    arguments = ", ".join(f"_{i}" for i in range(arity))
    return (f"def new_{arity}(_cls{', ' if arity else ''}{arguments}):\n"
            f"    return _tuple_new(_cls, ({arguments}{',' if arity == 1 else ''}))\n")


class Declared:
    """A field's default with the rest of its declaration: `describe(field name)` (a flag row, in config.py).

    A record class keeps `default` as the field's default and what `describe`
    returns for it, for `declarations(cls)`: so the field and what else is
    said about it are one statement in the class body.
    """

    __slots__ = ("default", "describe")

    def __init__(self, default: object, describe: Callable[[str], object]) -> None:
        self.default = default
        self.describe = describe


def declarations(record: type) -> dict[str, object]:
    """Field name -> what its `Declared` default described, in field order ({} for a record without any)."""
    found: dict[str, object] = record.__dict__.get("_declarations", {})
    return found


if TYPE_CHECKING:
    from typing import Callable
    from typing import Generic as Generic
    from typing import NamedTuple as NamedTuple
    from typing import TypeVar as TypeVar
else:
    from _collections import _tuplegetter  # the C accessor collections.namedtuple uses too

    _RESERVED = frozenset({"__new__", "__init__", "__slots__", "__getnewargs__", "_fields", "_field_defaults",
                           "_make", "_replace", "_asdict", "_declarations"})

    def _repr(self):
        return f"{type(self).__name__}({', '.join(f'{n}={v!r}' for n, v in zip(self._fields, self))})"

    def _replace(self, **changes):
        fields = self._fields
        result = tuple.__new__(type(self), [changes.pop(n, v) for n, v in zip(fields, self)])
        if changes:
            raise ValueError(f"Got unexpected field names: {list(changes)!r}")
        return result

    def _asdict(self):
        return dict(zip(self._fields, self))

    def _getnewargs(self):
        return tuple(self)

    def _make_from(cls, iterable):
        result = tuple.__new__(cls, iterable)
        if len(result) != len(cls._fields):
            raise TypeError(f"Expected {len(cls._fields)} arguments, got {len(result)}")
        return result

    FunctionType = type(_repr)

    _CONSTRUCTORS = {}  # arity -> the code of its constructor, named __new__

    def _constructor(arity):
        """The code of `__new__(_cls, a, b, ...)` for `arity` fields.

        A generated constructor, as collections.namedtuple makes (no *args loop per
        record); each class then only renames its parameters to its fields, which
        costs a tenth of compiling the source again. Compiling one costs 40-160 us
        and a run defines records of about ten arities, so the code of each arity
        up to MAX_PRECOMPILED, and Config's, comes compiled in records_new.py's bytecode
        (imported by the first record: every run builds Config); only a larger one is
        compiled here.
        """
        if arity not in _CONSTRUCTORS:
            if arity <= MAX_PRECOMPILED or arity in WIDE_PRECOMPILED:
                from istio_init import records_new

                code = getattr(records_new, f"new_{arity}").__code__
            else:
                scope = {}
                exec(constructor_source(arity), scope)
                code = scope[f"new_{arity}"].__code__
            _CONSTRUCTORS[arity] = code.replace(co_name="__new__", co_qualname="__new__")
        return _CONSTRUCTORS[arity]

    def _build(name, namespace):
        fields = tuple(namespace.get("__annotations__", {}))
        for field in fields:
            if field.startswith("_"):
                raise ValueError(f"{name}: field names cannot start with an underscore: {field!r}")
        defaults = []
        declared = {}
        for field in fields:
            if field in namespace:
                default = namespace[field]
                if type(default) is Declared:
                    declared[field] = default.describe(field)
                    default = default.default
                defaults.append(default)
        defaults = tuple(defaults)
        if defaults and any(f not in namespace for f in fields[len(fields) - len(defaults):]):
            raise TypeError(f"{name}: a field without a default follows one with a default")
        new = FunctionType(_constructor(len(fields)).replace(co_varnames=("_cls", *fields)),
                           {"_tuple_new": tuple.__new__, "__name__": namespace.get("__module__", __name__)},
                           "__new__", defaults or None)
        new.__qualname__ = f"{name}.__new__"
        body = {"__slots__": (), "__new__": new, "_fields": fields, "__match_args__": fields,
                "_field_defaults": dict(zip(fields[len(fields) - len(defaults):], defaults)),
                "__repr__": _repr, "_replace": _replace, "_asdict": _asdict, "__getnewargs__": _getnewargs,
                "_make": classmethod(_make_from), "_declarations": declared}
        for key, value in namespace.items():
            if key in _RESERVED:
                raise AttributeError(f"{name}: cannot overwrite NamedTuple attribute {key}")
            if key not in fields:
                body[key] = value
        for index, field in enumerate(fields):
            body[field] = _tuplegetter(index, f"Alias for field number {index}")
        return type(name, (tuple,), body)

    class _Meta(type):
        def __new__(mcs, name, bases, namespace):
            return _build(name, namespace)

    _Root = type.__new__(_Meta, "NamedTuple", (), {})

    def NamedTuple(*args, **kwargs):  # noqa: N802 (typing's name)
        raise TypeError("istio_init.records.NamedTuple supports the class syntax only")

    NamedTuple.__mro_entries__ = lambda bases: (_Root,)

    class _Generic:
        """`Generic[T]` among a record's bases: mypy's generic record; at run time no base at all.

        Annotations are strings here (`from __future__ import annotations`), so
        `Record[int]` is never evaluated: the record class needs no typing machinery.
        """

        def __getitem__(self, parameters):
            return self

        def __mro_entries__(self, bases):
            return ()

    Generic = _Generic()

    def TypeVar(name, *constraints, **options):  # noqa: N802 (typing's name)
        """A type variable's name: only mypy reads type variables."""
        return name
