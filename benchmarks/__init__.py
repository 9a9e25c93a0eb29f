"""Side-by-side benchmarks, run from the repository's root: `python -m benchmarks.bench`,
`python -m benchmarks.bench_inference`."""
