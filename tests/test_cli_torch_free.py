"""The CLI runs device commands without torch: gateways install only ``edgeglm[runtime]``."""

from __future__ import annotations

import json
import subprocess
import sys

CODE = """
import contextlib, io, json, sys
from edgeglm.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    try:
        main(sys.argv[1:])
    except SystemExit:
        pass
print(json.dumps(sorted(m for m in ("torch", "onnx", "onnxscript", "torch_pruning") if m in sys.modules)))
"""


def _heavy_modules(*argv: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", CODE, *argv], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_parser_and_edge_commands_never_import_torch(tmp_path):
    assert _heavy_modules("--help") == []
    assert _heavy_modules("edge", "status", "--root", str(tmp_path), "--json") == []
    assert _heavy_modules("edge", "predict", "--help") == []
