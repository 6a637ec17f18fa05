"""Do progress reports stay readable in a log? Line counts of lengen_fast.progress off a terminal, and tqdm on one."""
import io
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import lengen_fast
from lengen_fast.progress import PlainProgress, progress

PKG_PARENT = Path(lengen_fast.__file__).resolve().parent.parent


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_plain_lines_at_most_every_interval_plus_events():
    out, clock = io.StringIO(), FakeClock()
    bar = PlainProgress(100, desc="vsl seed 0", interval_s=5.0, stream=out, clock=clock)
    for step in range(1, 101):
        clock.t += 0.125                       # 8 steps per second: 12.5 s in all
        bar.set_postfix(loss=f"{1 / step:.3f}")
        bar.update(1)
        if step % 50 == 0:
            bar.event("eval", id="0.90", ood="0.10")
    bar.close()
    bar.close()                                # a second close prints nothing
    lines = out.getvalue().splitlines()
    # start, the 5 s and 10 s lines (steps 40 and 80), two evaluations, done
    assert len(lines) == 6, lines
    assert lines[0] == "[vsl seed 0] start at step 0 of 100"
    assert lines[1].startswith("[vsl seed 0] step 40/100 (40%) | 8.00 it/s, elapsed 0:05 | eta 0:07 | loss=0.025")
    assert lines[2] == "[vsl seed 0] step 50: eval id=0.90 ood=0.10"
    assert lines[3].startswith("[vsl seed 0] step 80/100 (80%)")
    assert lines[4] == "[vsl seed 0] step 100: eval id=0.90 ood=0.10"
    assert lines[5].startswith("[vsl seed 0] done: step 100/100 (100%) | 8.00 it/s, elapsed 0:12")
    assert "\r" not in out.getvalue()


def test_plain_lines_in_bytes():
    # lengen-data prepare counts bytes of text: amounts and rates get SI prefixes instead of "step N" and it/s.
    out, clock = io.StringIO(), FakeClock()
    bar = PlainProgress(40_000_000, desc="prepare", initial=1_500_000, interval_s=5.0, stream=out, clock=clock,
                        unit="B")
    clock.t += 6.0
    bar.update(12_000_000)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "[prepare] start at 1.5 MB of 40.0 MB"
    assert lines[1].startswith("[prepare] 13.5 MB/40.0 MB (34%) | 2.0 MB/s, elapsed 0:06 | eta 0:13")
    assert lines[2].startswith("[prepare] done: 13.5 MB/40.0 MB (34%)")


def test_a_short_run_redirected_to_a_pipe_writes_four_lines(tmp_path):
    # A real process whose stderr is a pipe (not a terminal): 2000 steps, 2 evaluations, the default helper.
    script = textwrap.dedent("""
        from lengen_fast.progress import progress
        bar = progress(total=2000, desc="quick")
        for step in range(1, 2001):
            bar.set_postfix(loss=step)
            bar.update(1)
            if step % 1000 == 0:
                bar.event("eval", ood=step)
        bar.close()
    """)
    env = {"PYTHONPATH": str(PKG_PARENT), "LENGEN_PROGRESS_INTERVAL": "3600", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 4, lines              # start, two evaluations, done: no per-step redraws
    assert [ln.split("] ", 1)[1].split(":")[0] for ln in lines] == ["start at step 0 of 2000", "step 1000",
                                                                    "step 2000", "done"]
    assert r.stdout == ""


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_tqdm_with_evaluations_in_the_postfix():
    term = FakeTerminal()
    bar = progress(total=10, desc="t", stream=term)
    assert type(bar.bar).__name__ == "tqdm" or "tqdm" in type(bar.bar).__module__
    bar.set_postfix(loss="1.0")
    bar.update(5)
    bar.event("eval", ood="0.5")
    assert bar.bar.postfix == "loss=1.0, ood=0.5"
    bar.close()
    assert "\r" in term.getvalue()             # tqdm redraws in place
    assert progress(total=10, stream=term, tty=False).__class__ is PlainProgress


def test_disabled_writes_nothing_and_bad_interval_is_refused(monkeypatch):
    out = io.StringIO()
    bar = progress(total=5, stream=out, enabled=False)
    bar.update(1)
    bar.event("eval", x=1)
    bar.close()
    assert out.getvalue() == ""
    with pytest.raises(ValueError, match="interval_s must be > 0 seconds"):
        PlainProgress(5, interval_s=0, stream=out)
    monkeypatch.setenv("LENGEN_PROGRESS_INTERVAL", "2.5")
    assert PlainProgress(5, stream=out).interval_s == 2.5
