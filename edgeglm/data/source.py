"""Data source strings: one text names a data set, so checkpoints can record and reload it.

Forms::

    factory                      the embedded factory-line simulator, seed 0
    factory?seed=7               the simulator with another seed
    factory?seed=1&units_train=20&units_test=8
                                 any LineConfig field (see edgeglm.data.factory)
    cmapss:/data/cmapss          NASA C-MAPSS from a folder, subset FD001
    cmapss:/data/cmapss?subset=FD002
    cmapss                       C-MAPSS from $EDGEGLM_CMAPSS
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs

from edgeglm.data.table import Dataset
from edgeglm.errors import ConfigError

__all__ = ["DataSource", "load_source", "parse_source"]

KINDS = ("factory", "cmapss")


@dataclass(frozen=True)
class DataSource:
    """A parsed data source string (see the module docstring)."""

    kind: str
    path: str | None = None
    subset: str = "FD001"
    query: str = ""

    def __str__(self) -> str:
        if self.kind == "factory":
            return f"factory?{self.query}" if self.query else "factory"
        return f"cmapss:{self.path}?subset={self.subset}" if self.path else f"cmapss?subset={self.subset}"

    @property
    def conditions(self) -> int | str:
        """Operating conditions to normalize by (``"auto"`` for the simulator's regimes)."""
        if self.kind == "cmapss":
            from edgeglm.data.cmapss import recommended_conditions

            return recommended_conditions(self.subset)
        return "auto"


def parse_source(text: str, *, subset: str | None = None) -> DataSource:
    """Parse ``text``; ``subset`` (from ``--subset``) overrides a ``?subset=`` in the text.

    Raises:
        ConfigError: unknown kind or query key, or a non-integer seed.
    """
    head, _, query = text.partition("?")
    kind, _, path = head.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise ConfigError(
            f"data source {text!r}: unknown kind {kind!r}",
            hint="use 'factory' (the embedded simulator) or 'cmapss:PATH' (a folder with train_FD001.txt …)",
        )
    if kind == "factory":
        from edgeglm.data.factory import parse_factory_source

        if path:
            raise ConfigError(f"data source {text!r}: the simulator takes no path", hint="use 'factory?seed=N'")
        parse_factory_source(f"factory?{query}" if query else "factory")  # validates every field
        return DataSource("factory", query=query)
    params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    unknown = sorted(set(params) - {"subset"})
    if unknown:
        raise ConfigError(f"data source {text!r}: unknown option(s) {unknown}; cmapss takes ['subset']")
    chosen = (subset or params.get("subset") or "FD001").upper()
    return DataSource("cmapss", str(Path(path).expanduser().resolve()) if path else None, chosen)


def load_source(source: DataSource | str, *, subset: str | None = None) -> Dataset:
    """Load the data set a source names."""
    src = parse_source(source, subset=subset) if isinstance(source, str) else source
    if src.kind == "factory":
        from edgeglm.data.factory import parse_factory_source, simulate_line

        config, seed = parse_factory_source(str(src))
        return simulate_line(config, seed=seed)
    from edgeglm.data.cmapss import find_cmapss, load_cmapss

    return load_cmapss(find_cmapss(src.path), src.subset)
