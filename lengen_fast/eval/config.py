"""Which settings define a lengen-eval run? One typed config, one CLI flag per field (``--max-tokens`` -> max_tokens)."""
from __future__ import annotations

from dataclasses import dataclass, field

DTYPES = ("float32", "bfloat16", "float16")


class EvalError(ValueError):
    """Bad input to lengen-eval: the message names the file, key or flag. Nothing has been written when raised."""


@dataclass
class EvalConfig:
    model: str                                          # checkpoint directory (transformers) or .pt file (ours)
    out: str = ""                                       # report directory; "" = ./lengen-eval-<model name>
    context: int | None = None                          # L, the trained context; None = from the model's config
    multiples: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0])   # bucket ends / passkey lengths x L
    scaling: list[str] = field(default_factory=lambda: ["none", "linear", "ntk", "dynamic", "yarn", "llama3"])
    factor: float | None = None                         # factor of arms given without one; None = max(multiples)
    data: str = ""                                      # a `lengen-data prepare` directory; "" = the embedded corpus
    tokenizer: str = ""                                 # "" = the model directory's (ours: the byte tokenizer)
    docs: int = 8                                       # documents for loss by position
    passkey_trials: int = 4                             # prompts per (length, depth); 0 = no passkey
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    device: str = "cpu"
    dtype: str = "float32"
    max_tokens: int = 32768                             # tokens per forward (memory); >= the longest sequence
    loss_chunk: int = 4096                              # rows of logits formed at once by the loss
    seed: int = 0
    progress: bool = True


def check_config(c: EvalConfig) -> None:
    """Refuse values that cannot run, naming the flag."""
    def pos_int(name, v):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise EvalError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")

    if c.context is not None:
        pos_int("context", c.context)
    for name in ("docs", "max_tokens", "loss_chunk"):
        pos_int(name, getattr(c, name))
    if not isinstance(c.passkey_trials, int) or c.passkey_trials < 0:
        raise EvalError(f"--passkey-trials must be an integer >= 0, got {c.passkey_trials!r}")
    if not c.multiples or any(not (m > 0) for m in c.multiples) or sorted(c.multiples) != list(c.multiples) \
            or len(set(c.multiples)) != len(c.multiples):
        raise EvalError(f"--multiples must be increasing positive numbers (bucket ends in units of L), got {c.multiples}")
    if not c.passkey_depths or any(not (0.0 <= d <= 1.0) for d in c.passkey_depths):
        raise EvalError(f"--passkey-depths must be fractions in [0, 1], got {c.passkey_depths}")
    if c.factor is not None and not c.factor >= 1.0:
        raise EvalError(f"--factor must be >= 1, got {c.factor}")
    if c.dtype not in DTYPES:
        raise EvalError(f"--dtype must be one of {DTYPES}, got {c.dtype!r}")
    if not c.scaling:
        raise EvalError("--scaling needs at least one arm (e.g. none)")
