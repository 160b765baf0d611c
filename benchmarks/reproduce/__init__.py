"""Reproductions of the paper's numbers (Table 1, seed studies): long runs, results in
benchmarks/results/."""
