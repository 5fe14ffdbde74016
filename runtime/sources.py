"""Where sensor rows come from: file replay, stdin JSON lines, an MQTT sensor topic.

Every source yields plain mappings ``{"stream": …, "t": …, "<sensor>": value, …}`` — what
:meth:`edgeglm.runtime.Predictor.push` takes — and never validates values: bad readings are
the predictor's job (counted by policy, never a crash).

Replay files:

- **C-MAPSS text** (whitespace-separated, no header): ``unit cycle setting1..3 s1..s21``;
  files written by ``edgeglm simulate`` have their column names in ``columns.json`` beside
  them, which is used when present.
- **CSV with a header**: a ``stream`` (or ``unit``) and a ``t`` (or ``cycle``) column, then
  one column per setting / sensor, named as in the bundle's WindowSpec.

``rate`` replays at that many rows per second (a PLC scan rate); 0 is as fast as possible.
"""

from __future__ import annotations

import csv
import io
import json
import queue
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from edgeglm.errors import ConfigError, DataError

__all__ = ["CMAPSS_COLUMNS", "MqttSensorSource", "replay_file", "stdin_rows"]

CMAPSS_COLUMNS: tuple[str, ...] = (
    "unit",
    "cycle",
    "setting1",
    "setting2",
    "setting3",
    *(f"s{i}" for i in range(1, 22)),
)
_STREAM_KEYS = ("stream", "unit", "machine")
_TIME_KEYS = ("t", "cycle", "time", "timestamp")


def _paced(rows: Iterator[dict[str, Any]], rate: float) -> Iterator[dict[str, Any]]:
    if rate <= 0:
        yield from rows
        return
    period, start = 1.0 / rate, time.monotonic()
    for i, row in enumerate(rows):
        delay = start + i * period - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        yield row


def _normalize_keys(row: dict[str, Any]) -> dict[str, Any]:
    if "stream" not in row:
        for k in _STREAM_KEYS[1:]:
            if k in row:
                v = row.pop(k)
                row["stream"] = int(v) if isinstance(v, float) and v.is_integer() else v
                break
    if "t" not in row:
        for k in _TIME_KEYS[1:]:
            if k in row:
                row["t"] = row.pop(k)
                break
    return row


def _text_columns(path: Path, first: str, columns: tuple[str, ...] | None) -> tuple[str, ...]:
    if columns:
        return columns
    beside = path.with_name("columns.json")
    if beside.is_file():
        return tuple(json.loads(beside.read_text())["columns"])
    n = len(first.split())
    if n == len(CMAPSS_COLUMNS):
        return CMAPSS_COLUMNS
    raise DataError(
        f"{path}: {n} whitespace-separated columns and no columns.json beside it",
        hint="pass --columns a,b,c (stream and time first) or use a CSV file with a header",
    )


def _number(text: str) -> Any:
    try:
        v = float(text)
    except ValueError:
        return text  # the predictor counts it as non-numeric
    return int(v) if v.is_integer() and "." not in text and "e" not in text.lower() else v


