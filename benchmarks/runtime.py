"""The edge runtime on one core: per-row latency through the Predictor vs a bare ORT call, and more.

Usage::

    python benchmarks/runtime.py [BUNDLE] [--compressed DIR] [--data CMAPSS_DIR] [--rows N]

Without BUNDLE, builds one (generic profile of this machine, a throw-away key) from the
compressed FD001 model that ``benchmarks/compress.py`` leaves in ``runs/bench-compress/compressed``
(or ``--compressed``). Rows come from C-MAPSS ``test_FD001.txt`` (``--data`` / $EDGEGLM_CMAPSS),
else from the simulator.

Measured in this process, pinned to one core, inference on 1 thread:

- ``bare``: ``InferenceSession.run`` on a pre-built window, batch 1 (the floor);
- ``predictor``: row in → prediction out through :class:`Predictor.push` (ring buffer,
  normalization, inference, alarm), for rows that complete a window; p50 / p99;
- ``overhead_ratio`` = predictor p50 / bare p50;
- ``windows_per_s``: replay throughput through ``push_many`` (batched inference);

and in fresh subprocesses (each pinned to one core): ``import_s`` (``import edgeglm.runtime``),
``cold_start_s`` (process start → first prediction of ``edgeglm edge predict``-equivalent code),
``rss_mb`` (peak RSS, VmHWM, of a process that opens the installed bundle — hashes and the
committed id checked; its signature was checked once, at install — and predicts a whole replay
streamed from disk: a runtime-only process; torch is never imported, and the script checks that).
Last line: one JSON object (``p50_us, p99_us, overhead_ratio, windows_per_s, cold_start_s, rss_mb`` …).
Goals (issue): p99_us ≤ 1000, overhead_ratio ≤ 1.2, rss_mb ≤ 60, cold_start_s ≤ 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _rows(data: str | None, limit: int, keep: set[str]) -> tuple[list[dict], str]:
    from edgeglm.runtime.sources import replay_file

    if data and (Path(data) / "test_FD001.txt").is_file():
        path = Path(data) / "test_FD001.txt"
    else:
        from edgeglm.data.factory import simulate_line

        ds = simulate_line(seed=0)
        tmp = Path(tempfile.mkdtemp()) / "test_factory.txt"
        ds.test.to_text(tmp)
        cols = ["unit", "cycle", *ds.test.setting_names, *ds.test.sensor_names]
        (tmp.parent / "columns.json").write_text(json.dumps({"columns": cols}))
        path = tmp
    rows = list(replay_file(path, keep=keep))
    return rows[:limit] if limit else rows, str(path)


def _child(code: str, python: str) -> dict:
    """Run ``code`` in a fresh interpreter pinned to CPU 0; it prints one JSON line last."""
    t0 = time.perf_counter()
    out = subprocess.run(
        ["taskset", "-c", "0", python, "-c", code] if _has_taskset() else [python, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    doc["wall_s"] = time.perf_counter() - t0
    return doc


def _has_taskset() -> bool:
    from shutil import which

    return which("taskset") is not None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", nargs="?", type=Path, help="bundle to measure (default: build one, see above)")
    ap.add_argument("--pubkey", type=Path, help="its trusted public key (with BUNDLE)")
    ap.add_argument("--compressed", type=Path, default=REPO / "runs/bench-compress/compressed")
    ap.add_argument("--data", default=os.environ.get("EDGEGLM_CMAPSS", str(REPO.parent / "shared/datasets/cmapss")))
    ap.add_argument("--rows", type=int, default=0, help="replay at most this many rows (default: all)")
    ap.add_argument("--runs", type=int, default=3000, help="timed bare calls (default: 3000)")
    ap.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter for the subprocess figures (e.g. .venv-runtime/bin/python)",
    )
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    from edgeglm.runtime.engine import Engine
    from edgeglm.runtime.loop import make_predictor

    work = Path(tempfile.mkdtemp(prefix="edgeglm-bench-runtime-"))
    bundle, pubkey = args.bundle, args.pubkey
    if bundle is None:
        if not (args.compressed / "golden_windows.npy").is_file():
            print(
                f"no compressed model at {args.compressed} (with golden_windows.npy): run "
                "benchmarks/compress.py first, or pass a BUNDLE",
                file=sys.stderr,
            )
            return 2
        import platform

        from edgeglm.devices.build import build_bundle
        from edgeglm.devices.profile import load_profile
        from edgeglm.signing import generate_keypair

        profile = "generic-arm64" if platform.machine() in ("aarch64", "arm64") else "generic-x86_64"
        key, pubkey = generate_keypair(work / "bench.key")
        bundle = build_bundle(args.compressed, load_profile(profile), key, backends=("onnxruntime",)).write(
            work / "bench.eglm"
        )
    # The device path: install into A/B slots (signature checked once, at install), then every
    # start opens the installed slot (hashes + committed id), as the agent does.
    from edgeglm.bundle import Bundle
    from edgeglm.runtime.slots import SlotStore

    root = work / "device"
    store = SlotStore(root)
    store.provision(profile=Bundle.open(bundle).manifest.profile, trusted_key=Path(pubkey).read_bytes())
    installed = store.install(bundle)
    if installed.state.value != "committed":
        print(f"install failed: {installed.reason}", file=sys.stderr)
        return 1
    spec = Bundle.open(bundle).manifest.window_spec
    rows, source = _rows(args.data, args.rows, {*spec["sensor_names"], *spec["setting_names"]})
    print(f"bundle {bundle} ({bundle.stat().st_size / 1024:.1f} KiB); rows {len(rows)} from {source}")

    eng = Engine.open(bundle, public_key=pubkey, threads=1)
    sess = eng.backend._session  # the bare floor: the same session the engine uses
    name = eng.backend.input_names[0]
    golden, _ = eng.manifest.golden()
    x1 = np.ascontiguousarray(next(iter(golden.values()))[:1], dtype=np.float32)
    outs = eng.backend.output_names[:1]
    for _ in range(200):
        sess.run(outs, {name: x1})
    bare = np.empty(args.runs)
    for i in range(args.runs):
        t0 = time.perf_counter_ns()
        sess.run(outs, {name: x1})
        bare[i] = time.perf_counter_ns() - t0
    bare_us = bare / 1000

    predictor = make_predictor(eng)
    lat = []
    for row in rows[: min(len(rows), 200)]:  # warm-up on a separate predictor's worth of rows
        make_predictor(eng).push(row)
    for row in rows:
        t0 = time.perf_counter_ns()
        events = predictor.push(row)
        dt = time.perf_counter_ns() - t0
        if any(getattr(e, "event", "") == "prediction" for e in events):
            lat.append(dt / 1000)
    lat_us = np.array(lat)

    thr = make_predictor(eng)
    t0 = time.perf_counter()
    n_pred = 0
    for i in range(0, len(rows), 256):
        n_pred += sum(1 for e in thr.push_many(rows[i : i + 256]) if getattr(e, "event", "") == "prediction")
    windows_per_s = n_pred / (time.perf_counter() - t0)
    eng.close()

    python = args.python
    imp = _child(
        "import time; t=time.perf_counter(); import edgeglm.runtime; import json, sys; "
        "print(json.dumps({'import_s': time.perf_counter()-t, 'torch': 'torch' in sys.modules}))",
        python,
    )
    replay_path = work / "rows.jsonl"
    replay_path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cold_code = f"""
