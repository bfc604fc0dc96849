"""Pass options: a pass's ``Options`` is a frozen dataclass whose fields, declared with :func:`option`, are its CLI
options (type, default, help, numeric bounds). ``OptionSpec`` parses a CLI string or TOML value into the field's
type: bool, int, float, str, ``Literal`` choices, unions of those tried in order (``int | Literal["auto"]``),
optional (``none``), and tuples (the key repeated), checking bounds (closed unless ``*_open``) and choices.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from graphopt.errors import UsageError

log = logging.getLogger("graphopt")


def option(default: Any, help: str, *, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False, hi_open: bool = False) -> Any:
    """A pass option: a dataclass field carrying its help text and numeric bounds (closed unless ``*_open``)."""
    meta = {"help": help, "lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open}
    if isinstance(default, (list, tuple)):
        return field(default=tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class OptionSpec:
    name: str        # CLI spelling, kebab-case
    attr: str        # dataclass attribute
    type: Any
    default: Any
    help: str
    lo: float | None
    hi: float | None
    lo_open: bool
    hi_open: bool

    @property
    def choices(self) -> tuple[Any, ...] | None:
        base = _strip_optional(self.type)
        if typing.get_origin(base) is Literal:
            return typing.get_args(base)
        return None

    @property
    def is_list(self) -> bool:
        return typing.get_origin(_strip_optional(self.type)) is tuple

    @property
    def optional(self) -> bool:
        """Whether ``none`` is a value."""
        return _is_optional(self.type)

    @property
    def members(self) -> tuple[Any, ...]:
        """The types a value (a list's item) may take, in the order tried, ``none`` aside: ``int | Literal["auto"]``
        gives ``(int, Literal["auto"])``."""
        base = _strip_optional(self.type)
        if self.is_list:
            return typing.get_args(base)[:1]
        return typing.get_args(base) if _is_union(base) else (base,)

    def type_name(self) -> str:
        base = _strip_optional(self.type)
        if self.choices is not None:
            name = "|".join(str(c) for c in self.choices)
        elif _is_union(base):   # e.g. int | Literal["auto"]
            name = "|".join("|".join(map(str, typing.get_args(a))) if typing.get_origin(a) is Literal
                            else a.__name__ for a in typing.get_args(base))
        elif self.is_list:
            name = "list of " + typing.get_args(base)[0].__name__ + " (repeat the key)"
        else:
            name = base.__name__
        bounds = ""
        if self.lo is not None or self.hi is not None:
            left = ("(" if self.lo_open else "[") + ("-inf" if self.lo is None else _fmt(self.lo))
            right = ("inf" if self.hi is None else _fmt(self.hi)) + (")" if self.hi_open else "]")
            bounds = f" in {left}, {right}"
        return name + bounds + (" or none" if _is_optional(self.type) else "")

    def parse(self, raw: Any, pass_name: str) -> Any:
        """Convert a CLI string (or TOML value) to this option's type, checking bounds and choices."""
        base = _strip_optional(self.type)
        where = f"pass '{pass_name}': option '{self.name}'"
        if _is_optional(self.type) and isinstance(raw, str) and raw.lower() in ("none", ""):
            return None
        try:
            if self.is_list:
                item_type = typing.get_args(base)[0]
                items = raw if isinstance(raw, (list, tuple)) else [raw]
                return tuple(self._scalar(item_type, x, where) for x in items)
            return self._scalar(base, raw, where)
        except UsageError as e:
            raise UsageError(f"{e}; expected {self.type_name()}") from None

    def _scalar(self, typ: Any, raw: Any, where: str) -> Any:
        if _is_union(typ):      # the first member that takes the value
            error: UsageError | None = None
            for member in typing.get_args(typ):
                try:
                    return self._scalar(member, raw, where)
                except UsageError as e:
                    error = error or e
            assert error is not None
            raise error
        if typing.get_origin(typ) is Literal:
            choices = typing.get_args(typ)
            for c in choices:
                if str(c) == str(raw).lower() or c == raw:
                    return c
            raise UsageError(f"{where}: '{raw}' is not a valid choice")
        if typ is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise UsageError(f"{where}: '{raw}' is not a boolean (true or false)")
        if typ is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise UsageError(f"{where}: '{raw}' is not an integer")
            try:
                value = int(raw) if not isinstance(raw, str) else int(raw.strip(), 10)
            except ValueError:
                raise UsageError(f"{where}: '{raw}' is not an integer") from None
            self._check_bounds(value, where)
            return value
        if typ is float:
            try:
                value = float(raw)
            except (TypeError, ValueError):
                raise UsageError(f"{where}: '{raw}' is not a number") from None
            if isinstance(raw, bool) or not math.isfinite(value):
                raise UsageError(f"{where}: '{raw}' is not a finite number")
            self._check_bounds(value, where)
            return value
        if typ is str:
            text = str(raw)
            if not text:
                raise UsageError(f"{where}: empty value")
            return text
        raise TypeError(f"unsupported option type {typ!r}")

    def _check_bounds(self, value: float, where: str) -> None:
        bad_lo = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        bad_hi = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
        if bad_lo or bad_hi:
            raise UsageError(f"{where}: {value} is out of range")


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _is_union(typ: Any) -> bool:
    return typing.get_origin(typ) in (typing.Union, types.UnionType)


def _is_optional(typ: Any) -> bool:
    return _is_union(typ) and type(None) in typing.get_args(typ)


def _strip_optional(typ: Any) -> Any:
    if _is_optional(typ):
        args = tuple(a for a in typing.get_args(typ) if a is not type(None))
        return args[0] if len(args) == 1 else typing.Union[args]   # int | Literal["auto"] | None keeps both
    return typ


def option_specs(options_cls: type) -> list[OptionSpec]:
    """The specs of an ``Options`` dataclass's fields, in declaration order."""
    hints = typing.get_type_hints(options_cls)
    specs = []
    for f in dataclasses.fields(options_cls):
        m = f.metadata
        specs.append(OptionSpec(name=f.name.replace("_", "-"), attr=f.name, type=hints[f.name],
                                default=f.default, help=m.get("help", ""), lo=m.get("lo"), hi=m.get("hi"),
                                lo_open=m.get("lo_open", False), hi_open=m.get("hi_open", False)))
    return specs


def unmatched(pass_name: str, option: str, patterns: typing.Iterable[str], names: typing.Iterable[str], *,
              ops: typing.Iterable[str] = (), glob: bool = False, what: str = "node") -> list[str]:
    """One note per entry of a name option (``exclude=...``) that matches none of ``names`` (node names, the first
    ones shown as examples; with ``glob`` the entries are fnmatch patterns) nor, where given, of the op types
    ``ops``; each also logged as a warning.

    Such an entry is most likely a typo, but not a usage error: the graph a pass sees is known only once the passes
    before it have run (fold-bn removes the BatchNormalization nodes, svd adds nodes), and a recipe shared by several
    models may name layers that only some of them have. The note says what the names look like, and the closest one.
    """
    names = [n for n in dict.fromkeys(names) if n]
    op_set = set(ops)
    notes = []
    for pat in dict.fromkeys(patterns):
        if pat in op_set or (any(fnmatch.fnmatchcase(n, pat) for n in names) if glob else pat in names):
            continue
        close = difflib.get_close_matches(pat, names, n=1, cutoff=0.6)
        if close:
            hint = f"did you mean '{close[0]}'?"
        elif names:
            hint = f"{what}s are named like " + ", ".join(f"'{n}'" for n in names[:3]) + (", ..." if len(names) > 3
                                                                                          else "")
        else:
            hint = f"the graph has no {what}"
        if op_set and not close:
            hint += "; or give an op type: " + ", ".join(sorted(op_set)[:6]) + (", ..." if len(op_set) > 6 else "")
        note = f"{option}: '{pat}' matches no {what} ({hint})"
        log.warning("pass '%s': %s", pass_name, note)
        notes.append(note)
    return notes
