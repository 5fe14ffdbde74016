"""The EdgeGLM edge runtime: what a Jetson or ARM gateway runs all day. Never imports torch.

- :class:`Engine` opens and verifies a bundle and runs it on a backend (ONNX Runtime,
  LiteRT, TensorRT), with the golden-input health check;
- :class:`Predictor` turns sensor rows into RUL predictions and alarms, handling bad rows by policy;
- :class:`SlotStore` installs bundles into A/B slots through a persisted state machine
  (shared by ``edgeglm flash`` and over-the-air updates);
- :mod:`edgeglm.runtime.outbox`, :mod:`edgeglm.runtime.agent` and :mod:`edgeglm.runtime.cloud`
  are the sync side; they are not imported here, so a process that only predicts does not
  load SQLite's and OpenSSL's libraries (every MB counts on a gateway).
"""

from __future__ import annotations

from edgeglm.runtime.alarms import Alarm, AlarmCleared, AlarmConfig, AlarmRaised
from edgeglm.runtime.engine import Engine, HealthReport
from edgeglm.runtime.predictor import (
    Action,
    BadKind,
    BadRowPolicy,
    Counters,
    Event,
    Prediction,
    Predictor,
    Row,
    RowRejected,
    SensorFault,
    Warmup,
)
from edgeglm.runtime.slots import InstallResult, SlotState, SlotStore

__all__ = [
    "Action",
    "Alarm",
    "AlarmCleared",
    "AlarmConfig",
    "AlarmRaised",
    "BadKind",
    "BadRowPolicy",
    "Counters",
    "Engine",
    "Event",
    "HealthReport",
    "InstallResult",
    "Prediction",
    "Predictor",
    "Row",
    "RowRejected",
    "SensorFault",
    "SlotState",
    "SlotStore",
    "Warmup",
]
