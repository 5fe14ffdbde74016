"""The engine: a verified bundle plus the backend that runs it, and the golden-input health check.

``Engine.open`` reads a bundle (folder or single file), verifies it against the trusted key
(signature, hashes, device, architecture), picks a backend (``--backend`` or the first of the
bundle's backends installed here) and loads the model. ``infer`` is the hot path the
predictor calls; ``health_check`` is what an install runs before switching slots: the golden
inputs must reproduce the reference outputs recorded at build time, within the bundle's
tolerance for that backend, and within the device's latency budget.
"""

from __future__ import annotations

import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeglm.bundle import Bundle, VerifyReport
from edgeglm.runtime.backends.base import Backend, create_backend, select_backend

__all__ = ["Engine", "HealthReport"]


@dataclass(frozen=True)
class HealthReport:
    """Outcome of the golden-input check; ``reason`` says what failed when ``ok`` is False."""

    ok: bool
    backend: str
    max_abs_error: float
    tolerance: float
    latency_ms: float
    budget_ms: float
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Engine:
    """A loaded model from a verified bundle. Use :meth:`open`."""

    def __init__(
        self,
        bundle: Bundle,
        backend: Backend,
        model_dir: Path,
        *,
        report: VerifyReport | None,
        threads: int,
        cleanup: Path | None = None,
    ) -> None:
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.backend = backend
        self.backend_name = backend.name
        self.model_dir = model_dir
        self.verify_report = report
        self.threads = threads
        self._cleanup = cleanup
        self._input_name = self.manifest.inputs[0].name
        self._run_one = getattr(backend, "run_one", None)

    @classmethod
    def open(
        cls,
        path: Path | str,
        *,
        public_key: Any = None,
        device: str | None = None,
        arch: str | None = "auto",
        backend: str | None = None,
        threads: int | None = None,
        verify: bool = True,
        backend_options: dict | None = None,
    ) -> Engine:
        """Open, verify and load the bundle at ``path``.

        Args:
            public_key: trusted key (object or ``.pub`` path); required when ``verify``.
            device: this device's profile name (checked against the bundle's).
            arch: this device's CPU architecture; ``"auto"`` = ``platform.machine()``, None = skip.
            backend: force a backend (must be one of the bundle's and installed).
            threads: inference threads (default: the profile's setting recorded in the bundle).
            verify: False only for tools that inspect an already verified, installed slot.
        """
        from edgeglm.errors import ConfigError

        path = Path(path)
        bundle = Bundle.open(path)
        report = None
        if verify:
            if public_key is None:
                raise ConfigError("a trusted public key is needed to open a bundle", hint="pass --pubkey KEY.pub")
            report = bundle.verify(public_key, device=device, arch=platform.machine() if arch == "auto" else arch)
        cleanup = None
        if path.is_dir():
            model_dir = path
        else:
            model_dir = cleanup = Path(tempfile.mkdtemp(prefix="edgeglm-bundle-"))
            bundle.extract(model_dir)
        try:
            return cls._load(
                bundle,
                model_dir,
                backend=backend,
                threads=threads,
                backend_options=backend_options,
                report=report,
                cleanup=cleanup,
            )
        except BaseException:
            if cleanup:
                shutil.rmtree(cleanup, ignore_errors=True)
            raise

    @classmethod
    def open_installed(
        cls,
        root: Path | str,
        *,
        backend: str | None = None,
        threads: int | None = None,
        backend_options: dict | None = None,
    ) -> Engine:
        """Load the model a device runs: ``ROOT/current``, checked by :meth:`SlotStore.open_current`.

        No signature check here (it ran at install); the hashes, the committed bundle id and the
        device are checked. This is what the long-running agent uses.
        """
        from edgeglm.runtime.slots import SlotStore

        store = SlotStore(root)
        bundle = store.open_current()
        return cls._load(
            bundle,
            store.slots / str(store.current_slot()),
            backend=backend,
            threads=threads,
            backend_options=backend_options,
            report=None,
            cleanup=None,
        )

    @classmethod
    def _load(
        cls,
        bundle: Bundle,
        model_dir: Path,
        *,
        backend: str | None,
        threads: int | None,
        backend_options: dict | None,
        report: VerifyReport | None,
        cleanup: Path | None,
    ) -> Engine:
        """Pick the backend (``backend`` or the first of the bundle's installed here) and load its model file."""
        name = select_backend(bundle.manifest.backends, requested=backend)
        n_threads = threads or int(bundle.manifest.data["device"].get("threads", 1))
        be = create_backend(
            name, model_dir, bundle.manifest.model_file(name), threads=n_threads, options=backend_options
        )
        return cls(bundle, be, model_dir, report=report, threads=n_threads, cleanup=cleanup)

    def infer(self, windows: np.ndarray) -> np.ndarray:
        """RUL for a batch of normalized windows ``(n, time, sensors)`` → ``(n,)`` float32."""
        x = np.ascontiguousarray(windows, dtype=np.float32)
        if self._run_one is not None:
            y = self._run_one(x)
        else:
            y = next(iter(self.backend.run({self._input_name: x}).values()))
        return y.reshape(len(x), -1)[:, 0]

    def health_check(self, *, runs: int = 20, budget_ms: float | None = None) -> HealthReport:
        """Golden inputs → reference outputs within tolerance, batch-1 median latency within budget."""
        inputs, expected = self.manifest.golden()
        x = next(iter(inputs.values())).astype(np.float32)
        ref = next(iter(expected.values())).reshape(len(x), -1)[:, 0]
        tol = self.manifest.golden_tolerance(self.backend_name)
        budget = (
            budget_ms if budget_ms is not None else float(self.manifest.data["device"].get("latency_budget_ms", 50.0))
        )
        try:
            got = self.infer(x)
        except Exception as exc:  # a backend that cannot run the model is an unhealthy install
            return HealthReport(
                False, self.backend_name, float("inf"), tol, float("inf"), budget, f"inference failed: {exc}"
            )
        err = float(np.max(np.abs(got.astype(np.float64) - ref))) if np.all(np.isfinite(got)) else float("inf")
        one = x[:1]
        self.infer(one)  # warm-up
        times = []
        for _ in range(max(1, runs)):
            t0 = time.perf_counter()
            self.infer(one)
            times.append(time.perf_counter() - t0)
        latency = float(np.median(times) * 1000)
        if not err <= tol:
            return HealthReport(
                False,
                self.backend_name,
                err,
                tol,
                latency,
                budget,
                f"golden outputs differ by {err:.4g} > tolerance {tol:.4g}",
            )
        if latency > budget:
            return HealthReport(
                False,
                self.backend_name,
                err,
                tol,
                latency,
                budget,
                f"batch-1 latency {latency:.2f} ms exceeds the device budget {budget:.2f} ms",
            )
        return HealthReport(True, self.backend_name, err, tol, latency, budget)

    def close(self) -> None:
        self.backend.close()
        if self._cleanup is not None:
            shutil.rmtree(self._cleanup, ignore_errors=True)
            self._cleanup = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
