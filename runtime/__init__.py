"""The EdgeGLM edge runtime: what a Jetson or ARM gateway runs all day. Never imports torch.

- :class:`Engine` opens and verifies a bundle and runs it on a backend (ONNX Runtime,
  LiteRT, TensorRT), with the golden-input health check;
- :class:`Predictor` turns sensor rows into RUL predictions and alarms, handling bad rows by policy;
- :class:`SlotStore` installs bundles into A/B slots through a persisted state machine
  (shared by ``edgeglm flash`` and over-the-air updates);
- :class:`Outbox` is the durable store-and-forward queue the agent syncs through
  (:mod:`edgeglm.runtime.agent`, :mod:`edgeglm.runtime.cloud` on the other side).
"""

from __future__ import annotations

from edgeglm.runtime.alarms import Alarm, AlarmCleared, AlarmConfig, AlarmRaised
from edgeglm.runtime.engine import Engine, HealthReport
from edgeglm.runtime.outbox import GapReason, Outbox, OutboxConfig, OutboxStats
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
    "GapReason",
    "HealthReport",
    "InstallResult",
    "Outbox",
    "OutboxConfig",
    "OutboxStats",
    "Prediction",
    "Predictor",
    "Row",
    "RowRejected",
    "SensorFault",
    "SlotState",
    "SlotStore",
    "Warmup",
]
