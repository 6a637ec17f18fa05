"""Does the benchmark suite run from wherever the package is installed, writing only where it is told?"""
from __future__ import annotations

import csv
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lengen_fast
from lengen_fast import bench_cli
from lengen_fast.bench import common, plot

ROOT = Path(__file__).resolve().parent.parent
PKG_PARENT = Path(lengen_fast.__file__).resolve().parent.parent  # the checkout, or site-packages


@pytest.mark.slow
def test_lengen_bench_quick_outside_the_checkout(tmp_path):
    # The same lengen_fast this test imported (a checkout's or an installed wheel's), run from an empty folder.
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(PKG_PARENT), "OMP_NUM_THREADS": "1"}
    env.pop("LENGEN_RESULTS", None)
    env.pop("LENGEN_BENCH_QUICK", None)
    r = subprocess.run([sys.executable, "-m", "lengen_fast.bench_cli", "--quick", "--out", "out"], cwd=work, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(p.name for p in work.iterdir()) == ["out"]  # nothing else written to the working folder
    with open(work / "out" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["op"] for r in rows} == {"attention", "decompose", "pack", "gather", "rope", "lm_step"}
    providers = {r["provider"] for r in rows}
    assert {"lengen_cpu", "sdpa_per_doc", "hf_eager", "numpy vectorized"} <= providers
    assert all(float(r["median_ms"]) > 0 for r in rows)
    pngs = list((work / "out" / "plots").glob("*.png"))
    assert len(pngs) >= 5
    assert not (PKG_PARENT / "lengen_fast" / "bench" / "results.csv").exists()


def test_bench_cli_rejects_an_unknown_op(capsys):
    with pytest.raises(SystemExit):
        bench_cli.main(["--only", "data,nope", "--out", "unused"])
    assert "unknown ops ['nope']" in capsys.readouterr().err


def test_results_path_follows_out(tmp_path, monkeypatch):
    monkeypatch.delenv("LENGEN_RESULTS", raising=False)
    assert common.results_path() == Path("lengen_bench") / "results.csv"
    monkeypatch.setenv("LENGEN_RESULTS", "")
    ns = common.argparse.Namespace(out=str(tmp_path / "o"), quick=False)
    monkeypatch.delenv("LENGEN_BENCH_QUICK", raising=False)
    assert common.apply_common_args(ns) is False
    assert common.results_path() == tmp_path / "o" / "results.csv"


def test_record_and_plot_write_where_told(tmp_path):
    csv_path = tmp_path / "r" / "results.csv"
    t = common.Timing(2.0, 1.5, 2.5, [1.5, 2.0, 2.5])
    for provider, ms in (("ours", 2.0), ("peer", 6.0)):
        common.record("demo", {"n": 1}, provider, common.Timing(ms, ms * 0.9, ms * 1.1, [ms]), throughput=1 / ms,
                      unit="x/s", path=csv_path)
    common.record("demo", {"n": 2}, "ours", t, path=csv_path)
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["provider"] for r in rows] == ["ours", "peer", "ours"]
    assert plot.main(["--results", str(csv_path)]) == 0
    assert len(list((tmp_path / "r" / "plots").glob("demo_*.png"))) == 2  # one chart per (device, op, config)


def test_measure_quantiles_stay_within_the_samples():
    t = common.measure(lambda: sum(range(1000)), warmup=0, reps=3)
    assert min(t.times_ms) <= t.p20_ms <= t.median_ms <= t.p80_ms <= max(t.times_ms)


def test_gpu_check_calls_the_packaged_modules():
    script = (ROOT / "bench" / "gpu_check.sh").read_text()
    mods = re.findall(r"python -m (lengen_fast\.bench\.\w+)", script)
    assert set(mods) == {"lengen_fast.bench.bench_attention", "lengen_fast.bench.bench_rope"}
    for m in mods:
        assert importlib.util.find_spec(m) is not None, m
    # rows go to the repository's record of published figures unless LENGEN_RESULTS (the dry run) says otherwise
    assert "RESULTS=${LENGEN_RESULTS:-bench/results.csv}" in script and "export LENGEN_RESULTS=$RESULTS" in script
    assert not re.search(r"python bench/", script)


def test_measure_counts_page_faults_per_call():
    # A call that maps and touches 8 MiB of fresh memory faults in >= 2,048 pages (4 KiB each; huge pages are
    # declined with madvise, for machines whose THP mode is "always"); a call that allocates nothing faults ~none.
    import mmap
    import sys

    if sys.platform != "linux":
        pytest.skip("page-fault counts are read with getrusage on Linux")

    def touch():
        m = mmap.mmap(-1, 8 << 20)
        if hasattr(mmap, "MADV_NOHUGEPAGE"):
            m.madvise(mmap.MADV_NOHUGEPAGE)
        for off in range(0, 8 << 20, 4096):
            m[off] = 1
        m.close()

    assert common.measure(touch, warmup=1, reps=3).minflt_per_call >= 2048
    assert common.measure(lambda: None, warmup=1, reps=50).minflt_per_call < 50
