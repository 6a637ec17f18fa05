"""`lengen-data prepare` is crash-safe and restartable.

A run is SIGKILLed at each point of its life ($LENGEN_PREPARE_HOOK); then open_tokens refuses the directory
naming what is missing (or reads it whole, once complete), and the same command finishes it byte for byte as an
uninterrupted run, manifest included. One writer per directory (a lock; a dead owner's lock is taken over), a
worker killed under the pool, and a full disk. Most runs are forked processes (a fresh interpreter imports torch,
seconds per run); runs that train a tokenizer, and one more test, use `python -m`.
"""
import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lengen_fast.data import open_tokens
from lengen_fast.data.prepare import HOOK_ENV
from lengen_fast.data.shards import LOCK_NAME
from lengen_fast.data.tokenizer import train_bpe
from helpers.subproc import pkg_env  # noqa: E402

pytest.importorskip("tiktoken")
WORDS = ["alpha", "beta", "gamma", "délta", "ε", "zeta", "θ", "iota", "kappa", "λ", "\n", "  ", "数据", "def", "()"]


def _texts(n, seed):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(0, 80)))) for _ in range(n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A corpus of JSONL, Parquet and text files cut into 12-16 shards, a tokenizer, and the reference runs."""
    d = tmp_path_factory.mktemp("crash")
    src = d / "in"
    src.mkdir()
    with open(src / "a.jsonl", "w") as f:
        for t in _texts(300, 0):
            f.write(json.dumps({"text": t}) + "\n")
    pq.write_table(pa.table({"text": _texts(200, 1)}), src / "b.parquet", row_group_size=40)
    for i, t in enumerate(_texts(5, 2)):
        (src / f"c{i}.txt").write_text(t)
    train_bpe(_texts(200, 3), 400).save(str(d / "tok.json"))
    given = ["--tokenizer", str(d / "tok.json")]
    refs = {}
    for name, tok in (("given", given), ("trained", ["--train-tokenizer", "400"])):
        rc, log = _cli(d / f"ref-{name}", tok, d / f"ref-{name}.log", base=src)
        assert rc == 0, log
        refs[name] = _files(d / f"ref-{name}")
    n = json.loads(refs["given"]["manifest.json"])["totals"]["shards"]
    assert 10 <= n <= 24, n
    return {"dir": d, "src": src, "given": given, "refs": refs, "n": n}


def _files(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _child(argv, hook, log):
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.environ.pop(HOOK_ENV, None)
    if hook:
        os.environ[HOOK_ENV] = hook
    from lengen_fast.data import cli
    code = 1
    try:
        code = cli.main(argv)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _start(out, tok, log, hook=None, base=None, workers=1, extra=()):
    argv = ["prepare", str(base), "--out", str(out), *tok, "--shard-mb", "0.008", "--workers", str(workers),
            "--no-progress", *extra]
    p = mp.get_context("fork").Process(target=_child, args=(argv, hook, str(log)))
    p.start()
    return p


def _cli(out, tok, log, hook=None, base=None, workers=1, extra=(), timeout=120):
    """(exit code: -9 when SIGKILLed, the run's stdout+stderr). Training runs in a fresh interpreter: rustbpe's
    thread pool does not survive a fork of a process that has used it (this one has, in other tests)."""
    if "--train-tokenizer" in tok:
        argv = ["prepare", str(base), "--out", str(out), *tok, "--shard-mb", "0.008", "--workers", str(workers),
                "--no-progress", *extra]
        env = pkg_env()
        env.pop(HOOK_ENV, None)
        env.update({HOOK_ENV: hook} if hook else {})
        r = subprocess.run([sys.executable, "-m", "lengen_fast.data.cli", *argv], env=env, capture_output=True,
                           text=True, timeout=timeout)
        return r.returncode, r.stdout + r.stderr
    p = _start(out, tok, log, hook, base, workers, extra)
    p.join(timeout)
    assert p.exitcode is not None, f"prepare did not end in {timeout} s"
    return p.exitcode, Path(log).read_text()


# (hook, workers, tokenizer, what open_tokens says after the kill: a regex, or None = reads it whole)
KILLS = [
    ("kill@locked", 1, "given", r"has no manifest\.json and no token shards"),
    ("kill@manifest", 2, "given", r"did not finish: (\d+) of \1 shards are not finished \(first: 'shard-00000\.arrow'\)"),
    ("kill@tokenizer", 1, "trained", r"did not finish: (\d+) of \1 shards .*first: 'shard-00000\.arrow'"),
    ("kill@shard:3", 1, "given", r"did not finish: \d+ of \d+ shards are not finished \(first: 'shard-00003\.arrow'\)"),
    ("kill@shard:2", 2, "trained", r"did not finish: \d+ of \d+ shards are not finished \(first: 'shard-000\d\d"),
    ("kill@write:4", 1, "given", r"not finished \(first: 'shard-00004\.arrow'\)"),
    ("kill@write:5", 2, "given", r"did not finish: \d+ of \d+ shards are not finished"),
    ("kill@finish", 2, "given", r"every shard is written but the manifest was not finalized"),
    ("kill@done", 1, "given", None),
]


@pytest.mark.parametrize("hook,workers,tok,after", KILLS, ids=[f"{k[0]}-w{k[1]}-{k[2]}" for k in KILLS])
def test_sigkill_then_rerun_gives_the_same_bytes(tmp_path, setup, hook, workers, tok, after):
    out = tmp_path / "out"
    tok_args = setup["given"] if tok == "given" else ["--train-tokenizer", "400"]
    rc, log = _cli(out, tok_args, tmp_path / "1.log", hook=hook, base=setup["src"], workers=workers)
    assert rc == -9, log
    ref = setup["refs"][tok]
    if after is None:  # killed after the final manifest: complete, only the lock file is left
        assert json.loads((out / "manifest.json").read_bytes()) == json.loads(ref["manifest.json"])
        assert len(open_tokens(out)) == json.loads(ref["manifest.json"])["totals"]["docs"]
    else:
        with pytest.raises((ValueError, FileNotFoundError), match=after):
            open_tokens(out)
    if hook.startswith("kill@write"):  # the shard being written is only a temporary file
        idx = int(hook.split(":")[1])
        assert [p.name for p in out.glob(f".tmp-shard-{idx:05d}.arrow.*")] and not (out / f"shard-{idx:05d}.arrow").exists()
    assert (out / LOCK_NAME).exists()
    rc, log = _cli(out, tok_args, tmp_path / "2.log", base=setup["src"], workers=workers)
    assert rc == 0, log
    assert re.search(r"taking over the stale lock '.*\.lengen-prepare\.lock' left by pid \d+ on .* \(no longer running\)",
                     log), log
    if hook in ("kill@shard:3", "kill@finish"):
        assert "resuming: " in log
    assert _files(out) == ref  # every file, byte for byte; no lock, no temporary file left


def test_a_second_run_refuses_the_directory_then_takes_over_a_dead_owners_lock(tmp_path, setup):
    out = tmp_path / "out"
    a = _start(out, setup["given"], tmp_path / "a.log", hook="pause@shard:2", base=setup["src"], workers=1)
    for _ in range(600):
        m = re.search(r"\[hook\] paused at shard:2 pid (\d+)", (tmp_path / "a.log").read_text()
                      if (tmp_path / "a.log").exists() else "")
        if m:
            break
        time.sleep(0.1)
    assert m, (tmp_path / "a.log").read_text()
    try:
        rc, log = _cli(out, setup["given"], tmp_path / "b.log", base=setup["src"])
        assert rc == 2
        assert re.search(rf"error: '.*out' is being prepared by another process \(pid {a.pid} on .*; lock "
                         r"'.*out/\.lengen-prepare\.lock'\)", log), log
        with pytest.raises(ValueError, match="the preparation did not finish"):
            open_tokens(out)
    finally:
        a.kill()
        a.join()
    rc, log = _cli(out, setup["given"], tmp_path / "c.log", base=setup["src"])
    assert rc == 0, log
    assert f"left by pid {a.pid} on" in log and "no longer running" in log and "resuming: 2 of" in log
    assert _files(out) == setup["refs"]["given"]


def test_a_worker_killed_under_the_pool_is_an_error_not_a_hang(tmp_path, setup):
    out = tmp_path / "out"
    rc, log = _cli(out, setup["given"], tmp_path / "1.log", hook="killself@write:3", base=setup["src"], workers=2)
    assert rc == 2, log
    assert "error: prepare: a worker process died while writing" in log and "rerun the same command" in log
    assert not (out / LOCK_NAME).exists()  # released on the error
    rc, log = _cli(out, setup["given"], tmp_path / "2.log", base=setup["src"], workers=2)
    assert rc == 0, log
    assert _files(out) == setup["refs"]["given"]


def test_through_the_command_line_entry_point(tmp_path, setup):
    """The same through a fresh interpreter (`python -m lengen_fast.data.prepare`)."""
    out = tmp_path / "out"
    env = pkg_env(**{HOOK_ENV: "kill@shard:1"})
    cmd = [sys.executable, "-m", "lengen_fast.data.prepare", str(setup["src"]), "--out", str(out), *setup["given"],
           "--shard-mb", "0.008", "--workers", "2", "--no-progress"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr
    env.pop(HOOK_ENV)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "taking over the stale lock" in r.stderr and "engine tiktoken" in r.stdout, r.stderr
    assert _files(out) == setup["refs"]["given"]


def _mount(path: Path, size: str, *opts) -> None:
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([*opts, f"size={size}"]), "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()})")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="a full disk is simulated with a small tmpfs, which only root can mount")
def test_full_disk_names_the_shard_and_leaves_no_partial_file(tmp_path, setup):
    mnt = tmp_path / "small"
    mnt.mkdir()
    ref = setup["refs"]["given"]
    pages = (lambda b: -(-b // 4096))  # tmpfs gives every file whole 4 KiB pages
    room = pages(len(ref["tokenizer.json"])) + 2 * pages(len(ref["manifest.json"])) + 2 + setup["n"] // 2
    _mount(mnt, f"{room * 4096}")
    try:
        out = mnt / "out"
        rc, log = _cli(out, setup["given"], tmp_path / "1.log", base=setup["src"], workers=2)
        assert rc == 2, log
        m = re.search(r"error: \[Errno 28\] no space left on the device while writing '([^']*/shard-\d+\.arrow)'", log)
        assert m and Path(m.group(1)).parent == out, log
        assert not list(out.glob(".tmp-*")) and not (out / LOCK_NAME).exists()
        for p in out.glob("shard-*.arrow"):  # whatever is under a shard's name is a finished shard
            assert p.read_bytes() == ref[p.name]
        with pytest.raises(ValueError, match=rf"did not finish: .*first: 'shard-\d+\.arrow'"):
            open_tokens(out)
        subprocess.run(["mount", "-o", "remount,size=16m", str(mnt)], check=True)
        rc, log = _cli(out, setup["given"], tmp_path / "2.log", base=setup["src"], workers=2)
        assert rc == 0, log
        assert _files(out) == ref
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
