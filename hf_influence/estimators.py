"""Gradient estimators: how an example's K draws of (t, ε) are chosen.

A per-example gradient is the expectation of the per-draw gradient over the training density of t and ε, and
its Monte-Carlo noise is what limits attribution at few draws. Each option below keeps the estimate unbiased
and lowers its variance; they combine (`"stratified+antithetic"`):

* `plain` — K independent draws (the paper's estimator).
* `stratified` — the timesteps of an example cover the density evenly: draw `k` takes its `u` in the k-th
  of K equal strata, `u_k = (k + U_k) / K`, through the density's quantile function.
* `antithetic` — noise in pairs `(ε, −ε)` at the same timestep (and the same VAE posterior noise sign), which
  cancels the odd part of the loss in ε.
* `common` — common random numbers: every example, training and query alike, gets the same K draws (seeded by
  the seed and the stream's side, not the example). The noise shared by all examples then cancels in the
  ranking of training examples for a query, which is what attribution reads.
"""

from __future__ import annotations

from dataclasses import dataclass

from .validation import check_str

OPTIONS = ("stratified", "antithetic", "common")


@dataclass(frozen=True)
class Estimator:
    """Which variance-reduction options are on (see the module)."""

    stratified: bool = False
    antithetic: bool = False
    common: bool = False

    @classmethod
    def named(cls, name: str) -> Estimator:
        """From a name: "plain", or options joined by "+" ("stratified+antithetic+common")."""
        check_str("estimator", name)
        if name == "plain":
            return cls()
        parts = name.split("+")
        unknown = [part for part in parts if part not in OPTIONS]
        if unknown or len(set(parts)) != len(parts):
            raise ValueError(f"estimator must be 'plain' or options among {OPTIONS} joined by '+', got {name!r}.")
        return cls(**dict.fromkeys(parts, True))

    @property
    def name(self) -> str:
        parts = [option for option in OPTIONS if getattr(self, option)]
        return "+".join(parts) if parts else "plain"


PLAIN = Estimator()
# The default of the index and of pairwise scores: on benchmarks/lds_mnist.py's ground truth (4 seeds) it never
# lost to plain draws, 8 to 64 draws per side, and at 8 draws scored what plain draws score at 64
# (benchmarks/results/lds_draws.json). The low-level draw functions keep PLAIN: they are the definition.
DEFAULT_ESTIMATOR = "common"
