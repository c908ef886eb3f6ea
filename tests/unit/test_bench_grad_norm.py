"""benchmarks/bench_grad_norm.py on CPU with a tiny model: both sums of squares agree with the
float64 reference (the GPU run is what the benchmark is for; this keeps the script working)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_grad_norm  # noqa: E402


def test_both_methods_match_the_float64_reference(capsys):
    bench_grad_norm.main(["--device", "cpu", "--layers", "2", "--hidden", "64", "--kv-hidden", "16", "--ffn", "128",
                          "--vocab", "512", "--iters", "2"])
    out = capsys.readouterr().out
    diffs = dict(re.findall(r"^(\w+) .*relative difference to CPU float64 (\S+)$", out, re.M))
    assert set(diffs) == {"per_tensor", "foreach64"}, out
    assert all(float(value) < 1e-12 for value in diffs.values()), out
    assert out.startswith("15 tensors")  # embedding, 6 per layer, final norm, output layer
