"""bench/gpu_check.sh, dry-run on CPU (DRY_RUN=1): every step's command runs with tiny sizes, the cuDNN frontend wheel
for this Python is picked and installed into build/gpu_site, and the dispatch table and cross-checks are written
(under $OUT, never into the repo). It checks the script's plumbing; it measures nothing about a GPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lengen_fast import backends

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("LENGEN_RESULTS", "LENGEN_DISPATCH_TABLE")}
    env.update(DRY_RUN="1", OUT=str(tmp_path), ONLY="attn", DRY_RUNS="64:b",
               PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
    before = {p: p.read_bytes() if p.exists() else None for p in (ROOT / "bench" / "results.csv", backends.DISPATCH_TABLE)}
    res = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                         timeout=900, cwd=ROOT)
    logs = tmp_path / "gpu_check_logs"
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    assert f"python tag: {tag}" in res.stdout
    wheels = list((ROOT / ".gpu_wheels").glob(f"*-{tag}-{tag}-*.whl"))
    if wheels:                                                   # downloaded by scripts/fetch_gpu_wheels.sh
        assert "=== wheel: exit 0" in res.stdout
    summary = (logs / "summary.txt").read_text()
    for step in ("build", "describe", "bench_attention"):
        assert f"=== {step}: exit 0" in summary, summary
    table = json.loads((tmp_path / "dispatch_table.json").read_text())
    assert table["version"] == backends.TABLE_VERSION and table["entries"]
    assert backends._load_table(str(tmp_path / "dispatch_table.json"), 0.0)[1].startswith("ok")
    for key, e in table["entries"].items():
        assert key.startswith("cpu|float32|64|causal|short|") and e["best"] == "triton"
    checks = json.loads((logs / "crosscheck.json").read_text())["checks"]["64:b"]
    assert checks["lengen_triton"]["ok"] and checks["lengen_dispatch"]["ok"]
    assert "skipped" in checks["fa2"] and "CUDA" in checks["fa2"]["skipped"]
    rows = (logs / "results_gpu.csv").read_text().splitlines()
    assert rows[0].startswith("date,") and len(rows) > 1
    for p, b in before.items():                                  # the dry run writes nothing into the repo
        assert (p.read_bytes() if p.exists() else None) == b, p
