"""The runtime tests' fixtures: built once with the full toolkit, read without it.

The runtime tests (``tests/runtime``) need signed bundles. Building one needs torch (to train
and compress the tiny model) and onnx; a gateway has neither. So the main venv writes the
fixtures into a folder, and the runtime venv (or the emulated arm64 root) only reads them::

    .venv/bin/python tests/runtime_fixtures.py build OUT       # main venv: torch, onnx
    EDGEGLM_TEST_FIXTURES=OUT python -m pytest tests/runtime   # any venv with edgeglm[runtime]
    python tests/runtime_fixtures.py compare OUT               # golden outputs here vs. at build

Without ``$EDGEGLM_TEST_FIXTURES``, ``tests/conftest.py`` builds them on the fly with
:func:`build_fixtures` (main venv). Layout of ``OUT``::

    fixtures.json                     schema_version, profiles, built_on (the build machine's arch)
    keys/fleet.key, keys/fleet.key.pub   the Ed25519 pair every bundle is signed with
    <profile>/v1.eglm, v2.eglm, v3.eglm  single-file bundles, versions (= sequences) 1, 2, 3
    <profile>/v3-bad-golden/          v3 with its golden outputs shifted by +50 and re-signed:
                                      it verifies, but fails the install health check

for each profile of :data:`PROFILES`. A test run uses the profile of the machine it runs on
(:func:`host_profile`), so one folder serves both an x86-64 run and an emulated arm64 one. The
golden outputs in every bundle are what ONNX Runtime gave on the build machine: on another
architecture, :func:`compare_golden` measures how far that machine's ONNX Runtime is from them.

Only :func:`build_fixtures` and :func:`make_compressed` import torch or onnx; loading and comparing need
numpy and ``edgeglm[runtime]`` only.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SCHEMA_VERSION = 1
#: The variable naming a folder written by ``build``; unset, conftest builds the fixtures itself.
ENV_VAR = "EDGEGLM_TEST_FIXTURES"
#: Profiles the fixtures are built for: one per architecture a test run can happen on.
PROFILES = ("generic-x86_64", "generic-arm64")
VERSIONS = ("1", "2", "3")
_PROFILE_OF_MACHINE = {
    "x86_64": "generic-x86_64",
    "amd64": "generic-x86_64",
    "aarch64": "generic-arm64",
    "arm64": "generic-arm64",
}
_MANIFEST = "fixtures.json"
_KEY = "fleet.key"
_BAD_GOLDEN_SHIFT = 50.0


class FixturesError(RuntimeError):
    """A fixtures folder is missing, stale or lacks this machine's profile; the message says how to rebuild."""


@dataclass(frozen=True)
class RuntimeFixtures:
    """What the runtime tests use, for one device profile.

    Args:
        root: the fixtures folder.
        profile: the device profile the bundles were built for (that of this machine).
        private_key: the Ed25519 signing key (PEM).
        public_key: its public key, which every bundle verifies against.
        bundles: ``"1"``, ``"2"``, ``"3"`` → single-file bundles; ``"bad"`` → the v3 folder whose
            golden outputs are wrong but properly signed.
    """

    root: Path
    profile: str
    private_key: Path
    public_key: Path
    bundles: dict[str, Path]


def host_profile(machine: str | None = None) -> str:
    """The generic device profile of this machine's architecture (``platform.machine()``)."""
    arch = (machine or platform.machine()).lower()
    if arch not in _PROFILE_OF_MACHINE:
        raise FixturesError(
            f"no generic device profile for architecture {arch!r}; known: {sorted(_PROFILE_OF_MACHINE)}"
        )
    return _PROFILE_OF_MACHINE[arch]


def make_compressed(out: Path) -> Path:
    """A real ``edgeglm compress`` output folder, made small (≈ 20 s; needs torch).

    A tiny MLP trained for 2 epochs on the simulator, then an INT8-only recipe. Returns ``out/compressed``.
    """
    from edgeglm.compress.pipeline import compress_checkpoint
    from edgeglm.compress.recipe import parse_recipe
    from edgeglm.training import TrainConfig, train_from_source

    _, ckpt, _ = train_from_source(
        "factory?seed=0&units_train=8&units_test=4",
        out / "checkpoint",
        model="mlp",
        window=16,
        train_config=TrainConfig(epochs=2),
        progress=False,
    )
    recipe = parse_recipe(
        '[recipe]\nname = "tiny-int8"\nschema_version = 1\n[[pass]]\nkind = "quantize"\naccuracy_budget = 100.0\n'
    )
    compress_checkpoint(ckpt, out / "compressed", recipe=recipe, progress=False, latency_runs=5, log=lambda *a: None)
    return out / "compressed"


