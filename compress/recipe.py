"""Compression recipes: TOML files listing passes, validated once, before any work.

::

    [recipe]
    name = "default"
    schema_version = 1
    model = "stgnn"          # optional: the checkpoint's model kind must match

    [[pass]]
    kind = "prune"           # one table per pass, in order; fields are the pass config's
    ratio = 0.5

A recipe is data: :func:`load_recipe` builds every pass config through the registry in
:mod:`edgeglm.compress.passes`, so an unknown pass or field fails here with the list of
valid ones, not half way through a long run.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeglm.compress.passes import PassConfig, config_from_table, known_kinds
from edgeglm.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["DEFAULT_RECIPE", "Recipe", "load_recipe", "parse_recipe"]

DEFAULT_RECIPE = Path(__file__).with_name("recipes") / "default.toml"
SCHEMA_VERSION = 1
_HEADER_KEYS = {"name", "schema_version", "model", "description"}


@dataclass(frozen=True)
class Recipe:
    """A validated recipe.

    Args:
        name: for the report.
        passes: pass configs in order.
        model: the model kind the recipe expects (``"stgnn"``, ``"mlp"``), or None for any.
        source: the file it came from, if any.
    """

    name: str
    passes: tuple[PassConfig, ...]
    model: str | None = None
    source: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model, "passes": [p.to_dict() for p in self.passes]}


def parse_recipe(text: str, *, source: Path | None = None) -> Recipe:
    """Parse and validate recipe TOML text."""
    where = str(source) if source else "recipe"
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from exc
    unknown_top = sorted(set(doc) - {"recipe", "pass"})
    if unknown_top:
        raise ConfigError(f"{where}: unknown table(s) {unknown_top}; a recipe has [recipe] and [[pass]] tables")
    header = doc.get("recipe", {})
    bad = sorted(set(header) - _HEADER_KEYS)
    if bad:
        raise ConfigError(f"{where}: unknown [recipe] key(s) {bad}; valid: {sorted(_HEADER_KEYS)}")
    version = header.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise ConfigError(f"{where}: recipe schema_version {version}; this EdgeGLM reads {SCHEMA_VERSION}")
    tables = doc.get("pass", [])
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"{where}: no passes; add [[pass]] tables with kind = one of {', '.join(known_kinds())}")
    passes = []
    for i, table in enumerate(tables, start=1):
        kind = table.get("kind")
        if kind is None:
            raise ConfigError(f"{where}: pass #{i} has no kind; known passes: {', '.join(known_kinds())}")
        try:
            passes.append(config_from_table(kind, table))
        except ConfigError as exc:
            raise ConfigError(f"{where}: pass #{i}: {exc.message}", hint=exc.hint) from exc
    model = header.get("model")
    return Recipe(
        name=str(header.get("name", source.stem if source else "recipe")),
        passes=tuple(passes),
        model=model,
        source=source,
    )


def load_recipe(path: Path | str | None = None) -> Recipe:
    """Load a recipe file (default: the shipped ``default.toml``)."""
    p = Path(path) if path is not None else DEFAULT_RECIPE
    if not p.is_file():
        raise ConfigError(f"recipe {p} does not exist", hint=f"start from the shipped recipe: {DEFAULT_RECIPE}")
    return parse_recipe(p.read_text(), source=p)
