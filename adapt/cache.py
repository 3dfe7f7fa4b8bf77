"""Files saved to be reused by later runs (SHOT's source stage, and any cache to come), verified before use.

A cache entry is a file ``X.pt`` and its record ``X.pt.json``: the sha256 of the file's bytes and the fingerprint
the entry was made for (everything its content depends on).  :func:`load` returns the entry only when the file is
whole (its digest matches) and was made for the same fingerprint; otherwise it returns None with the reason, and
the caller makes the entry again (:func:`save` replaces it), so a damaged or mismatched cache is never used.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import torch

from adapt.metrics import write_atomic


def save(path: Path, obj, fingerprint: dict) -> None:
    """Write ``obj`` (torch.save) to ``path`` and its record (digest, fingerprint) beside it, each atomically."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)
    write_atomic(_record(path), json.dumps({"sha256": hashlib.sha256(data).hexdigest(),
                                            "fingerprint": fingerprint}, sort_keys=True, default=str))


def load(path: Path, fingerprint: dict, device=None) -> tuple[object | None, str]:
    """(the entry, "") when ``path`` is whole and made for ``fingerprint``; else (None, why not)."""
    if not path.is_file():
        return None, "not saved yet"
    try:
        record = json.loads(_record(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None, f"{_record(path).name} is missing or unreadable"
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != record.get("sha256"):
        return None, f"{path.name} is damaged (its sha256 differs from the one saved with it)"
    if json.loads(json.dumps(fingerprint, sort_keys=True, default=str)) != record.get("fingerprint"):
        return None, f"{path.name} was made for other code, settings or stores"
    try:
        return torch.load(io.BytesIO(data), map_location=device, weights_only=True), ""
    except Exception as e:  # noqa: BLE001 - whole by its digest, yet unreadable: made again
        return None, f"{path.name} does not load ({type(e).__name__})"


def _record(path: Path) -> Path:
    return path.with_name(path.name + ".json")
