"""Shared pytest fixtures. Tests keep torch to one thread: the machine has two cores."""

from __future__ import annotations

import torch

torch.set_num_threads(1)
