"""The README's "Train a squared circuit" block runs as written (at a small K, to stay quick)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = next(p for p in Path(__file__).resolve().parents if (p / "README.md").is_file()) / "README.md"


def test_train_a_squared_circuit_block_runs():
    text = README.read_text()
    section = text[text.index("### Train a squared circuit"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code = code.replace("digits_squared_circuit(64)", "digits_squared_circuit(4)")  # same code, small K
    scope: dict = {}
    with torch.random.fork_rng():
        exec(compile(code, str(README), "exec"), scope)  # noqa: S102 -- our own README
    samples = scope["samples"]
    assert samples.shape == (16, 64) and int(samples.min()) >= 0 and int(samples.max()) <= 16
    assert scope["model"].log_marginal(scope["x_test"][:3], scope["half"]).shape == (3, 1)
