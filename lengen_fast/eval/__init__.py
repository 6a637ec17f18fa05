"""lengen-eval: how far does a checkpoint generalize past its trained context, with and without RoPE scaling?

    from lengen_fast.eval import EvalConfig, evaluate, write_report
    result = evaluate(EvalConfig(model="path/to/checkpoint", scaling=["none", "yarn:4"]))
    write_report(result, "report/")

One module per question:
  config.py      which settings define a run (EvalConfig, EvalError)
  checkpoint.py  what model is at a path, its tokenizer and trained context (HF directory or our .pt)
  arms.py        which RoPE scaling arms run, each checked against transformers' rotary embedding
  documents.py   which documents and haystack, in the model's tokens (prepared directory or embedded corpus)
  passkey.py     how passkey prompts are built and scored
  runner.py      how a model runs over documents within --max-tokens (packing, memory checks)
  report.py      statistics (train/stats.py), report.md / report.json / PNGs
  api.py         one run start to end (evaluate, run);  cli.py: the console script
"""
from .api import EvalResult, evaluate, run
from .config import EvalConfig, EvalError
from .report import summarize, write_report

__all__ = ["EvalConfig", "EvalError", "EvalResult", "evaluate", "run", "summarize", "write_report"]
