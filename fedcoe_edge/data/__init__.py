"""Datasets, partitioners and client splits (design section 5)."""

from fedcoe_edge.data.datasets import DATASETS, load_dataset
from fedcoe_edge.data.federation import Federation, make_federation
from fedcoe_edge.data.partition import PARTITIONERS, PartitionSpec

__all__ = ["DATASETS", "PARTITIONERS", "Federation", "PartitionSpec", "load_dataset", "make_federation"]
