"""The declared version of the numbers this library computes.

Benchmark caches (``benchmarks/accuracy.py``, ``benchmarks/tune.py``) key a finished run on
its configuration and on :data:`NUMERICS_VERSION`, not on the source of the modules it ran:
moving, renaming or documenting code never invalidates hours of cached runs, and a change
that does alter results says so by bumping this number (docs/benchmarks.md, "Caches").

Bump it in the same commit as any change to what a run computes: model construction and
initialisation, local training, losses, aggregation (including float rounding, such as
the order of a sum), client selection and expert assignment, data loading, partitioning or
splitting, evaluation. ``tests/test_numerics.py`` pins a tiny deterministic run per version
and fails when the numbers move while this stays.

History:

1. every cache entry written before the version existed (keyed by module source hashes).
2. one aggregation rule per strategy: ``aggregate_round`` folds float64 running sums in
   client-id order and divides once, instead of normalising the weights first (FedCoE's
   batch results move by float rounding; FedAvg's are bit-identical on the pinned run).
3. robust aggregation by default (docs/design.md, "Robust aggregation"): every update's
   change clipped to an adaptive bound, the weight of ``num_samples`` capped (equal weights
   in the first round).
"""

from __future__ import annotations

NUMERICS_VERSION = 3

__all__ = ["NUMERICS_VERSION"]
