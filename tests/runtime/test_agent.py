"""The edge agent: local alarms with no broker, store-and-forward with a real Mosquitto, config errors."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import pytest
from brokers import free_port

from edgeglm.data.factory import LineConfig, simulate_line
from edgeglm.errors import ConfigError
from edgeglm.protocol import Ack, Envelope, Kind, Topics
from edgeglm.runtime.agent import Agent
from edgeglm.runtime.agent_config import load_agent_config


@pytest.fixture(scope="module")
def line_file(tmp_path_factory) -> Path:
    ds = simulate_line(LineConfig(units_train=8, units_test=3), seed=7)
    out = tmp_path_factory.mktemp("line")
    ds.test.to_text(out / "line.txt")
    cols = ["unit", "cycle", *ds.test.setting_names, *ds.test.sensor_names]
    (out / "columns.json").write_text(json.dumps({"columns": cols}))
    return out / "line.txt"


def _config(root: Path, line: Path, port: int, **sync: object) -> str:
    extra = "\n".join(f"{k} = {json.dumps(v)}" for k, v in sync.items())
    return (
        f'[agent]\nnode = "press-07"\nroot = "{root}"\n[source]\nkind = "replay"\npath = "{line}"\n'
        f"[sync]\nport = {port}\nrows_per_record = 40\n{extra}\n"
    )


def test_no_broker_still_predicts_raises_alarms_and_keeps_every_record(device, line_file):
    cfg = load_agent_config(text=_config(device, line_file, free_port()))
    out = io.StringIO()
    agent = Agent(cfg, out=out)
    stats = agent.run()
    alarms = [json.loads(x) for x in out.getvalue().splitlines() if '"alarm_raised"' in x]
    assert stats.predictions > 0 and stats.published_envelopes == 0
    assert len(alarms) == stats.alarms > 0
    from edgeglm.runtime.outbox import Outbox

    with Outbox(cfg.outbox_path, node="press-07") as ob:
        recs = ob.pending(limit=100_000, max_bytes=1 << 30)
        assert [r.seq for r in recs] == list(range(1, stats.produced + 1))
        rows = sum(len(r.body["rows"]) for r in recs if r.kind is Kind.PREDICTIONS)
        assert rows == stats.predictions
        assert sum(r.kind is Kind.ALARM for r in recs) == stats.by_kind["alarm"]


class FakeCloud:
    """Stores envelopes by seq and acks the highest contiguous seq, as the cloud daemon does."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt

        self.seqs: dict[int, object] = {}
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fake-cloud")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe([("edgeglm/v1/+/telemetry", 1), ("edgeglm/v1/+/alarm", 1)])
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        env = Envelope.from_bytes(msg.payload)
        with self.lock:
            for r in env.records:
                self.seqs.setdefault(r.seq, r)
            h = 0
            while h + 1 in self.seqs:
                h += 1
        client.publish(Topics(env.node).ack, Ack(env.node, env.inc, h).to_bytes(), qos=1)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_store_and_forward_through_a_real_broker(device, line_file, mosquitto, protocol):
    cloud = FakeCloud(mosquitto.port)
    try:
        cfg = load_agent_config(
            text=_config(device, line_file, mosquitto.port, records_per_publish=8, inflight=4, protocol=protocol)
        )
        agent = Agent(cfg)
        stats = agent.run(drain=True, drain_timeout_s=30)
    finally:
        cloud.close()
    assert agent.outbox.acked_seq == agent.outbox.last_seq == stats.produced
    assert sorted(cloud.seqs) == list(range(1, stats.produced + 1))
    rows = sum(len(r.body["rows"]) for r in cloud.seqs.values() if r.kind is Kind.PREDICTIONS)
    assert rows == stats.predictions
    assert stats.published_envelopes >= stats.produced / 8


SRC = "[source]\npath = 'line.txt'\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[agent]\nroot = '/x'\n" + SRC, "agent.node is required"),
        ("[agent]\nnode = 'a/b'\n" + SRC, "agent.node"),
        ("[agent]\nnode = 'n'\n" + SRC + "[sync]\nport = 'x'\n", "sync.port"),
        ("[agent]\nnode = 'n'\n" + SRC + "[sync]\nprotocl = '5'\n", "sync.protocl"),
        ("[agent]\nnode = 'n'\n[source]\nkind = 'replay'\n", "source.path is required"),
        ("[agent]\nnode = 'n'\n" + SRC + "[sourse]\n", "unknown section"),
        ("[agent]\nnode = 'n'\n" + SRC + "[outbox]\nmax_mb = -1\n", "outbox.max_mb"),
    ],
)
def test_config_errors_name_the_key(text, message):
    with pytest.raises(ConfigError, match=message):
        load_agent_config(text=text)
