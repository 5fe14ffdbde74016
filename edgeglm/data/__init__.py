"""Data sets: the sensor table, the factory-line simulator, the C-MAPSS loader, source strings."""

from __future__ import annotations

from edgeglm.data.cmapss import find_cmapss, load_cmapss, recommended_conditions
from edgeglm.data.factory import LineConfig, line_graph, simulate_line
from edgeglm.data.source import DataSource, load_source, parse_source
from edgeglm.data.table import Dataset, SensorTable

__all__ = [
    "DataSource",
    "Dataset",
    "LineConfig",
    "SensorTable",
    "find_cmapss",
    "line_graph",
    "load_cmapss",
    "load_source",
    "parse_source",
    "recommended_conditions",
    "simulate_line",
]
