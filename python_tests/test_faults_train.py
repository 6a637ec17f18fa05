"""Faults in training (issue 23): a rank killed mid-run (--nproc 2 and plain torchrun), a full disk under --out,
and resume after both. Every scenario runs in subprocesses, as a user's job would."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers.subproc import pkg_env  # noqa: E402

FLAGS = ["--tasks", "copy_unique", "--arms", "vsl,pack_masked", "--seeds", "1", "--no-extend", "--steps", "60",
         "--evals", "4", "--train-examples", "200", "--eval-examples", "4", "--train-max-len", "6",
         "--eval-multiples", "1,2", "--alphabet", "16", "--d-model", "16", "--n-layers", "1", "--n-heads", "2",
         "--max-positions", "128", "--tokens-per-batch", "128", "--threads", "1", "--workers", "1", "--no-progress"]


def env():
    return pkg_env(OMP_NUM_THREADS="1")


def results(out: Path) -> dict:
    rep = json.loads((out / "report.json").read_text())
    return {(r["arm"], r["seed"]): ([{k: v for k, v in h.items() if k != "train_time"} for h in r["history"]],
                                    r["test"], r["accounting"]) for r in rep["runs"]}


def rank_pid(launcher: psutil.Process, rank: int) -> int | None:
    for p in launcher.children(recursive=True):
        try:
            if p.environ().get("RANK") == str(rank) and "lengen_fast.train" in " ".join(p.cmdline()):
                return p.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    p = subprocess.run([sys.executable, "-m", "lengen_fast.train", "--nproc", "2", *FLAGS, "--out", str(out)],
                       env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return results(out)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["nproc", "torchrun"])
def test_a_killed_rank_stops_the_job_and_resume_is_exact(tmp_path, uninterrupted, launcher):
    out = tmp_path / "run"
    base = [sys.executable, "-m", "lengen_fast.train"] if launcher == "nproc" else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv_backend", "c10d",
         "--rdzv_endpoint", "127.0.0.1:0", "--monitor_interval", "0.5", "-m", "lengen_fast.train"]
    cmd = base + (["--nproc", "2"] if launcher == "nproc" else []) + FLAGS + ["--out", str(out)]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not list(out.glob("ckpt/*/last.pt")):          # at least one complete checkpoint, mid-run
            assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.2)
        pid = rank_pid(psutil.Process(proc.pid), 1)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        t0 = time.time()
        _, err = proc.communicate(timeout=120)
        took = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and took < 60, (proc.returncode, took)
    if launcher == "nproc":
        assert "lengen-train: error: rank 1 died (killed by SIGKILL" in err and "--resume" in err
    else:                                                    # torchrun's own summary names the lost rank
        assert "rank: 1" in err and "SIGKILL" in err
    assert not (out / "report.json").exists()                # nothing half-written where a reader looks
    assert not list(out.rglob(".tmp-*")) or all(p.stat().st_size >= 0 for p in out.rglob(".tmp-*"))
    p = subprocess.run([sys.executable, "-m", "lengen_fast.train", "--nproc", "2", *FLAGS, "--out", str(out),
                        "--resume"], env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert results(out) == uninterrupted                     # bit-exact with the run that was never killed


def _small_fs(tmp_path: Path, size: str) -> Path:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; the full-disk path is then untested here")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    return mnt


@pytest.mark.slow
def test_a_full_disk_under_out_is_a_clear_error_and_the_last_checkpoint_stays(tmp_path):
    mnt = _small_fs(tmp_path, "2m")
    try:
        out = mnt / "run"
        cmd = [sys.executable, "-m", "lengen_fast.train", *FLAGS, "--d-model", "128", "--n-heads", "4",
               "--out", str(out)]
        # a checkpoint of this model is ~1.6 MB (weights + AdamW state): the second one cannot fit next to the first
        p = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
        assert p.returncode == 2, p.stderr[-2000:]
        assert "no space left on the device while writing" in p.stderr and str(out) in p.stderr
        assert "Traceback" not in p.stderr
        assert not list(out.rglob(".tmp-*"))                 # no partial file left where a later run would look
        import torch
        cks = list(out.glob("ckpt/*/*.pt"))
        assert cks                                          # the disk filled after some checkpoints were written ...
        for ck in cks:                                       # ... and every one that exists is whole
            assert "model" in torch.load(ck, map_location="cpu", weights_only=False)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