def write_bad_golden(bundle: Path, private_key: Path, out: Path) -> Path:
    """Extract ``bundle`` into ``out`` with every golden output shifted by +50, re-signed with ``private_key``.

    The result passes :meth:`Bundle.verify` (signature and hashes hold) but fails the health check.
    """
    from edgeglm.bundle import Bundle, canonical_json, encode_array
    from edgeglm.signing import load_private_key, sign

    src = Bundle.open(bundle)
    doc = json.loads(src.manifest_bytes)
    _, outputs = src.manifest.golden()
    doc["golden"]["outputs"] = {k: encode_array(v + _BAD_GOLDEN_SHIFT) for k, v in outputs.items()}
    raw = canonical_json(doc)
    src.extract(out)
    (out / "manifest.json").write_bytes(raw)
    (out / "signature").write_bytes(sign(raw, load_private_key(private_key)).to_bytes())
    return out


def build_fixtures(
    out: Path,
    *,
    profiles: Sequence[str] = PROFILES,
    compressed: Path | None = None,
    keys: tuple[Path, Path] | None = None,
) -> dict[str, RuntimeFixtures]:
    """Write the fixtures for ``profiles`` into ``out`` (needs torch unless ``compressed`` is given, and onnx).

    Args:
        out: the fixtures folder (created; an existing one is replaced).
        profiles: device profiles to build bundles for (default: :data:`PROFILES`).
        compressed: an ``edgeglm compress`` output folder to bundle (default: made with
            :func:`make_compressed`, in ``out/.work``, removed afterwards).
        keys: an existing (private, public) key pair to sign with, copied into ``out/keys``
            (default: a new pair).

    Returns:
        The fixtures of each profile, by profile name.
    """
    from edgeglm.devices.build import build_bundle
    from edgeglm.devices.profile import load_profile
    from edgeglm.signing import generate_keypair

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    (out / "keys").mkdir(parents=True)
    key_path = out / "keys" / _KEY
    if keys is None:
        private_key, public_key = generate_keypair(key_path)
    else:
        private_key, public_key = key_path, key_path.with_name(_KEY + ".pub")
        shutil.copyfile(keys[0], private_key)
        shutil.copyfile(keys[1], public_key)
    work = None
    if compressed is None:
        work = out / ".work"
        compressed = make_compressed(work)
    for name in profiles:
        profile = load_profile(name)
        folder = out / name
        for v in VERSIONS:
            b = build_bundle(compressed, profile, private_key, version=v, backends=("onnxruntime",))
            b.write(folder / f"v{v}.eglm")
        write_bad_golden(folder / f"v{VERSIONS[-1]}.eglm", private_key, folder / f"v{VERSIONS[-1]}-bad-golden")
    if work is not None:
        shutil.rmtree(work)
    doc = {"schema_version": SCHEMA_VERSION, "profiles": list(profiles), "built_on": platform.machine()}
    (out / _MANIFEST).write_text(json.dumps(doc, indent=2) + "\n")
    return {name: load_fixtures(out, name) for name in profiles}


def load_fixtures(root: Path, profile: str | None = None) -> RuntimeFixtures:
    """Read the fixtures of ``profile`` (default: :func:`host_profile`) from a folder written by :func:`build_fixtures`.

    Raises:
        FixturesError: the folder is not a fixtures folder, has another schema version, or lacks the profile.
    """
    root = Path(root)
    profile = profile or host_profile()
    rebuild = f"rebuild it in the main venv: .venv/bin/python tests/runtime_fixtures.py build {root}"
    manifest = root / _MANIFEST
    if not manifest.is_file():
        raise FixturesError(f"{root} is not a runtime test fixtures folder (no {_MANIFEST}); {rebuild}")
    doc = json.loads(manifest.read_text())
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise FixturesError(
            f"{manifest}: schema_version {doc.get('schema_version')!r}, these tests read {SCHEMA_VERSION}; {rebuild}"
        )
    if profile not in doc.get("profiles", []):
        raise FixturesError(
            f"{root} has bundles for {doc.get('profiles')}, not for this machine's {profile}; {rebuild}"
        )
    folder = root / profile
    bundles = {v: folder / f"v{v}.eglm" for v in VERSIONS}
    bundles["bad"] = folder / f"v{VERSIONS[-1]}-bad-golden"
    missing = [str(p) for p in bundles.values() if not p.exists()]
    if missing:
        raise FixturesError(f"{root} is incomplete: missing {', '.join(missing)}; {rebuild}")
    key = root / "keys" / _KEY
    return RuntimeFixtures(root, profile, key, key.with_name(_KEY + ".pub"), bundles)


