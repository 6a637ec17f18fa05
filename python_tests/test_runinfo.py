"""Does a report say how it ran? lengen_fast.train.runinfo in one process and under a 2-process gloo group."""
import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import lengen_fast
from lengen_fast.train import runinfo

WORLD = 2
ROOT = Path(__file__).resolve().parents[1]


def _worker(rank: int, port: int, out: str):
    # torchrun's environment, as python_tests/test_distributed.py sets it
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist
    dist.init_process_group("gloo")
    try:
        info = runinfo.collect(device="cpu", dtype=torch.float32, parallel="ddp")
        header = runinfo.render_header(info)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps({"info": info, "header": header}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("runinfo")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_two_process_run_says_it_ran_with_two_processes(two_ranks):
    for rank, res in enumerate(two_ranks):
        p = res["info"]["processes"]
        assert p["world_size"] == 2
        assert p["rank"] == rank
        assert p["local_world_size"] == 2
        assert p["process_group"] == "gloo"
        assert p["parallel"] == "ddp"
        assert "- processes: 2 processes (ddp, gloo" in res["header"]
    a, b = (r["info"] for r in two_ranks)
    assert a["versions"] == b["versions"] and a["backends"] == b["backends"] and a["git"] == b["git"]
    assert a["dtype"] == "float32"


def test_one_process_fields(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    info = runinfo.collect(device="cpu", dtype="bfloat16")
    json.dumps(info)  # report.json must be able to hold it as it is
    assert info["processes"] == {"world_size": 1, "rank": 0, "local_world_size": 1, "process_group": "",
                                 "parallel": "none", "launcher": ""}
    assert info["device"]["type"] == "cpu" and info["device"]["count"] == 1 and info["device"]["name"]
    assert info["dtype"] == "bfloat16"
    assert info["command"] == shlex.join(sys.orig_argv)
    v = info["versions"]
    assert v["torch"] == torch.__version__ and v["lengen_fast"] == lengen_fast.__version__
    for name in ("triton", "transformers"):
        try:
            __import__(name)
            assert v[name] is not None
        except ImportError:
            assert v[name] is None
    from lengen_fast import backends
    assert set(info["backends"]) == {"attention", "rope", "data", "cpu_isa"}
    ext = backends.cpu_ext()
    if ext is not None:
        assert info["backends"]["data"] == "cpu" and info["backends"]["cpu_isa"] == ext.cpu_isa()
    header = runinfo.render_header(info)
    assert header.startswith("## How this ran\n")
    for fact in ("- processes: 1 process\n", "- dtype: bfloat16", f"torch {torch.__version__}",
                 f"lengen_fast {lengen_fast.__version__}", f"data: {info['backends']['data']}"):
        assert fact in header


def test_backends_follow_the_request_and_the_environment(monkeypatch):
    monkeypatch.delenv("LENGEN_BACKEND", raising=False)
    assert runinfo.chosen_backends("cpu", {"attention": "reference"})["attention"] == "reference"
    monkeypatch.setenv("LENGEN_BACKEND", "reference")
    got = runinfo.chosen_backends("cpu")
    assert got["attention"] == got["rope"] == got["data"] == "reference"


def test_git_revision_of_a_checkout():
    pkg_root = Path(lengen_fast.__file__).resolve().parent.parent
    rev = runinfo.git_revision()
    if not (pkg_root / ".git").exists():
        assert rev is None  # an installed wheel
        return
    head = subprocess.run(["git", "-C", str(pkg_root), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert rev["commit"] == head and isinstance(rev["dirty"], bool)
    assert f"`{head[:12]}`" in runinfo.render_header(runinfo.collect())


def test_command_line_is_the_exact_argv(monkeypatch):
    monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "lengen_fast.train", "--preset", "my run"])
    assert runinfo.command_line() == "python -m lengen_fast.train --preset 'my run'"
