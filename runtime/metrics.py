"""``/healthz`` and Prometheus ``/metrics`` on localhost, read straight from the predictor's counters.

The predictor already counts everything (:class:`edgeglm.runtime.Counters`); a custom
collector turns those counts into Prometheus samples at scrape time, so there is one set of
books and nothing to keep in sync. Latency is the one thing observed as it happens (a
histogram of per-prediction inference time). A private registry keeps the process's other
metrics (and other agents in the same process, in tests) apart.

Exposed::

    edgeglm_rows_total                 rows pushed into the predictor
    edgeglm_rows_skipped_total{action} rows dropped / rejected by the bad-row policy
    edgeglm_bad_readings_total{kind,sensor}
    edgeglm_predictions_total
    edgeglm_alarms_total{state}        raised / cleared
    edgeglm_alarms_active              streams in alarm now
    edgeglm_sensor_faults_total
    edgeglm_inference_latency_seconds  histogram
    edgeglm_model_info{name,version,backend,bundle_id}   1
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["MetricsServer", "RuntimeMetrics"]


class RuntimeMetrics:
    """A Prometheus registry over a predictor's counters plus a latency histogram."""

    def __init__(self, predictor: Any, *, model: dict[str, str]) -> None:
        from prometheus_client import CollectorRegistry, Histogram

        self.predictor = predictor
        self.model = model
        self.started = time.time()
        self.last_prediction: float | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        self.latency = Histogram(
            "edgeglm_inference_latency_seconds",
            "Inference time per prediction (a batch shares its time)",
            buckets=(50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 50e-3, 0.1, 0.5),
            registry=self.registry,
        )
        self.registry.register(_CounterCollector(self))

    def observe(self, events: list[Any]) -> None:
        """Feed the events of one push: latency of each prediction."""
        for e in events:
            us = getattr(e, "latency_us", None)
            if us is not None:
                self.latency.observe(us / 1e6)
                self.last_prediction = time.time()

    def health(self) -> dict[str, Any]:
        c = self.predictor.counters
        return {
            "status": "ok",
            "model": self.model,
            "uptime_s": round(time.time() - self.started, 3),
            "rows": c.rows,
            "predictions": c.predictions,
            "alarms_active": list(self.predictor.active_alarms()),
            "last_prediction_age_s": None
            if self.last_prediction is None
            else round(time.time() - self.last_prediction, 3),
        }

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _CounterCollector:
    def __init__(self, metrics: RuntimeMetrics) -> None:
        self.m = metrics

    def describe(self) -> list:
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        c = self.m.predictor.counters
        yield CounterMetricFamily("edgeglm_rows", "Rows pushed into the predictor", value=c.rows)
        skipped = CounterMetricFamily("edgeglm_rows_skipped", "Rows skipped by the bad-row policy", labels=["action"])
        skipped.add_metric(["drop"], c.dropped)
        skipped.add_metric(["reject"], c.rejected)
        yield skipped
        bad = CounterMetricFamily(
            "edgeglm_bad_readings", "Bad readings and rows by kind and sensor", labels=["kind", "sensor"]
        )
        for (kind, sensor), n in sorted(c.bad.items()):
            bad.add_metric([kind.value, sensor], n)
        yield bad
        yield CounterMetricFamily("edgeglm_predictions", "Predictions made", value=c.predictions)
        alarms = CounterMetricFamily("edgeglm_alarms", "Alarm transitions", labels=["state"])
        alarms.add_metric(["raised"], c.alarms_raised)
        alarms.add_metric(["cleared"], c.alarms_cleared)
        yield alarms
        yield GaugeMetricFamily(
            "edgeglm_alarms_active", "Streams in alarm now", value=len(self.m.predictor.active_alarms())
        )
        yield CounterMetricFamily("edgeglm_sensor_faults", "Sensor-fault events", value=c.sensor_faults)
        info = GaugeMetricFamily("edgeglm_model_info", "The model this runtime runs", labels=sorted(self.m.model))
        info.add_metric([self.m.model[k] for k in sorted(self.m.model)], 1)
        yield info


class MetricsServer:
    """A tiny HTTP server on ``host:port`` (localhost by default) serving /healthz and /metrics.

    ``port=0`` picks a free port (see :attr:`port`). Runs in a daemon thread; ``close()`` stops it.
    """

    def __init__(self, metrics: RuntimeMetrics, *, host: str = "127.0.0.1", port: int = 0) -> None:
        m = metrics

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] == "/metrics":
                    body, ctype = m.exposition(), "text/plain; version=0.0.4; charset=utf-8"
                elif self.path.split("?")[0] == "/healthz":
                    body, ctype = json.dumps(m.health()).encode(), "application/json"
                else:
                    self.send_error(404, "try /healthz or /metrics")
                    return
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:  # keep stderr for the agent's own log
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.host, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, name="edgeglm-metrics", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
