"""The user's job on squared circuits: a training step, a marginal query, exact samples.

The squared digits circuit ``|c|²/Z`` (``digits_squared_circuit(K)``, untrained, seed 0):

* ``TrainStep``: one Adam step (batch 256, lr 1e-2) on ``−mean log p(x)``, in cirkit's
  idiomatic pipeline (``cirkit``: ``c`` and ``∫ conjugate(c)·c`` compiled by cirkit with
  ``fold=True, optimize=True``; ``2 Re log c(x) − log Z`` from cirkit's forward) and in this
  package's exact fast path (``fast``: ``compile_density``); time and peak memory.
* ``Marginal``: ``log p(x_observed)`` with half of the pixels observed, batch 64: cirkit's
  own evaluation of the query (``cirkit``: its log-space code with the integration layer
  function) and the fast path (``fast``).
* ``Sample``: 16 exact samples by the chain rule (fast path only; K=32 since sampling
  takes one forward and backward per variable).
* ``Conditionals``: every pixel's distribution given the other observed ones (half of them
  observed, batch 64; fast path only: one forward and one backward).

Small K only, so the whole asv run stays within its budget. On a commit without these
APIs ``setup`` raises ``NotImplementedError`` (the benchmarks show as n/a).
"""

from __future__ import annotations

from typing import Dict

import torch

from . import _common as common

SEED = 0
BATCH = 256
QUERY_BATCH = 64
_MEMO: Dict[tuple, object] = {}


def _api():
    try:
        from adapters.cirkit.bench.circuits import digits_squared_circuit
        from adapters.cirkit.bench.train import CirkitPipeline
        from adapters.cirkit.model import compile_density
    except ImportError as exc:  # a commit before the training benchmark
        raise NotImplementedError(f"training and query APIs unavailable on this commit: {exc}") from exc
    return digits_squared_circuit, CirkitPipeline, compile_density


def _model(variant: str, k: int):
    key = (variant, k)
    if key not in _MEMO:
        _MEMO.clear()
        digits_squared_circuit, CirkitPipeline, compile_density = _api()
        circuit = digits_squared_circuit(k).circuit
        if variant == "cirkit":
            model = CirkitPipeline(circuit, num_categories=17, seed=SEED)
        else:
            model = compile_density(circuit, num_categories=17, seed=SEED)
        gen = torch.Generator().manual_seed(SEED)
        x = torch.randint(0, 17, (BATCH, 64), generator=gen)
        _MEMO[key] = (model, x)
    return _MEMO[key]


class TrainStep:
    params = [["cirkit", "fast"], [16, 32]]
    param_names = ("variant", "K")
    timeout = 300

    def setup(self, variant, k):
        common.ensure_threads()
        self.model, self.x = _model(variant, k)
        self.model.train()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-2)

    def _step(self):
        loss = -self.model.log_likelihood(self.x)[:, 0].mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def time_step(self, variant, k):
        self._step()

    def track_step_peak_mib(self, variant, k):
        return common.peak_rss_mib(self._step)

    track_step_peak_mib.unit = "MiB"


def _query(k: int, evaluation: str):
    """The fast path's model in eval mode with ``evaluation``, a query batch and half the
    pixels observed."""
    common.ensure_threads()
    model, x = _model("fast", k)
    model.eval()
    model.evaluation = evaluation
    return model, x[:QUERY_BATCH], torch.arange(64) < 32


class Marginal:
    params = [["cirkit", "fast"], [8, 16]]
    param_names = ("variant", "K")
    timeout = 300

    def setup(self, variant, k):
        self.model, self.x, self.observed = _query(k, "semiring" if variant == "cirkit" else "linear")

    def time_log_marginal(self, variant, k):
        with torch.no_grad():
            self.model.log_marginal(self.x, self.observed)

    def track_log_marginal_peak_mib(self, variant, k):
        def call():
            with torch.no_grad():
                return self.model.log_marginal(self.x, self.observed)

        return common.peak_rss_mib(call)

    track_log_marginal_peak_mib.unit = "MiB"


class Sample:
    params = [[8, 32]]
    param_names = ("K",)
    timeout = 300

    def setup(self, k):
        common.ensure_threads()
        self.model, _ = _model("fast", k)
        self.model.eval()
        self.model.evaluation = "linear"

    def time_sample_16(self, k):
        self.model.sample(16, generator=torch.Generator().manual_seed(SEED))


class Conditionals:
    params = [[8, 16]]
    param_names = ("K",)
    timeout = 300

    def setup(self, k):
        self.model, self.x, self.observed = _query(k, "linear")
        if not hasattr(self.model, "conditionals"):
            raise NotImplementedError("CircuitDensity.conditionals unavailable on this commit")

    def time_conditionals(self, k):
        self.model.conditionals(self.x, self.observed)
