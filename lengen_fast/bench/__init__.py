"""The microbenchmark suite, shipped with the package: how fast is each op against its peers on this machine?

One module per op (bench_attention, bench_rope, bench_data; bench_lm times one training step per lengen-train lm arm),
the shared runner (common) and the plots (plot).
Run them all with ``lengen-bench --out DIR`` (``--quick`` for a smoke run), or one with
``python -m lengen_fast.bench.bench_<op> --out DIR``. Rows go to DIR/results.csv; the repository's
bench/results.csv is the record of the published figures (bench/gpu_check.sh writes there).
"""
