"""lengen-eval: how far does a checkpoint generalize past its training length, with and without RoPE scaling?

    lengen-eval path/to/checkpoint [--context L] [--scaling none,linear,ntk,dynamic,yarn,llama3] [--out DIR]

Parsing only: every flag maps onto one field of :class:`~lengen_fast.eval.config.EvalConfig`; the run is
:func:`~lengen_fast.eval.api.run`. Bad input exits with status 2 and one line naming the file, key or flag.
"""
from __future__ import annotations

import argparse
import sys

from .config import DTYPES, EvalConfig, EvalError


def _floats(s: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def parser() -> argparse.ArgumentParser:
    d = EvalConfig(model="")
    p = argparse.ArgumentParser(
        prog="lengen-eval",
        description="Loss by position and passkey retrieval at 1-8x the trained context of a transformers causal LM "
                    "checkpoint or one of ours, under RoPE scaling arms applied at evaluation time, with intervals "
                    "over documents and paired verdicts against no scaling.")
    p.add_argument("model", help="a transformers checkpoint directory (config.json + weights + tokenizer), a "
                                 "directory written by export_llama, or a .pt checkpoint of ours")
    p.add_argument("--out", default=d.out, help="report directory (default: ./lengen-eval-<model name>)")
    p.add_argument("--context", type=int, default=None,
                   help="trained context L (default: the config's rope original_max_position_embeddings when scaled, "
                        "else max_position_embeddings; required for .pt checkpoints)")
    p.add_argument("--multiples", type=_floats, default=d.multiples,
                   help="bucket ends and passkey lengths in units of L (default: 1,2,4,8)")
    p.add_argument("--scaling", type=lambda s: [x for x in s.split(",") if x.strip()], default=d.scaling,
                   help="arms: none, config, linear, ntk, dynamic, yarn, llama3, each optionally :factor "
                        "(default: none,linear,ntk,dynamic,yarn,llama3)")
    p.add_argument("--factor", type=float, default=None,
                   help="factor of arms given without one (default: the largest multiple)")
    p.add_argument("--data", default=d.data, help="a `lengen-data prepare` directory tokenized with the model's "
                                                  "tokenizer (default: the embedded corpus, the Python stdlib)")
    p.add_argument("--tokenizer", default=d.tokenizer, help="tokenizer directory (default: the model directory's; "
                                                            "for .pt checkpoints the byte tokenizer)")
    p.add_argument("--docs", type=int, default=d.docs, help="documents for loss by position (default: 8)")
    p.add_argument("--passkey-trials", type=int, default=d.passkey_trials,
                   help="passkey prompts per (length, depth); 0 skips passkey (default: 4)")
    p.add_argument("--passkey-depths", type=_floats, default=d.passkey_depths,
                   help="needle depths in [0, 1] (default: 0,0.25,0.5,0.75,1)")
    p.add_argument("--device", default=d.device, help="torch device (default: cpu)")
    p.add_argument("--dtype", default=d.dtype, choices=DTYPES, help="parameter dtype (default: float32)")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens,
                   help="tokens per forward (memory); at least the longest sequence, max multiple x L + 1 "
                        "(default: 32768)")
    p.add_argument("--loss-chunk", type=int, default=d.loss_chunk, help="logit rows formed at once (default: 4096)")
    p.add_argument("--seed", type=int, default=d.seed, help="document order (--data) and passkey keys (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar / lines")
    return p


def config_from_args(a) -> EvalConfig:
    return EvalConfig(model=a.model, out=a.out, context=a.context, multiples=a.multiples, scaling=a.scaling,
                      factor=a.factor, data=a.data, tokenizer=a.tokenizer, docs=a.docs,
                      passkey_trials=a.passkey_trials, passkey_depths=a.passkey_depths, device=a.device,
                      dtype=a.dtype, max_tokens=a.max_tokens, loss_chunk=a.loss_chunk, seed=a.seed,
                      progress=not a.no_progress)


def main(argv=None) -> int:
    from .api import run

    args = parser().parse_args(argv)
    try:
        out = run(config_from_args(args))
    except EvalError as e:
        print(f"lengen-eval: error: {e}", file=sys.stderr)
        return 2
    print(f"lengen-eval: wrote {out / 'report.md'}, report.json, loss_by_position.png"
          + (", passkey_heatmap.png" if args.passkey_trials else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
