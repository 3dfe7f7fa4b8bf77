"""The one ``--set KEY=VALUE`` parser of both stages: the items split into keys and strings, and a string read as
its setting's type (from the config dataclass's annotation), a bad value being a one-line error."""

from __future__ import annotations

import typing
from pathlib import Path

from featstore.errors import UserError

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def split_items(items: list[str] | None, where: str = "--set") -> dict[str, str]:
    """``["w_adv=0", "sc=false"]`` -> ``{"w_adv": "0", "sc": "false"}`` (keys with ``-`` read as ``_``)."""
    out = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise UserError(f"{where} {item!r}: expected KEY=VALUE")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def kind_of(hint) -> tuple[type, bool]:
    """(the type, whether it takes None) of an annotation: ``int``, ``float | None``, ``tuple[str, ...]``..."""
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        return origin, False
    if args:
        inner = next((a for a in args if a is not type(None)), hint)
        return (typing.get_origin(inner) or inner), type(None) in args
    return hint, False


def coerce(name: str, text: str, kind: type, optional: bool = False, where: str = "--set"):
    """``text`` as a value of ``kind`` (bool, int, float, list / tuple of comma-separated items, Path, str);
    ``none`` for a setting that takes None."""
    raw, text = text, str(text).strip()
    if optional and text.lower() in ("none", "null", ""):
        return None
    if kind is bool:
        if text.lower() in TRUE + FALSE:
            return text.lower() in TRUE
        raise UserError(f"{where} {name}={raw}: expected true or false")
    try:
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except ValueError:
        raise UserError(f"{where} {name}={raw}: expected {'an integer' if kind is int else 'a number'}") from None
    if kind is list:
        return [_number(v.strip()) for v in text.split(",") if v.strip()]
    if kind is tuple:
        return tuple(v.strip() for v in text.split(",") if v.strip())
    if kind is Path:
        return Path(text)
    return text


def _number(v: str):
    for read in (int, float):
        try:
            return read(v)
        except ValueError:
            pass
    return v
