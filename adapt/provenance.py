"""What made a run's number: its fingerprint, written into its ``config.json`` and ``final.json`` and compared by
every reader that reuses or aggregates runs (a sweep's skip and resume, ``report``, ``protocol``).

A run's provenance has three parts:

* ``code``: the method's code (the sha256 of the source files of every class of its lineage: a user's file, and
  the built-in files it builds on), and the package's training code (the sha256 of every module of ``adapt`` and
  ``featstore`` that a run executes, so a change of the training loop counts as well), with the package version,
  and in a git checkout its commit and whether the tree was dirty (for the record; the digests decide);
* ``settings``: the sha256 of the resolved settings (every setting, ``config.json`` holds them);
* ``stores``: each store's identity (:func:`featstore.identity.identity`: its clips and a digest of its features).

:func:`differences` says, in words, what differs between a saved provenance and the current one; a sweep retrains
a run whose method, training code or stores changed, and ``report`` marks a cell whose runs came from different
code.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import subprocess
import sys
from pathlib import Path

import adapt
import featstore

# modules that only read runs or write reports: a change in them does not change a number a run computes
NOT_TRAINING = {"report.py", "plots.py", "selection.py", "results.py", "commands.py", "provenance.py", "api.py",
                "tracking.py", "slurm.py"}


def _sha_files(paths) -> str:
    h = hashlib.sha256()
    for p in sorted(set(paths)):
        h.update(Path(p).name.encode())
        h.update(Path(p).read_bytes())
    return h.hexdigest()


def method_files(method_cls) -> list[Path]:
    """The source files of the classes of ``method_cls``'s lineage (the method's file and those it builds on)."""
    from adapt.method import is_method_class
    files = []
    for k in method_cls.__mro__:
        if not is_method_class(k):
            continue
        try:
            f = inspect.getsourcefile(k)
        except TypeError:
            f = None
        if f and Path(f).is_file():
            files.append(Path(f))
    return files


def method_code(method_cls) -> str:
    """sha256 of the method's lineage's source files."""
    return _sha_files(method_files(method_cls))


@functools.cache
def package_code() -> dict:
    """The package's training code: version, the sha256 of the modules a run executes, and the git commit (and
    whether the tree is dirty) when it runs from a checkout."""
    roots = [Path(adapt.__file__).parent, Path(featstore.__file__).parent]
    files = [p for r in roots for p in r.rglob("*.py") if p.name not in NOT_TRAINING]
    out = {"version": _version(), "sha256": _sha_files(files)}
    repo = roots[0].parent
    if (repo / ".git").exists():
        try:
            commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                    timeout=10).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            if commit:
                out["commit"], out["dirty"] = commit, bool(dirty)
        except (OSError, subprocess.SubprocessError):
            pass
    return out


def _version() -> str:
    from featstore.schema import package_version
    return package_version()


def settings_digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def code(method_cls) -> dict:
    from adapt.method import reference_of
    files = method_files(method_cls)
    return {"method": reference_of(method_cls), "method_sha256": _sha_files(files),
            "method_files": {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files},
            "package": package_code(),
            "python": sys.version.split()[0], "torch": _torch_version()}


def _torch_version() -> str:
    import torch
    return torch.__version__


def of_run(method_cls, settings: dict, stores: dict) -> dict:
    """A run's provenance: its code, the digest of its resolved settings, its stores' identities
    (``{role: identity}``)."""
    return {"code": code(method_cls), "settings_sha256": settings_digest(settings), "stores": stores}


def store_identities(paths: dict) -> dict:
    """{role: {path, identity...}} of the stores of ``paths`` ({role: path})."""
    from featstore.identity import identity
    return {role: {"path": str(p), **identity(p)} for role, p in paths.items() if p}


def differences(saved: dict | None, now: dict, stores: bool = True) -> list[str]:
    """What differs between a run's saved provenance and the current one, in words ([] when nothing does)."""
    if not saved:
        return ["it records no provenance (trained by an earlier version of this tool)"]
    out = []
    a, b = saved.get("code", {}), now.get("code", {})
    if a.get("method_sha256") != b.get("method_sha256"):
        old, new = a.get("method_files") or {}, b.get("method_files") or {}
        changed = [f for f in new if not isinstance(old, dict) or old.get(f) != new[f]] or list(new)
        out.append(f"its method's code changed ({', '.join(Path(f).name for f in changed) or b.get('method')})")
    if a.get("package", {}).get("sha256") != b.get("package", {}).get("sha256"):
        out.append("the tool's training code changed (package "
                   f"{_code_name(a.get('package', {}))} -> {_code_name(b.get('package', {}))})")
    if stores:
        for role, ident in now.get("stores", {}).items():
            old = saved.get("stores", {}).get(role)
            if old is None:
                continue
            if (old.get("clips"), old.get("features")) != (ident.get("clips"), ident.get("features")):
                out.append(f"the {role} store's content changed ({ident.get('path')})")
    return out


def _code_name(pkg: dict) -> str:
    """'0.3.0 @ 1a2b3c4 (dirty) [code 5d6e7f8]'."""
    if not pkg:
        return "unknown"
    text = str(pkg.get("version", "?"))
    if pkg.get("commit"):
        text += f" @ {pkg['commit'][:7]}" + (" (dirty)" if pkg.get("dirty") else "")
    return text + f" [code {str(pkg.get('sha256', ''))[:7]}]"


def code_name(prov: dict | None) -> str:
    """How a run's code reads in a report's footer: the package and the method's digest."""
    if not prov:
        return "no record (an earlier version of this tool)"
    c = prov.get("code", {})
    return f"{c.get('method', '?')} [method {str(c.get('method_sha256', ''))[:7]}], package {_code_name(c.get('package'))}"


def code_key(prov: dict | None) -> tuple:
    """What identifies the code of a run's number (runs of one cell should share it)."""
    if not prov:
        return (None, None)
    c = prov.get("code", {})
    return (c.get("method_sha256"), c.get("package", {}).get("sha256"))
