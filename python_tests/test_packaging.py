"""Does one build run everywhere, and is the package's metadata consistent?

- Run-time ISA dispatch: every CPU path this machine has (portable, avx2, avx512) gives bitwise-equal
  decompositions, LENGEN_CPU_ISA forces a path, and an unknown or unsupported value is a clear error.
- The data-algorithm tests pass under each forced path (subprocesses).
- One version (lengen_fast/__init__.py), one Python floor, no unused dependencies.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lengen_fast import backends
from lengen_fast.data import synthetic_lengths

ROOT = Path(__file__).resolve().parent.parent
ext = backends.cpu_ext()
needs_ext = pytest.mark.skipif(ext is None, reason="lengen_fast._C not built")
LEVELS = ["portable", "avx2", "avx512"]


def _available() -> list[str]:
    if ext is None:
        return []
    return LEVELS[:LEVELS.index(ext.cpu_isa_detected()) + 1]


@needs_ext
def test_isa_env_forces_a_path(monkeypatch):
    best = ext.cpu_isa_detected()
    monkeypatch.delenv("LENGEN_CPU_ISA", raising=False)
    assert ext.cpu_isa() == best
    for level in _available():
        monkeypatch.setenv("LENGEN_CPU_ISA", level)
        assert ext.cpu_isa() == level
    monkeypatch.setenv("LENGEN_CPU_ISA", "auto")
    assert ext.cpu_isa() == best
    monkeypatch.setenv("LENGEN_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="LENGEN_CPU_ISA must be one of portable, avx2, avx512, auto"):
        ext.cpu_isa()
    with pytest.raises(ValueError, match="LENGEN_CPU_ISA"):  # raised before any work, from the kernel too
        ext.data_decompose(np.arange(10, dtype=np.int64), 1, 8, True, True)
    for level in LEVELS[LEVELS.index(best) + 1:]:
        monkeypatch.setenv("LENGEN_CPU_ISA", level)
        with pytest.raises(ValueError, match=f"LENGEN_CPU_ISA={level} but this CPU supports at most '{best}'"):
            ext.cpu_isa()


def _decompose_arrays(lengths, lo, hi, remainder):
    d, s, rd, rs, rl, *stats = ext.data_decompose(np.asarray(lengths, np.int64), lo, hi, remainder, True)
    return [*d, *s, rd, rs, rl], stats


@needs_ext
@pytest.mark.parametrize("level", [lv for lv in LEVELS[1:]])
def test_isa_paths_are_bitwise_equal(level, monkeypatch):
    if level not in _available():
        pytest.skip(f"this CPU has no {level} (best: {ext.cpu_isa_detected()})")
    cases = [
        # (lengths, min_len, max_len, remainder): > 100k documents runs the 2-thread split
        (synthetic_lengths(300_000, seed=11, mean=3000, sigma=1.5), 64, 8192, True),
        (synthetic_lengths(300_000, seed=12, mean=500, sigma=2.0), 1, 1 << 20, False),
        (synthetic_lengths(5_003, seed=13, mean=2000, sigma=1.0), 256, 256, True),
        (np.r_[np.arange(0, 70), (1 << 31) - 1, 2, 3], 1, 1 << 30, True),   # int32 outputs, bit 30 set
        (np.r_[np.arange(0, 70), 1 << 33], 16, 1 << 12, True),              # int64 outputs: the portable fill
        (np.zeros(17, np.int64), 1, 64, True),
        (np.zeros(0, np.int64), 1, 64, True),
    ]
    for lengths, lo, hi, rem in cases:
        monkeypatch.setenv("LENGEN_CPU_ISA", "portable")
        want, want_stats = _decompose_arrays(lengths, lo, hi, rem)
        monkeypatch.setenv("LENGEN_CPU_ISA", level)
        got, got_stats = _decompose_arrays(lengths, lo, hi, rem)
        assert got_stats == want_stats
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype
            assert g.tobytes() == w.tobytes()


@needs_ext
@pytest.mark.slow
@pytest.mark.parametrize("level", LEVELS)
def test_data_algorithms_pass_under_forced_isa(level):
    # The default run of test_data_algorithms.py already covers the detected best path (simd=True) and the
    # portable one (simd=False); this covers every level in between, in a fresh process.
    if level not in _available():
        pytest.skip(f"this CPU has no {level} (best: {ext.cpu_isa_detected()})")
    if level in ("portable", ext.cpu_isa_detected()):
        pytest.skip(f"{level} is run by test_data_algorithms.py itself")
    env = {**os.environ, "LENGEN_CPU_ISA": level}
    r = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "python_tests" / "test_data_algorithms.py"),
                        "-q", "-p", "no:cacheprovider", "-k", "decompose"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " passed" in r.stdout


def _pyproject() -> str:
    return (ROOT / "pyproject.toml").read_text()


def test_version_has_one_source():
    init = (ROOT / "lengen_fast" / "__init__.py").read_text()
    versions = re.findall(r'^__version__ = "([^"]+)"$', init, re.M)
    assert len(versions) == 1
    text = _pyproject()
    assert re.search(r'^dynamic = \["version"\]', text, re.M)
    assert not re.search(r"^version\s*=", text, re.M)  # no second copy in [project]
    assert 'provider = "scikit_build_core.metadata.regex"' in text
    assert 'input = "lengen_fast/__init__.py"' in text
    import lengen_fast
    assert lengen_fast.__version__ == versions[0]
    from importlib.metadata import PackageNotFoundError, version
    try:
        installed = version("lengen_fast")
    except PackageNotFoundError:
        return  # run from a checkout that was never installed
    if Path(lengen_fast.__file__).resolve().parent != ROOT / "lengen_fast":
        assert installed == lengen_fast.__version__


def test_no_module_over_450_lines():
    # Issue 20's rule for the package: each module answers one question, and none is over 450 lines.
    long = {str(f.relative_to(ROOT)): n for f in sorted((ROOT / "lengen_fast").rglob("*.py"))
            if (n := len(f.read_text().splitlines())) > 450}
    assert not long, f"modules over 450 lines: {long}"


def test_python_floor_matches_cmake():
    floor = re.search(r'^requires-python = ">=(\d+\.\d+)"$', _pyproject(), re.M).group(1)
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert re.search(rf"find_package\(Python {re.escape(floor)} REQUIRED", cmake)


def test_native_build_is_opt_in():
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert re.search(r'option\(LENGEN_NATIVE "[^"]*" OFF\)', cmake)


def test_every_runtime_dependency_is_imported():
    # A declared dependency that nothing imports is dead weight for every install (numba was one).
    text = _pyproject()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.M | re.S).group(1)
    names = [re.match(r'\s*"([A-Za-z0-9_.-]+)', line).group(1) for line in block.splitlines() if line.strip()]
    sources = "\n".join(p.read_text() for p in (ROOT / "lengen_fast").rglob("*.py"))
    for name in names:
        mod = name.replace("-", "_").lower()
        assert re.search(rf"^\s*(import|from) {mod}\b", sources, re.M), f"{name} is declared but never imported"