import time, json, sys
t_start = time.perf_counter()
from edgeglm.runtime.engine import Engine
from edgeglm.runtime.loop import make_predictor
eng = Engine.open_installed({str(root)!r}, threads=1)
p = make_predictor(eng)
first = None
with open({str(replay_path)!r}) as f:
    for line in f:
        if any(e.event == "prediction" for e in p.push(json.loads(line))):
            first = time.perf_counter() - t_start
            break
print(json.dumps({{"first_s_in_process": first, "torch": "torch" in sys.modules}}))
"""
    t0 = time.perf_counter()
    cold = _child(cold_code, python)
    cold_start_s = time.perf_counter() - t0  # process start → first prediction printed (includes interpreter start)
    rss_code = f"""
import json, sys
from edgeglm.runtime.engine import Engine
from edgeglm.runtime.loop import make_predictor
eng = Engine.open_installed({str(root)!r}, threads=1)
p = make_predictor(eng)
import itertools
with open({str(replay_path)!r}) as f:  # streamed, as a device reads its sensors
    rows = (json.loads(line) for line in f)
    while chunk := list(itertools.islice(rows, 256)):
        p.push_many(chunk)
# VmHWM, not ru_maxrss: ru_maxrss survives exec, so it would count the forking parent's pages
hwm_kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({{"rss_mb": hwm_kb / 1024,
                   "predictions": p.counters.predictions, "torch": "torch" in sys.modules}}))
"""
    rss = _child(rss_code, python)
    if imp["torch"] or cold["torch"] or rss["torch"]:
        print("error: a runtime process imported torch", file=sys.stderr)
        return 1

    p50_bare, p99_bare = np.percentile(bare_us, [50, 99])
    p50, p99 = np.percentile(lat_us, [50, 99])
    print(f"\n{'':22}{'p50 µs':>10}{'p99 µs':>10}")
    print(f"{'bare session.run b1':22}{p50_bare:>10.1f}{p99_bare:>10.1f}")
    print(f"{'predictor row→pred':22}{p50:>10.1f}{p99:>10.1f}   ({len(lat_us)} predictions)")
    print(f"overhead ratio (p50) {p50 / p50_bare:.2f}; replay {windows_per_s:,.0f} windows/s (push_many, 256)")
    print(
        f"import {imp['import_s']:.3f} s; cold start {cold_start_s:.3f} s (first prediction "
        f"{cold['first_s_in_process']:.3f} s after interpreter start); peak RSS {rss['rss_mb']:.1f} MB; "
        f"subprocess python: {python}"
    )
    figures = {
        "bench": "runtime",
        "bundle_bytes": bundle.stat().st_size,
        "rows": len(rows),
        "p50_us": round(float(p50), 1),
        "p99_us": round(float(p99), 1),
        "bare_p50_us": round(float(p50_bare), 1),
        "bare_p99_us": round(float(p99_bare), 1),
        "overhead_ratio": round(float(p50 / p50_bare), 3),
        "windows_per_s": round(windows_per_s, 1),
        "import_s": round(imp["import_s"], 3),
        "cold_start_s": round(cold_start_s, 3),
        "rss_mb": round(rss["rss_mb"], 1),
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
