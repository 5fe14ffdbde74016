"""The EdgeGLM cloud side: the sync daemon, its record store and the broker's access control.

- :class:`CloudDaemon` (``edgeglm cloud run``) ingests envelopes through a shared MQTT
  subscription, stores them idempotently and acknowledges each node's high-water mark;
- :class:`SqliteStore` (the :class:`Store` protocol; PostgreSQL is a small subclass of
  :class:`SqlStore` by design) holds records, coverage, the fleet registry and alarms;
- :func:`write_broker_config` (``edgeglm broker config``) writes a Mosquitto configuration in
  which every node may only touch ``edgeglm/v1/{its name}/#``.

Never imports torch; paho-mqtt is imported only when a daemon starts.
"""

from __future__ import annotations

from edgeglm.runtime.cloud.broker_config import (
    BrokerFiles,
    FleetSpec,
    ListenerSpec,
    NodeCredential,
    hash_password,
    load_fleet,
    write_broker_config,
)
from edgeglm.runtime.cloud.daemon import (
    BrokerConfig,
    CloudConfig,
    CloudCounters,
    CloudDaemon,
    MqttProtocol,
    Rejection,
    StoreConfig,
    TlsConfig,
    cloud_subscriptions,
    load_cloud_config,
    open_store,
)
from edgeglm.runtime.cloud.store import (
    AlarmInfo,
    NodeInfo,
    NodeStatus,
    PutResult,
    SqliteStore,
    SqlStore,
    Store,
    StoreCounts,
    StoredRecord,
    gap_ranges,
)

__all__ = [
    "AlarmInfo",
    "BrokerConfig",
    "BrokerFiles",
    "CloudConfig",
    "CloudCounters",
    "CloudDaemon",
    "FleetSpec",
    "ListenerSpec",
    "MqttProtocol",
    "NodeCredential",
    "NodeInfo",
    "NodeStatus",
    "PutResult",
    "Rejection",
    "SqlStore",
    "SqliteStore",
    "Store",
    "StoreConfig",
    "StoreCounts",
    "StoredRecord",
    "TlsConfig",
    "cloud_subscriptions",
    "gap_ranges",
    "hash_password",
    "load_cloud_config",
    "load_fleet",
    "open_store",
    "write_broker_config",
]
