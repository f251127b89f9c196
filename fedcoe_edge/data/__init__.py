"""Datasets, partitioners and client splits (docs/design.md, section 5)."""

from fedcoe_edge.data.client import ClientData
from fedcoe_edge.data.datasets import DATASETS, load_dataset
from fedcoe_edge.data.federation import Federation, make_federation
from fedcoe_edge.data.fmnist import CLASS_NAMES as FMNIST_CLASSES
from fedcoe_edge.data.fmnist import load_fmnist
from fedcoe_edge.data.partition import PARTITIONERS, PartitionSpec

__all__ = ["DATASETS", "FMNIST_CLASSES", "PARTITIONERS", "ClientData", "Federation", "PartitionSpec",
           "load_dataset", "load_fmnist", "make_federation"]
