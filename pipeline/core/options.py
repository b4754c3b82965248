"""Each option written once: a field of a stage's options dataclass carries its default and
its command-line form (flag, help, bounds), and the CLI is generated from it.

So the Python API (`GatherOptions(timeout=5)`) and the command line (`--timeout 5`) are the
same typed object, as img2dataset's `download()` is both; a new option is one field. Fields
without `option(...)` metadata (back-off constants, the user agent) are Python-only. Click is
imported here, not numpy or torch: `pipeline --help` stays fast.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Cli:
    """How one field appears on the command line."""

    help: str
    flag: str = ""  # default: --field-name (a "--yes/--no" pair for a boolean pair)
    type: type | None = None  # int, float, str, Path; default: the default value's type
    min: float | None = None
    max: float | None = None
    max_open: bool = False
    min_open: bool = False
    choices: tuple[str, ...] = ()
    path: str = "any"  # for Path fields: "file", "dir", "existing-file" or "any"
    metavar: str | None = None
    multiple: bool = False
    nargs: int = 1
    required: bool = False
    show_default: bool | str = True
    hidden: bool = False
    parse: Callable[[Any], Any] | None = None  # command-line value -> field value
    flag_value: str | None = None  # the value of the bare flag (the value is then optional)


def option(default: Any = MISSING, help: str = "", **cli: Any) -> Any:
    """A dataclass field that is also a command-line option (see `Cli` for the keywords)."""
    return dataclasses.field(default=default, metadata={"cli": Cli(help, **cli)})


def cli_fields(cls: type) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(cls) if "cli" in f.metadata]


def click_options(cls: type) -> Callable[[F], F]:
    """Decorate a click command with one option per `option(...)` field of `cls`, in order."""

    def decorate(command: F) -> F:
        for field in reversed(cli_fields(cls)):
            command = _click_option(field)(command)
        return command

    return decorate


def from_cli(cls: type[T], values: dict[str, Any], **extra: Any) -> T:
    """Build `cls` from a command's parsed values (each through its field's `parse`)."""
    kwargs = dict(extra)
    for field in cli_fields(cls):
        value = values[field.name]
        spec: Cli = field.metadata["cli"]
        if value is None and field.default is not MISSING:
            value = field.default  # not given: the field's own default (click has None)
        elif spec.parse is not None and value is not None:
            value = spec.parse(value)
        kwargs[field.name] = value
    return cls(**kwargs)


def _click_option(field: dataclasses.Field[Any]) -> Callable[[F], F]:
    spec: Cli = field.metadata["cli"]
    default = None if field.default is MISSING else field.default
    flag = spec.flag or "--" + field.name.replace("_", "-")
    kwargs: dict[str, Any] = {"help": spec.help, "hidden": spec.hidden,
                              "required": spec.required, "metavar": spec.metavar}
    if "/" in flag or (isinstance(default, bool) and spec.type is None):
        kwargs.update(is_flag=True, default=bool(default))
        kwargs["show_default"] = spec.show_default if "/" in flag else False
    else:
        kwargs.update(type=_click_type(spec, default), multiple=spec.multiple, nargs=spec.nargs,
                      default=_shown(default, spec))
        if spec.flag_value is not None:
            kwargs.update(is_flag=False, flag_value=spec.flag_value)
        kwargs["show_default"] = spec.show_default if default not in (None, ()) else False
    return click.option(flag, field.name, **kwargs)


def _shown(default: Any, spec: Cli) -> Any:
    """The default as click holds it: a multiple option's is a tuple (or None when empty)."""
    if spec.multiple or spec.nargs > 1:
        return tuple(default) if default else None
    return None if default == () else default  # a single value that parses into a tuple


def _click_type(spec: Cli, default: Any) -> click.ParamType | type:
    kind = spec.type or (type(default) if default is not None else str)
    if spec.choices:
        return click.Choice(spec.choices)
    if issubclass(kind, Path):
        return click.Path(exists=spec.path == "existing-file",
                          dir_okay=spec.path not in ("file", "existing-file"),
                          file_okay=spec.path != "dir", path_type=Path)
    if kind is int and (spec.min is not None or spec.max is not None):
        return click.IntRange(_int(spec.min), _int(spec.max))
    if kind is float and (spec.min is not None or spec.max is not None):
        return click.FloatRange(spec.min, spec.max, min_open=spec.min_open,
                                max_open=spec.max_open)
    return kind


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)
