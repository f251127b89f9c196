"""Errors the user can act on.

Every error carries one line that says what went wrong and where; the CLI prints it on
stderr and exits with code 2, daemons log it and keep running.
"""

from __future__ import annotations


class FedCoEError(Exception):
    """Base class: a problem with the user's input, not a bug in the library."""


class ConfigError(FedCoEError):
    """A configuration value or command-line option is invalid."""


class DataError(FedCoEError):
    """A dataset cannot be loaded or cannot be partitioned as asked."""


class ValidationError(FedCoEError):
    """A model update or state dict fails schema/shape/dtype/finiteness checks."""


class WireError(FedCoEError):
    """A message or transfer received from the network is malformed or not authentic."""


class BundleError(FedCoEError):
    """An ONNX bundle is missing a file, fails a hash check, or has an unknown manifest."""


class ReplayError(WireError):
    """A control message whose id was already seen (a QoS 1 duplicate or a replay attack)."""


class TransportError(FedCoEError):
    """The broker cannot be reached, refused the connection, or dropped it for good."""