def replay_file(
    path: Path | str,
    *,
    rate: float = 0.0,
    columns: tuple[str, ...] | None = None,
    units: set[int] | None = None,
    keep: set[str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Rows of a C-MAPSS-style text file or a CSV file with a header (see module doc).

    ``keep``: only these columns (plus ``stream`` and ``t``). A file's schema is fixed, so
    columns the model does not read (C-MAPSS's constant sensors s1, s5, …) are dropped here
    rather than counted as unknown sensors on every row; live sources keep every key, where
    an unexpected one is worth counting.
    """
    if keep is not None:
        keep = set(keep) | {"stream", "t"}
    path = Path(path)
    try:
        fh: IO[str] = open(path, newline="")  # noqa: SIM115 - closed by the generator below
    except OSError as exc:
        raise DataError(f"cannot read replay file {path}: {exc.strerror}", hint="check the path") from exc

    def rows() -> Iterator[dict[str, Any]]:
        with fh:
            first = fh.readline()
            if not first:
                return
            if "," in first:  # CSV with a header
                reader = csv.DictReader(io.StringIO(first + fh.read()))
                for rec in reader:
                    row = _normalize_keys({k.strip(): _number(v.strip()) for k, v in rec.items() if k})
                    if keep is not None:
                        row = {k: v for k, v in row.items() if k in keep}
                    if units is None or row.get("stream") in units:
                        yield row
                return
            names = _text_columns(path, first, columns)
            for line in [first, *fh]:
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != len(names):
                    # a damaged line is a bad row, not a dead replay: pass what there is
                    parts = (parts + ["nan"] * len(names))[: len(names)]
                row = _normalize_keys({n: _number(p) for n, p in zip(names, parts, strict=True)})
                if keep is not None:
                    row = {k: v for k, v in row.items() if k in keep}
                if units is None or row.get("stream") in units:
                    yield row

    return _paced(rows(), rate)


def stdin_rows(stream: IO[str]) -> Iterator[dict[str, Any]]:
    """JSON lines, one row (or a list of rows) per line; a line that is not JSON becomes a malformed row."""
    for line in stream:
        line = line.strip()
        if not line:
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            yield {"_malformed": line[:80]}
            continue
        for row in doc if isinstance(doc, list) else [doc]:
            yield _normalize_keys(dict(row)) if isinstance(row, Mapping) else {"_malformed": str(row)[:80]}


class MqttSensorSource:
    """Rows from an MQTT topic, as a PLC gateway publishes them (JSON or CBOR; one row or a list).

    The stream id is the row's ``stream`` field, else the topic level at ``stream_level``
    (e.g. topic ``factory/line1/press-07/sensors`` with ``stream_level=2`` → ``press-07``).
    Subscribes with QoS 1 and a persistent session so readings published while the agent
    restarts are delivered when it is back. Iterate it to get rows; ``close()`` ends the iteration.
    """

    def __init__(
        self,
        host: str,
        port: int,
        topic: str,
        *,
        client_id: str = "edgeglm-sensors",
        stream_level: int | None = None,
        username: str | None = None,
        password: str | None = None,
        qos: int = 1,
        maxsize: int = 100_000,
    ) -> None:
        try:
            import paho.mqtt.client as mqtt
        except ImportError as exc:  # pragma: no cover - the runtime extra installs paho
            raise ConfigError("the MQTT source needs paho-mqtt", hint="pip install 'edgeglm[runtime]'") from exc
        self.topic, self.stream_level, self.qos = topic, stream_level, qos
        self._q: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=maxsize)
        self.dropped = 0  # rows lost to a full queue (the predictor is far behind)
        self.decode_errors = 0
        self.connected = threading.Event()
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False, protocol=mqtt.MQTTv311
        )
        if username:
            c.username_pw_set(username, password)
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.reconnect_delay_set(min_delay=1, max_delay=30)
        self._client = c
        c.connect_async(host, port, keepalive=30)
        c.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if not reason_code.is_failure:
            client.subscribe(self.topic, qos=self.qos)
            self.connected.set()

    def _on_message(self, client, userdata, msg) -> None:
        try:
            doc = self._decode(msg.payload)
        except ValueError:
            self.decode_errors += 1
            doc = {"_malformed": msg.payload[:80].hex()}
        default_stream = None
        if self.stream_level is not None:
            levels = msg.topic.split("/")
            default_stream = levels[self.stream_level] if self.stream_level < len(levels) else None
        for row in doc if isinstance(doc, list) else [doc]:
            row = _normalize_keys(dict(row)) if isinstance(row, Mapping) else {"_malformed": str(row)[:80]}
            if default_stream is not None:
                row.setdefault("stream", default_stream)
            try:
                self._q.put_nowait(row)
            except queue.Full:
                self.dropped += 1

    @staticmethod
    def _decode(payload: bytes) -> Any:
        if payload[:1] in (b"{", b"["):
            return json.loads(payload)
        import cbor2

        try:
            return cbor2.loads(payload)
        except Exception as exc:  # cbor2 raises several decode error types
            raise ValueError(str(exc)) from exc

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            row = self._q.get()
            if row is None:
                return
            yield row

    def get(self, timeout: float | None = None) -> dict[str, Any] | None:
        """One row, or None after ``timeout`` seconds without one."""
        try:
            return self._q.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()
        self._q.put(None)
