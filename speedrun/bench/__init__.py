"""Benchmarks: kernel variants (kernels_bench), training steps (train_bench), the kernel sets' convergence
(converge); how they measure (measure) and what they run (kernel_cases). Command line: speedrun/bench/cli.py."""
