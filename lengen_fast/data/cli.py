"""``lengen-data``: which commands turn a text corpus into training data and check it?

    lengen-data prepare corpus/ --out tokens/ --tokenizer tokenizer.json   # text -> token shards
    lengen-data audit tokens/ --context 2048                               # lengths vs the plan

``prepare`` is :func:`lengen_fast.data.prepare.prepare`; ``audit`` opens any token source that
``open_tokens`` takes (a prepared directory, shards, a glob, one file) and prints its audit.
"""
from __future__ import annotations

import argparse
import json
import sys

from . import prepare as prep


def _audit(args) -> int:
    from .audit import audit
    from .source import open_tokens
    if args.verify:
        prep.verify_prepared(args.path)
    src = open_tokens(args.path, column=args.column)
    rep = audit(src, context_len=args.context, min_len=args.min_len)
    print(json.dumps(rep.to_dict(), indent=1) if args.json else rep)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lengen-data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("prepare", help="tokenize a text corpus into memory-mapped Arrow shards")
    prep.add_arguments(pp)
    pa_ = sub.add_parser("audit", help="print the length audit of token data")
    pa_.add_argument("path", help="a prepared directory, a directory/glob of shards, or one Parquet/IPC file")
    pa_.add_argument("--context", type=int, default=None, help="the planned context length L")
    pa_.add_argument("--min-len", type=int, default=256, help="shortest decomposition bucket")
    pa_.add_argument("--column", default="input_ids")
    pa_.add_argument("--json", action="store_true", help="print the report as JSON")
    pa_.add_argument("--verify", action="store_true", help="first check every shard's sha256 against the manifest")
    args = p.parse_args(argv)
    try:
        return prep.run(args) if args.command == "prepare" else _audit(args)
    except prep.ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
