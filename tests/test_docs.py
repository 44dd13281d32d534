"""The docs name only what exists: every `valuemesh.<...>` dotted name in docs/*.md and
README.md resolves, and every relative link and repository path they write points to a file.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]

# Entry-point group names look like module paths but are only keys in package metadata
# (pyproject.toml's [project.entry-points."valuemesh.plugins"]); nothing imports them.
ENTRY_POINT_GROUPS = frozenset({"valuemesh.plugins"})
# File names that read like dotted names: the service templates shipped in cli/ (checked below).
SERVICE_FILES = frozenset({"valuemesh.service", "valuemesh.plist"})

# A dotted name not glued to a path or a longer word (examples/valuemesh_sharing, x.valuemesh.y);
# a sentence's full stop after it is not part of it, since each part must start a new identifier.
_DOTTED = re.compile(r"(?<![\w./-])valuemesh(?:\.[A-Za-z_]\w*)+")
# Inline links [text](target) and reference definitions [label]: target.
_INLINE_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
_EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//|#)", re.IGNORECASE)
# A path from the repository root in prose or code (`node/store.py`, bench/run.py), ending at
# the last name character, so `bench/results/<date>.json` checks its folder.
# A path may end in a glob (`tests/test_store_*.py`): then at least one file must match it.
_REPO_PATH = re.compile(r"(?<![\w./-])((?:protocol|node|cli|plugin|tests|bench|scripts|examples|docs)/[\w./*-]*[\w*])")


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _dotted_names() -> list[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for doc in DOCS:
        for name in _DOTTED.findall(doc.read_text(encoding="utf-8")):
            found.add((_rel(doc), name))
    return sorted(found)


def _links() -> list[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for target in _INLINE_LINK.findall(text) + _REF_LINK.findall(text):
            if not _EXTERNAL.match(target):
                found.add((_rel(doc), target))
    return sorted(found)


def _repo_paths() -> list[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for doc in DOCS:
        for path in _REPO_PATH.findall(doc.read_text(encoding="utf-8")):
            found.add((_rel(doc), path))
    return sorted(found)


def _resolve(name: str) -> None:
    """Import the longest importable prefix of `name`, then walk the rest as attributes."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj: object = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            # Only "this prefix is not a module" means try a shorter one; a module that
            # exists but fails to import (a missing dependency of its own) is a real failure.
            if e.name is None or not module_name.startswith(e.name):
                raise
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                raise AssertionError(f"{name}: {type(obj).__name__} {module_name!r} has no attribute chain "
                                     f"{'.'.join(parts[cut:])!r} (stops at {attr!r})")
            obj = getattr(obj, attr)
        return
    raise AssertionError(f"{name}: no importable prefix")


def test_the_docs_name_something() -> None:
    # Guards the scanners themselves: a regex that matches nothing would pass every test below.
    assert len(_dotted_names()) > 10
    assert len(_links()) > 5
    assert len(_repo_paths()) > 10


@pytest.mark.parametrize(("doc", "name"), _dotted_names())
def test_dotted_name_resolves(doc: str, name: str) -> None:
    if name in SERVICE_FILES:
        assert (ROOT / "cli" / name).is_file(), f"{doc}: names the service file {name}, which cli/ lacks"
        return
    if name in ENTRY_POINT_GROUPS:
        return
    _resolve(name)


@pytest.mark.parametrize(("doc", "target"), _links())
def test_relative_link_exists(doc: str, target: str) -> None:
    path = target.split("#", 1)[0].split("?", 1)[0]
    base = (ROOT / doc).parent
    assert path, f"{doc}: empty link target {target!r}"
    assert (base / path).exists(), f"{doc}: link {target!r} points to nothing ({_rel((base / path).resolve())})"


@pytest.mark.parametrize(("doc", "path"), _repo_paths())
def test_repository_path_exists(doc: str, path: str) -> None:
    exists = any(ROOT.glob(path)) if "*" in path else (ROOT / path).exists()
    assert exists, f"{doc}: names {path!r}, which is not in the repository"


def test_entry_point_groups_are_declared() -> None:
    # The whitelist above must stay honest: each name is a group pyproject.toml declares.
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    for group in ENTRY_POINT_GROUPS:
        assert f'[project.entry-points."{group}"]' in pyproject
