"""Every package exports exactly what it lists in ``__all__``, and each name exists."""

from __future__ import annotations

import importlib

import pytest

PACKAGES = [
    "edgeglm",
    "edgeglm.data",
    "edgeglm.compress",
    "edgeglm.models",
    "edgeglm.errors",
    "edgeglm.graph",
    "edgeglm.windowing",
    "edgeglm.metrics",
    "edgeglm.sparse_codec",
    "edgeglm.checkpoint",
    "edgeglm.training",
    "edgeglm.bundle",
    "edgeglm.signing",
    "edgeglm.atomic",
    "edgeglm.devices",
    "edgeglm.runtime",
    "edgeglm.runtime.backends",
    "edgeglm.runtime.cloud",
    "edgeglm.protocol",
    "edgeglm.hashing",
]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_names_exist_and_are_unique(name: str) -> None:
    mod = importlib.import_module(name)
    exported = mod.__all__
    assert len(exported) == len(set(exported)), f"{name}.__all__ lists a name twice"
    missing = [n for n in exported if not hasattr(mod, n)]
    assert not missing, f"{name}.__all__ lists missing names {missing}"


def test_error_tree_is_rooted_and_codes_are_distinct() -> None:
    from edgeglm import errors

    classes = [getattr(errors, n) for n in errors.__all__]
    assert all(issubclass(c, errors.EdgeGLMError) for c in classes)
    codes = [c.exit_code for c in classes if c is not errors.EdgeGLMError]
    assert len(codes) == len(set(codes)), "two error classes share an exit code"
    assert issubclass(errors.SignatureError, errors.BundleError)
    assert issubclass(errors.BackendUnavailable, errors.BackendError)
    e = errors.DataError("bad line 3", hint="fix it")
    assert str(e) == "bad line 3 (fix it)" and e.hint == "fix it"
