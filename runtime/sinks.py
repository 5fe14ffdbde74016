"""Where predictor events go locally: stdout JSON lines, a SQLite log, a CSV log.

Each sink takes events (anything with ``to_dict()`` holding an ``event`` name) and writes them; the
edge keeps working with no network, so these are the record of what it saw. The SQLite log
uses WAL mode and commits per batch, so a reader (a dashboard, ``sqlite3``) can query while
the agent writes, and a crash loses at most the batch being written.
"""

from __future__ import annotations

import csv
import json
import sqlite3
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any, Protocol

__all__ = ["CsvSink", "JsonLinesSink", "Sink", "SqliteSink", "event_dict"]


class Sink(Protocol):
    def write(self, events: Iterable[Any]) -> None: ...

    def close(self) -> None: ...


def event_dict(event: Any) -> dict[str, Any]:
    d = event.to_dict()
    d.setdefault("event", type(event).__name__)
    return d


class JsonLinesSink:
    """One compact JSON object per event, flushed per batch (pipe-friendly)."""

    def __init__(self, stream: IO[str] | None = None, *, kinds: set[str] | None = None) -> None:
        self._out = stream or sys.stdout
        self._kinds = kinds

    def write(self, events: Iterable[Any]) -> None:
        lines = [
            json.dumps(d, separators=(",", ":"))
            for d in map(event_dict, events)
            if self._kinds is None or d["event"] in self._kinds
        ]
        if lines:
            self._out.write("\n".join(lines) + "\n")
            self._out.flush()

    def close(self) -> None:
        self._out.flush()


class SqliteSink:
    """Events in a SQLite table ``events(id, event, stream, t, rul, body)`` (WAL mode)."""

    def __init__(self, path: Path | str) -> None:
        self._db = sqlite3.connect(str(path))
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, event TEXT NOT NULL, stream TEXT, "
            "t REAL, rul REAL, body TEXT NOT NULL)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS events_stream_t ON events(stream, t)")
        self._db.commit()

    def write(self, events: Iterable[Any]) -> None:
        rows = []
        for d in map(event_dict, events):
            rows.append((d["event"], d.get("stream"), d.get("t"), d.get("rul"), json.dumps(d, separators=(",", ":"))))
        if rows:
            with self._db:
                self._db.executemany("INSERT INTO events (event, stream, t, rul, body) VALUES (?, ?, ?, ?, ?)", rows)

    def close(self) -> None:
        self._db.close()


class CsvSink:
    """Events as CSV rows: event, stream, t, rul, health, detail (JSON of the rest)."""

    FIELDS = ("event", "stream", "t", "rul", "health", "detail")

    def __init__(self, path: Path | str) -> None:
        path = Path(path)
        new = not path.exists() or path.stat().st_size == 0
        self._fh = open(path, "a", newline="")  # noqa: SIM115 - held open for the sink's lifetime
        self._w = csv.writer(self._fh)
        if new:
            self._w.writerow(self.FIELDS)

    def write(self, events: Iterable[Any]) -> None:
        for d in map(event_dict, events):
            rest = {k: v for k, v in d.items() if k not in self.FIELDS}
            self._w.writerow(
                [
                    d.get("event"),
                    d.get("stream"),
                    d.get("t"),
                    d.get("rul"),
                    d.get("health"),
                    json.dumps(rest, separators=(",", ":")) if rest else "",
                ]
            )
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()
