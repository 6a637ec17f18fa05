"""How are N local data-parallel workers started, and how is a dead one reported? ``lengen-train --nproc N``.

torchrun's own launcher (torch.distributed.launcher) runs N copies of ``python -m lengen_fast.train argv`` with a
c10d rendezvous on a free loopback port. Its agent watches the workers: when one dies (a crash, SIGKILL, the OOM
killer), it stops the others within about a second and raises ChildFailedError, which becomes one clear message
naming the lost rank and how to resume. (Under plain torchrun the same agent does the same; distributed.py bounds
every collective by $LENGEN_DIST_TIMEOUT_S for the cases no agent sees.)
"""
from __future__ import annotations

import os
import sys
import uuid


def launch(nproc: int, argv: list[str]) -> int:
    """``lengen-train --nproc N``: run N local workers of ``python -m lengen_fast.train argv`` with
    torchrun's launcher (torch.distributed.launcher) and a c10d rendezvous on a free loopback port."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    lc = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                      rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.5)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        elastic_launch(lc, entrypoint=sys.executable)("-u", "-m", "lengen_fast.train", *argv)
    except ChildFailedError as e:
        print(f"lengen-train: error: {lost_ranks(e.failures)}. The last complete "
              "checkpoints are under --out: rerun the same command with --resume (and the same --nproc) to continue "
              "from them", file=sys.stderr)
        return 1
    return 0


def lost_ranks(failures: dict) -> str:
    """'rank 1 died (killed by SIGKILL, pid 123); rank 0 was stopped (SIGTERM, pid 122)' from torchrun's
    ProcessFailure records. The agent stops the survivors with SIGTERM, so a SIGTERM is "stopped", anything else
    (another signal, a non-zero exit) "died"; with only SIGTERMs (the job itself was terminated) all are listed."""
    def how(f):
        return f"killed by {f.signal_name()}" if f.exitcode < 0 else f"exit code {f.exitcode}"
    term = {r for r, f in failures.items() if f.exitcode < 0 and f.signal_name() == "SIGTERM"}
    died = [r for r in sorted(failures) if r not in term] or sorted(failures)
    parts = [f"rank {r} died ({how(failures[r])}, pid {failures[r].pid})" for r in died]
    parts += [f"rank {r} was stopped (SIGTERM, pid {failures[r].pid})" for r in sorted(term) if r not in died]
    return "; ".join(parts) or "a worker died"
