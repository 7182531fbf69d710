"""kvcore imports only torch and the standard library: importing it in a fresh interpreter loads
none of the orchestrator's dependencies, and no Triton or NVML beyond what torch itself loads
(kvcore imports those lazily, on CUDA paths only).

Run: `python -m pytest tests/kvcore/test_imports.py -q`.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, sys
{imports}
print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}})))
"""
KVCORE = """
import kvcore
from kvcore import StreamingKVCache
import kvcore.attention, kvcore.cache, kvcore.slots, kvcore.storage, kvcore.graphs
import kvcore.ring, kvcore.capture
import kvcore.triton_decode, kvcore.triton_store, kvcore.bench, kvcore.profiling
cache = StreamingKVCache(2, 4, 2, 3, dtype="int8")
cache.append_all(*[__import__("torch").randn(2, 2, 3).half()] * 2)
cache.attend(0, __import__("torch").randn(2, 3).half())
kvcore.graphs.DecodeStep(cache)()
"""


def loaded_modules(imports: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(imports=imports)],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_import_kvcore_loads_no_orchestrator_dependency():
    loaded = loaded_modules(KVCORE)
    assert {"torch", "kvcore"} <= loaded  # the probe really ran
    assert loaded.isdisjoint({"ray", "mlflow", "hydra", "omegaconf"})
    # Triton and NVML only if torch alone already loads them.
    added = loaded - loaded_modules("import torch")
    assert added.isdisjoint({"triton", "pynvml"}), sorted(added)


def imported_kvcore_modules(path: Path) -> set[str]:
    """kvcore modules a source file imports anywhere (module level or lazily in a function)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {n for n in names if n.startswith("kvcore")}


def test_the_cache_does_not_import_the_graphs():
    """Dependencies point one way: graphs (and the model) use the cache, never the reverse,
    not even lazily."""
    for name in ("cache", "storage", "ring", "capture", "slots"):
        imported = imported_kvcore_modules(ROOT / "kvcore" / f"{name}.py")
        assert not {"kvcore.graphs", "kvcore.model"} & imported, (name, sorted(imported))
    assert "kvcore.storage" in imported_kvcore_modules(ROOT / "kvcore" / "cache.py")  # the scan works
    assert "kvcore.cache" in imported_kvcore_modules(ROOT / "kvcore" / "graphs.py")