@dataclass(frozen=True)
class GoldenComparison:
    """This machine's ONNX Runtime outputs on a bundle's golden inputs vs. those recorded at build.

    Args:
        bundle: the bundle compared.
        threads: inference threads used here.
        max_abs_diff: max |here − recorded| over the golden windows.
        bit_exact: every output has the same float32 bits as the recorded one.
        tolerance: the bundle's golden tolerance for ONNX Runtime (what the health check allows).
        latency_ms: the health check's batch-1 median latency here (meaningless under emulation).
        budget_ms: the device's latency budget recorded in the bundle.
    """

    bundle: Path
    threads: int
    max_abs_diff: float
    bit_exact: bool
    tolerance: float
    latency_ms: float
    budget_ms: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def compare_golden(fixtures: RuntimeFixtures, *, threads: Sequence[int | None] = (1, None)) -> list[GoldenComparison]:
    """Run each good bundle's golden inputs with ONNX Runtime here and compare with the recorded outputs.

    Args:
        fixtures: the fixtures of this machine's profile.
        threads: thread counts to run with; ``None`` = the profile's (the health check's setting).
            1 is the setting the reference outputs were recorded with.
    """
    from edgeglm.runtime.engine import Engine

    out = []
    for v in VERSIONS:
        for n in threads:
            path = fixtures.bundles[v]
            with Engine.open(path, public_key=fixtures.public_key, device=fixtures.profile, threads=n) as eng:
                inputs, expected = eng.manifest.golden()
                got = eng.infer(next(iter(inputs.values())))
                ref = next(iter(expected.values())).reshape(len(got), -1)[:, 0]
                diff = float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64))))
                same_bits = got.dtype == ref.dtype and got.tobytes() == ref.tobytes()
                tol = eng.manifest.golden_tolerance(eng.backend_name)
                health = eng.health_check(runs=5)
                out.append(
                    GoldenComparison(path, eng.threads, diff, same_bits, tol, health.latency_ms, health.budget_ms)
                )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="runtime_fixtures.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build", help="write the fixtures into OUT (main venv: needs torch and onnx)")
    p_build.add_argument("out", type=Path)
    p_build.add_argument("--profile", action="append", help=f"only this profile (repeatable; default: {PROFILES})")
    p_cmp = sub.add_parser("compare", help="golden outputs on this machine vs. those recorded at build")
    p_cmp.add_argument("root", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            made = build_fixtures(args.out, profiles=tuple(args.profile or PROFILES))
            print(f"runtime fixtures for {', '.join(made)} in {args.out}")
            return 0
        fixtures = load_fixtures(args.root)
        built_on = json.loads((fixtures.root / _MANIFEST).read_text()).get("built_on", "?")
        rows = compare_golden(fixtures)
    except FixturesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    here = platform.machine()
    print(f"golden outputs: ONNX Runtime on {here} vs. recorded on {built_on} ({fixtures.profile})")
    for r in rows:
        verdict = "bit-exact" if r.bit_exact else ("within tolerance" if r.ok else "OUTSIDE TOLERANCE")
        print(
            f"  {r.bundle.name:8} threads={r.threads}  max|diff|={r.max_abs_diff:.3g}  "
            f"tolerance={r.tolerance:.3g}  {verdict}  (batch-1 latency {r.latency_ms:.2f} ms, budget {r.budget_ms:g})"
        )
    worst = max(r.max_abs_diff for r in rows)
    exact = all(r.bit_exact for r in rows)
    print(
        f"golden summary: max|diff| = {worst:.3g}, {'bit-exact' if exact else 'not bit-exact'} ({here} vs {built_on})"
    )
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
