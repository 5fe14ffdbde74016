"""EdgeGLM: compressed graph models for predictive maintenance at the edge.

The core package is numpy-only: data sets and windowing, the sensor graph,
metrics, the error tree. Torch lives in :mod:`edgeglm.models` and
:mod:`edgeglm.training`; the edge runtime (:mod:`edgeglm.runtime`) never imports it.
"""

from __future__ import annotations

from edgeglm.errors import EdgeGLMError

__version__ = "0.1.0"

__all__ = ["EdgeGLMError", "__version__"]
