from __future__ import annotations

import numpy as np
import pytest

from edgeglm.graph import GraphSource, SensorGraph, normalize_adjacency


def test_normalize_adjacency_matches_formula() -> None:
    a = np.array([[0, 1, 0], [1, 0, 2], [0, 2, 0]], np.float32)
    got = normalize_adjacency(a)
    a_hat = a + np.eye(3)
    d = a_hat.sum(1)
    want = a_hat / np.sqrt(d[:, None] * d[None, :])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # rows of the symmetric normalization do not sum to 1, but the spectrum is within [-1, 1]
    assert np.max(np.abs(np.linalg.eigvalsh(got))) <= 1 + 1e-6


def test_isolated_node_gets_zero_row_without_self_loops() -> None:
    a = np.zeros((2, 2), np.float32)
    np.testing.assert_array_equal(normalize_adjacency(a, self_loops=False), np.zeros((2, 2)))
    np.testing.assert_array_equal(normalize_adjacency(a), np.eye(2))


def test_graph_json_round_trip_and_subgraph() -> None:
    g = SensorGraph.from_edges(["a", "b", "c"], [("a", "b", 1.0), ("b", "c", 0.5), ("a", "zz", 3.0)])
    assert g.num_edges == 2
    back = SensorGraph.from_json(g.to_json())
    assert back.nodes == g.nodes and back.source is GraphSource.PRIOR
    np.testing.assert_array_equal(back.adjacency, g.adjacency)
    sub = g.subgraph(["c", "b"])
    np.testing.assert_array_equal(sub.adjacency, [[0, 0.5], [0.5, 0]])
    assert g.edge_index().shape == (2, 4)


def test_graph_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="symmetric"):
        SensorGraph(("a", "b"), np.array([[0, 1], [0, 0]], np.float32))
    with pytest.raises(ValueError, match="does not match"):
        SensorGraph(("a",), np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="schema_version"):
        SensorGraph.from_dict({"schema_version": 99, "nodes": [], "adjacency": [], "source": "prior"})


def test_correlation_graph_links_correlated_sensors() -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((500, 2))
    x = np.column_stack([base[:, 0], base[:, 0] + 0.1 * rng.standard_normal(500), base[:, 1], base[:, 1] * -2])
    g = SensorGraph.from_correlation(["a", "b", "c", "d"], x, k=1)
    assert g.source is GraphSource.CORRELATION
    assert g.adjacency[0, 1] > 0.9 and g.adjacency[2, 3] > 0.9
    assert g.adjacency[0, 2] == 0 and g.adjacency[1, 3] == 0
