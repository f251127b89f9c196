"""FedProx's Synthetic(alpha, beta): per-user logistic-regression data.

Li et al., "Federated Optimization in Heterogeneous Networks" (FedProx, MLSys 2020), section
5.1 and its ``data/synthetic_*/generate_niid.py``. For user k:

* ``u_k ~ N(0, alpha)``, ``B_k ~ N(0, beta)`` (alpha: how much the models differ across users,
  beta: how much the inputs differ);
* ``W_k ~ N(u_k, 1)`` of shape (60, 10), ``b_k ~ N(u_k, 1)`` of shape (10,);
* ``v_k ~ N(B_k, 1)`` (60,), ``x ~ N(v_k, Sigma)`` with Sigma diagonal, ``Sigma_jj = j^-1.2``;
* ``y = argmax(softmax(W_k^T x + b_k))``;
* the number of samples of user k is ``int(lognormal(4, 2)) + 50``.

The ``iid`` variant uses one global W, b and ``v_k = B_k * 1`` for everyone, as FedProx's
``generate_iid.py`` does. The data is per-user by construction, so the federation builder
takes whole users as clients (the ``natural`` partition) instead of splitting a pooled set.
"""

from __future__ import annotations

import re

import numpy as np

from fedcoe_edge.errors import ConfigError

DIMENSION = 60
NUM_CLASSES = 10

UserData = list[tuple[np.ndarray, np.ndarray]]


def synthetic_users(num_users: int, alpha: float = 1.0, beta: float = 1.0, seed: int = 0,
                    iid: bool = False) -> UserData:
    """Generate ``num_users`` users' (x float32 (n, 60), y int64 (n,)) as in FedProx."""
    if num_users < 1:
        raise ConfigError(f"synthetic needs at least 1 user, got {num_users}")
    if alpha < 0 or beta < 0:
        raise ConfigError(f"synthetic alpha and beta must be >= 0, got ({alpha}, {beta})")
    rng = np.random.default_rng(seed)
    sizes = rng.lognormal(4, 2, num_users).astype(np.int64) + 50
    mean_w = rng.normal(0, alpha, num_users)  # u_k; b shares it (mean_b = mean_W in FedProx)
    b_shift = rng.normal(0, beta, num_users)  # B_k
    cov_diag = np.power(np.arange(1, DIMENSION + 1, dtype=np.float64), -1.2)
    if iid:
        mean_x = np.ones((num_users, DIMENSION)) * b_shift[:, None]
        w_global = rng.normal(0, 1, (DIMENSION, NUM_CLASSES))
        b_global = rng.normal(0, 1, NUM_CLASSES)
    else:
        mean_x = rng.normal(b_shift[:, None], 1, (num_users, DIMENSION))
    users: UserData = []
    for k in range(num_users):
        if iid:
            w, b = w_global, b_global
        else:
            w = rng.normal(mean_w[k], 1, (DIMENSION, NUM_CLASSES))
            b = rng.normal(mean_w[k], 1, NUM_CLASSES)
        # diagonal covariance: independent coordinates with std sqrt(Sigma_jj)
        x = mean_x[k] + rng.standard_normal((int(sizes[k]), DIMENSION)) * np.sqrt(cov_diag)
        y = np.argmax(x @ w + b, axis=1)  # argmax of softmax == argmax of logits
        users.append((x.astype(np.float32), y.astype(np.int64)))
    return users


_NAME = re.compile(r"^synthetic(?:\((?P<a>[0-9.]+),(?P<b>[0-9.]+)\))?$")


def parse_synthetic_name(name: str) -> tuple[float, float, bool] | None:
    """``synthetic`` = Synthetic(1, 1); ``synthetic(a,b)``; ``synthetic-iid``. None if not synthetic."""
    if name == "synthetic-iid":
        return 0.0, 0.0, True
    m = _NAME.match(name.replace(" ", ""))
    if m is None:
        return None
    if m.group("a") is None:
        return 1.0, 1.0, False
    try:
        return float(m.group("a")), float(m.group("b")), False
    except ValueError:
        raise ConfigError(f"bad synthetic dataset name {name!r}; use synthetic(alpha,beta)") from None


def load_synthetic_users(name: str, num_users: int, seed: int) -> UserData:
    """Users of a ``synthetic...`` dataset name; ConfigError for a name that is not one."""
    parsed = parse_synthetic_name(name)
    if parsed is None:
        raise ConfigError(f"{name!r} is not a synthetic dataset name (synthetic, synthetic(a,b), "
                          f"synthetic-iid)")
    alpha, beta, iid = parsed
    return synthetic_users(num_users, alpha, beta, seed, iid=iid)
