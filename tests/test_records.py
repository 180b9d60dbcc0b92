"""istio_init.records.NamedTuple behaves as typing.NamedTuple for what istio-init's types use."""

from __future__ import annotations

import copy
import pickle
import typing

import pytest

from istio_init.records import NamedTuple


class Ours(NamedTuple):
    """A record."""

    name: str
    port: int = 15001
    tags: tuple[str, ...] = ()

    def label(self) -> str:
        return f"{self.name}:{self.port}"


class Theirs(typing.NamedTuple):
    """A record."""

    name: str
    port: int = 15001
    tags: tuple[str, ...] = ()

    def label(self) -> str:
        return f"{self.name}:{self.port}"


@pytest.mark.parametrize("args,kwargs", [(("a",), {}), (("a", 1), {}), (("a",), {"tags": ("x",)}),
                                         ((), {"name": "b", "port": 2, "tags": ()})])
def test_records_match_typing_namedtuple(args: tuple, kwargs: dict) -> None:
    ours, theirs = Ours(*args, **kwargs), Theirs(*args, **kwargs)
    assert tuple(ours) == tuple(theirs) and ours == theirs and hash(ours) == hash(theirs)
    assert repr(ours).replace("Ours", "Theirs") == repr(theirs)
    assert ours._fields == theirs._fields and ours._field_defaults == theirs._field_defaults
    assert ours._asdict() == theirs._asdict()
    assert tuple(ours._replace(port=9)) == tuple(theirs._replace(port=9))
    assert ours.label() == theirs.label() and Ours.__doc__ == Theirs.__doc__
    assert (ours.name, ours.port, ours.tags) == (theirs.name, theirs.port, theirs.tags)
    assert Ours._make(list(ours)) == ours and isinstance(Ours._make(list(ours)), Ours)
    assert copy.copy(ours) == ours and pickle.loads(pickle.dumps(ours)) == ours
    assert Ours.__match_args__ == Theirs.__match_args__


def test_records_refuse_what_typing_refuses() -> None:
    with pytest.raises(TypeError):
        Ours()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Ours("a", 1, (), 4)  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        Ours("a")._replace(nope=1)  # type: ignore[call-arg]
    with pytest.raises(AttributeError):
        Ours("a").port = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        class Bad(NamedTuple):
            a: int = 1
            b: int
    assert not hasattr(Ours("a"), "__dict__")


def test_precompiled_constructors_are_the_generated_source() -> None:
    """records_new.py is constructor_source of every precompiled arity (regenerate it from that)."""
    from pathlib import Path

    from istio_init import records, records_new

    text = Path(records_new.__file__).read_text()
    body = text[text.index("\n\ndef new_0"):]
    assert body == "".join("\n\n" + records.constructor_source(n) for n in records.precompiled_arities())


def test_every_record_of_a_run_has_a_precompiled_constructor() -> None:
    """Config (the widest record) is built on every start: its constructor must come compiled, not from exec."""
    from istio_init import records
    from istio_init.config import Config, FlagSpec
    from istio_init.model import RulePlan

    arities = {len(record._fields) for record in (Config, FlagSpec, RulePlan)}
    assert arities <= set(records.precompiled_arities()), (arities, records.precompiled_arities())


@pytest.mark.parametrize("arity", [0, 1, 3, 41, 64, 65, 70])
def test_records_of_any_arity_build_and_refuse_like_typing(arity: int) -> None:
    """Precompiled (precompiled_arities()) and compiled constructors behave alike."""
    fields = {f"f{i}": int for i in range(arity)}
    ours = NamedTuple.__mro_entries__((),)[0]  # type: ignore[attr-defined]
    cls = type(ours)(f"R{arity}", (ours,), {"__annotations__": fields, "__module__": __name__})
    theirs = typing.NamedTuple(f"T{arity}", list(fields.items()))  # type: ignore[misc]
    values = list(range(arity))
    assert tuple(cls(*values)) == tuple(theirs(*values)) == tuple(values)
    assert cls(**{f"f{i}": i for i in range(arity)}) == tuple(values)
    with pytest.raises(TypeError):
        cls(*values, 1)
    if arity:
        with pytest.raises(TypeError):
            cls(*values[1:])


def test_a_generic_record_has_no_typing_base_at_run_time() -> None:
    """`Generic[T]` among the bases is for mypy only: the class is a plain record, subscripts are not evaluated."""
    from istio_init.records import Generic, TypeVar

    item = TypeVar("item")

    class Box(NamedTuple, Generic[item]):
        first: bool = False
        rest: tuple[item, ...] = ()

    assert Box.__mro__ == (Box, tuple, object)
    assert Box(True, (1,)) == (True, (1,)) and Box()._fields == ("first", "rest")


def test_a_declared_default_is_the_default_and_its_description_is_kept() -> None:
    from istio_init.records import Declared, declarations

    class Port(NamedTuple):
        number: int = Declared(15001, lambda field: f"{field} row")  # type: ignore[assignment]
        name: str = "envoy"

    assert Port() == (15001, "envoy") and Port._field_defaults == {"number": 15001, "name": "envoy"}
    assert declarations(Port) == {"number": "number row"} and declarations(Ours) == {}
