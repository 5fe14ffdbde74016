"""The inference loop: rows from a source → predictor → sinks (and metrics). Shared by
``edgeglm edge predict`` and the edge agent.

Replay (a finite, unpaced source) is pushed in batches for throughput — the predictor
guarantees the same predictions as row-by-row — while live sources are pushed row by row so
each prediction leaves as soon as its row arrives.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Any

from edgeglm.bundle import Manifest
from edgeglm.runtime.alarms import AlarmConfig
from edgeglm.runtime.predictor import Counters, Predictor

__all__ = ["alarm_config", "make_predictor", "run_rows"]


def alarm_config(manifest: Manifest, overrides: Mapping[str, Any] | None = None) -> AlarmConfig:
    """The bundle's alarm thresholds, with any of ``rul_low / rul_clear / debounce`` overridden."""
    d = {**manifest.thresholds, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    return AlarmConfig(rul_low=float(d["rul_low"]), rul_clear=float(d["rul_clear"]), debounce=int(d["debounce"]))


def make_predictor(engine: Any, *, alarm: AlarmConfig | None = None, **kwargs: Any) -> Predictor:
    """A predictor over an :class:`~edgeglm.runtime.Engine`: the bundle's WindowSpec and thresholds."""
    from edgeglm.windowing import WindowSpec

    spec = WindowSpec.from_dict(engine.manifest.window_spec)
    return Predictor(spec, engine.infer, alarm=alarm or alarm_config(engine.manifest), **kwargs)


def run_rows(
    predictor: Predictor,
    rows: Iterable[Mapping[str, Any]],
    sinks: list[Any],
    *,
    metrics: Any = None,
    batch: int = 1,
) -> Counters:
    """Push every row, write every event to every sink; returns the predictor's counters."""
    it = iter(rows)
    while True:
        chunk = list(itertools.islice(it, batch)) if batch > 1 else [r for r in itertools.islice(it, 1)]
        if not chunk:
            break
        events = predictor.push_many(chunk) if batch > 1 else predictor.push(chunk[0])
        if metrics is not None:
            metrics.observe(events)
        if events:
            for sink in sinks:
                sink.write(events)
    return predictor.counters
