"""Device profiles and bundles (``edgeglm.devices``).

A device profile is data: one TOML file per device under ``profiles/``, loaded and validated
by :mod:`edgeglm.devices.profile`::

    from edgeglm.devices import load_profile
    profile = load_profile("jetson-orin-nano-8gb")
    profile.backends        # ('tensorrt', 'onnxruntime')

This ``__init__`` imports only :mod:`.profile` (standard library only): the edge runtime
imports it on gateways, so heavy modules of this package (bundle building, flashing over
SSH) are imported by their own path, never from here.
"""

from __future__ import annotations

from edgeglm.devices.profile import (
    BACKENDS,
    PRECISIONS,
    SCHEMA_VERSION,
    SHIPPED_DIR,
    Accelerator,
    DeviceProfile,
    list_profiles,
    load_profile,
    parse_profile,
    profile_dirs,
)

__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "SCHEMA_VERSION",
    "SHIPPED_DIR",
    "Accelerator",
    "DeviceProfile",
    "list_profiles",
    "load_profile",
    "parse_profile",
    "profile_dirs",
]
