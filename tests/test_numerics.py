"""The declared numerics version (fedcoe_edge/numerics.py) moves with the numbers: a tiny
deterministic run is pinned per version, and the benchmark caches key on the version, not on
module source (docs/benchmarks.md, "Caches").

When this fails after a change that alters results, the change needs a bump: raise
``NUMERICS_VERSION`` and add the printed values under the new version here (keep the old
ones: they record what the committed caches were run with). When it fails after a change
that should not alter results, the change altered them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
import pytest
import torch

import fedcoe_edge as fe
from fedcoe_edge.numerics import NUMERICS_VERSION

DATASET = "numerics-tiny"
ALGORITHMS = ("fedcoe", "fedavg")

# version -> algorithm -> (norm, 8 fixed random projections) of the final global state
PINNED: dict[int, dict[str, list[float]]] = {
    1: {"fedcoe": [5.507578149652141, -0.14963039119014265, 0.021157389925971992, 0.14517988258008568,
                   -0.067104326879074, -0.08957022871314835, 0.15148019247514546, -0.039334014772927625,
                   -0.08700007906662388],
        "fedavg": [3.253314614374844, -0.11499339021609606, -0.17735350568693084, -0.14540890724954353,
                   -0.0027139244556946265, 0.013385076891138417, 0.023384199152488048,
                   0.09002756049776237, -0.15432631702712607]},
    2: {"fedcoe": [5.507578149652692, -0.149630391190726, 0.02115738991313342, 0.14517988258887937,
                   -0.06710432688413549, -0.08957022871416284, 0.15148019249463957, -0.03933401476671519,
                   -0.08700007907067583],
        "fedavg": [3.253314614374844, -0.11499339021609606, -0.17735350568693084, -0.14540890724954353,
                   -0.0027139244556946265, 0.013385076891138417, 0.023384199152488048,
                   0.09002756049776237, -0.15432631702712607]},
    3: {"fedcoe": [5.497912251584574, -0.14620230569011083, 0.017810404441473738, 0.14109786480959546,
                   -0.06418536998658575, -0.08804870434443633, 0.149729973747012, -0.03707207307780982,
                   -0.08688706828508647],
        "fedavg": [3.24989612585015, -0.11290318222329776, -0.1761479211539164, -0.1426971436794534,
                   -0.0031946101484515294, 0.011493798384916468, 0.024979319069127214,
                   0.08893166092801187, -0.1564130703738055]},
}
# (version, platform) -> algorithm -> sha256 of the final global state's bytes: float
# rounding is platform-dependent (SIMD width, BLAS kernels), so the exact check runs only
# where the digest was pinned; the projections above run everywhere
_PINNED_ON = "torch 2.13.0+cpu AVX2 numpy 2.4.6"
EXACT: dict[tuple[int, str], dict[str, str]] = {
    (1, _PINNED_ON): {"fedcoe": "90fd81794bf126fc45756ae5ebda7d70463b7b234073be940ead8e00249e0c57",
                      "fedavg": "0a49cde3fa0b74742ecd2e2bdc2e49485a006e5ed5ed6338c6c7fca2fdc0e9b0"},
    # version 2 moved FedCoE by float rounding only (the projections agree to 1e-10)
    (2, _PINNED_ON): {"fedcoe": "93ba2b6ebd909d5527ed4df822bb9e338eedeba1adfebc2a2b172db1ce6a681d",
                      "fedavg": "0a49cde3fa0b74742ecd2e2bdc2e49485a006e5ed5ed6338c6c7fca2fdc0e9b0"},
    # version 3: the default defences (clip, samples cap) act on both
    (3, _PINNED_ON): {"fedcoe": "4e6a623362ac980714cc2ad48a2ccaae9adf816fd0a1d236f60605dd1e7c216b",
                      "fedavg": "af463208cf897305307585df0cec7e7e9469d8752d8f44d4f84c84466eca92ad"},
}


def platform() -> str:
    return (f"torch {torch.__version__} {torch.backends.cpu.get_cpu_capability()} "
            f"numpy {np.__version__}")


def tiny(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """120 samples, 4 classes, 1x4x4: class means 0.5 apart, deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(4), 30)
    x = (rng.normal(0, 1, (120, 1, 4, 4)) + y[:, None, None, None] * 0.5).astype(np.float32)
    return x, y.astype(np.int64)


@pytest.fixture(scope="module")
def states() -> Iterator[dict[str, dict[str, np.ndarray]]]:
    """Two rounds of FedCoE and FedAvg, 3 clients, through ``fe.simulate`` (the code path of
    the benchmark grid)."""
    fe.register_dataset(DATASET, tiny, replace=True)
    try:
        cfg = fe.SimulationConfig(
            dataset=DATASET, clients=3, new_clients=1, rounds=2, min_samples=5,
            algorithms=list(ALGORITHMS),
            model=fe.ModelConfig(input_shape=(1, 4, 4), num_classes=4, expert_hidden=8,
                                 num_global_experts=4, top_k=2),
            train=fe.TrainConfig(local_epochs=1, batch_size=8, experts_per_client=2))
        _, runs = fe.simulate(cfg, progress=False)
        yield {a: dict(runs[a][0].strategy.global_state) for a in ALGORITHMS}
    finally:
        fe.DATASETS.unregister(DATASET)


def projection(state: dict[str, np.ndarray]) -> list[float]:
    flat = np.concatenate([np.asarray(state[n], dtype=np.float64).ravel() for n in sorted(state)])
    basis = np.random.default_rng(0).normal(size=(8, flat.size)) / np.sqrt(flat.size)
    return [float(np.linalg.norm(flat)), *(basis @ flat).tolist()]


def digest(state: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for n in sorted(state):
        v = np.ascontiguousarray(state[n])
        h.update(f"{n}|{v.dtype}|{v.shape}|".encode())
        h.update(v.tobytes())
    return h.hexdigest()


def test_pinned_run_matches_the_declared_version(states: dict[str, dict[str, np.ndarray]]) -> None:
    got = {a: projection(s) for a, s in states.items()}
    exact = {a: digest(s) for a, s in states.items()}
    hint = (f"NUMERICS_VERSION = {NUMERICS_VERSION}; this run gives projections {got} and, on "
            f"{platform()!r}, digests {exact}: if the change alters results, bump the version "
            "and pin these under it")
    assert NUMERICS_VERSION in PINNED, f"no pinned run for this version. {hint}"
    for a, want in PINNED[NUMERICS_VERSION].items():
        np.testing.assert_allclose(got[a], want, rtol=1e-4, atol=1e-4 * want[0], err_msg=f"{a}: {hint}")
    pinned_exact = EXACT.get((NUMERICS_VERSION, platform()))
    if pinned_exact is not None:
        assert exact == pinned_exact, hint


def test_cache_keys_carry_the_version_not_the_source(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import accuracy as A
    from fedcoe_edge import numerics

    grid = A.grid_from_args(A.parse_args(["--quick", "--untuned"]))
    setting, algorithm, seed = grid.jobs()[0]
    key = A.run_key(grid, setting, algorithm, seed)
    assert key == (f"{setting}|{algorithm}|{seed}|{grid.fingerprint(setting, algorithm)}"
                   f"|numerics-v{NUMERICS_VERSION}")
    monkeypatch.setattr(numerics, "NUMERICS_VERSION", NUMERICS_VERSION + 1)
    assert A.run_key(grid, setting, algorithm, seed).endswith(f"|numerics-v{NUMERICS_VERSION + 1}")
