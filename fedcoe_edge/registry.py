"""Registries of trunks, experts and datasets: built-ins and the user's own, by one rule.

A model part or dataset is named either by a *registered name* (``"resnet8"`` after
``fe.register_trunk("resnet8", factory)``) or by an *import path* (``"mypkg.models:resnet8"``,
``module:attribute``, resolved with :mod:`importlib` on first use). The built-ins
(``identity``, ``mobilenet_v3_small``, ``mlp``, ``cnn``, ``digits``, ...) are registered
through the same calls; a built-in held as an import path string is imported only when
used, so reading a bundle's manifest on a device never imports torch. docs/design.md,
"Your own model and data".

Factories (called by :mod:`fedcoe_edge.model` when a :class:`~fedcoe_edge.model.DualLevelMoE`
is built, with the checks of :func:`fedcoe_edge.model.build_trunk`):

* trunk: ``factory(input_shape: tuple[int, ...]) -> torch.nn.Module``, mapping
  ``(B, *input_shape)`` to ``(B, *feat_shape)``;
* expert: ``factory(feat_shape: tuple[int, ...], hidden: int, num_classes: int) -> Module``,
  mapping ``(B, *feat_shape)`` to logits ``(B, num_classes)``; its last ``nn.Linear`` is the
  output layer a residual local expert zero-initialises;
* dataset: ``loader(seed: int) -> (x float32 (N, *input_shape), y int64 (N,))``.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from fedcoe_edge.errors import ConfigError

T = TypeVar("T")

# module path (dotted identifiers) ":" attribute path (dotted identifiers)
_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")
NAME_PATTERN = _NAME  # what a registered name may be (strategies are checked against it too)


class RegistryError(ConfigError):
    """A name registered twice, an import path that does not resolve, or a factory that does
    not return what its kind promises (a Module, a matching shape, arrays)."""


def is_import_path(spec: str) -> bool:
    """``"pkg.module:attr"``: a factory named by where it lives rather than by a registered name."""
    return bool(_IMPORT_PATH.match(spec))


def resolve_import_path(spec: str, what: str) -> Any:
    """The object ``module:attr`` names; a one-line RegistryError saying which half failed."""
    if not is_import_path(spec):
        raise RegistryError(f"{what} {spec!r} is not an import path 'package.module:attribute'")
    module_name, attr_path = spec.split(":", 1)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise RegistryError(f"{what} {spec!r}: cannot import module {module_name!r} ({exc})") from None
    except Exception as exc:  # the user's module raised while importing: say so, in one line
        raise RegistryError(f"{what} {spec!r}: importing {module_name!r} raised "
                            f"{type(exc).__name__}: {exc}") from None
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise RegistryError(f"{what} {spec!r}: module {module_name!r} has no attribute "
                                f"{attr_path!r}") from None
    if not callable(obj):
        raise RegistryError(f"{what} {spec!r} is a {type(obj).__name__}, not a callable factory")
    return obj


class Registry(Mapping[str, T], Generic[T]):
    """Name -> factory. A ``Mapping`` (``name in reg``, ``reg[name]``, ``sorted(reg)``), plus
    :meth:`register` and :meth:`resolve`. An entry may be held as an import path string and is
    then imported on first lookup (how the torch built-ins stay out of torch-free imports)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind  # "trunk", "expert", "dataset": used in error messages
        self._entries: dict[str, T | str] = {}
        self._builtin: set[str] = set()

    def register(self, name: str, factory: T | str, *, replace: bool = False,
                 builtin: bool = False) -> None:
        """Add ``name``; registering a taken name is a RegistryError unless ``replace``."""
        if not isinstance(name, str) or not _NAME.match(name) or ":" in name:
            raise RegistryError(f"{self.kind} name must be letters, digits, '_', '.', '+' or '-' "
                                f"(no ':', which marks an import path), got {name!r}")
        if name in self._entries and not replace:
            raise RegistryError(f"{self.kind} {name!r} is already registered "
                                f"(pass replace=True to override it)")
        if name in self._builtin and replace:
            raise RegistryError(f"{self.kind} {name!r} is built in and cannot be replaced")
        if not (isinstance(factory, str) and is_import_path(factory)) and not callable(factory):
            raise RegistryError(f"{self.kind} {name!r}: factory must be callable or an import "
                                f"path, got {type(factory).__name__}")
        self._entries[name] = factory
        if builtin:
            self._builtin.add(name)

    def unregister(self, name: str) -> None:
        """Remove a user entry (tests, notebooks re-running a cell); built-ins stay."""
        if name in self._builtin:
            raise RegistryError(f"{self.kind} {name!r} is built in and cannot be removed")
        self._entries.pop(name, None)

    def is_builtin(self, name: str) -> bool:
        return name in self._builtin

    def accepts(self, spec: str) -> bool:
        """Whether ``spec`` names an entry or is shaped like an import path (not imported)."""
        return isinstance(spec, str) and (spec in self._entries or is_import_path(spec))

    def names(self) -> list[str]:
        return sorted(self._entries)

    def choices(self) -> str:
        """'a|b|c or module:factory', for error messages."""
        return f"{'|'.join(self.names())} or an import path 'module:factory'"

    def resolve(self, spec: str) -> T:
        """The factory for a registered name or an import path; RegistryError otherwise."""
        if spec in self._entries:
            entry = self._entries[spec]
            if isinstance(entry, str):  # a lazily imported entry: import once, keep the object
                obj: T = resolve_import_path(entry, self.kind)
                self._entries[spec] = obj
                return obj
            return entry
        if isinstance(spec, str) and is_import_path(spec):
            resolved: T = resolve_import_path(spec, self.kind)
            return resolved
        raise RegistryError(f"unknown {self.kind} {spec!r}; known: {self.choices()}")

    # --- Mapping ---------------------------------------------------------------------
    def __getitem__(self, name: str) -> T:
        if name not in self._entries:
            raise KeyError(name)
        return self.resolve(name)

    def __contains__(self, name: object) -> bool:  # without importing a lazy entry
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


TrunkFactory = Callable[[tuple[int, ...]], Any]  # input_shape -> nn.Module
ExpertFactory = Callable[[tuple[int, ...], int, int], Any]  # feat_shape, hidden, classes -> nn.Module

TRUNKS: Registry[TrunkFactory] = Registry("trunk")
EXPERTS: Registry[ExpertFactory] = Registry("expert")

# the built-ins, by import path so this module (and a bundle's manifest check) needs no torch
TRUNKS.register("identity", "fedcoe_edge.model:identity_trunk", builtin=True)
TRUNKS.register("mobilenet_v3_small", "fedcoe_edge.model:mobilenet_v3_small_trunk", builtin=True)
EXPERTS.register("mlp", "fedcoe_edge.model:mlp_expert", builtin=True)
EXPERTS.register("cnn", "fedcoe_edge.model:cnn_expert", builtin=True)

DatasetLoader = Callable[[int], tuple[Any, Any]]  # seed -> (x, y)
DATASETS: Registry[DatasetLoader] = Registry("dataset")
# by import path too: this module stays below the data package (no import cycle) and
# loading sklearn or Fashion-MNIST code waits until a dataset is used
DATASETS.register("digits", "fedcoe_edge.data.datasets:load_digits", builtin=True)
# digits with a shift per client (make_federation applies it)
DATASETS.register("digits-shift", "fedcoe_edge.data.datasets:load_digits", builtin=True)
# the training split; see fedcoe_edge.data.datasets.SPLIT_DATASETS
DATASETS.register("fmnist", "fedcoe_edge.data.datasets:load_fmnist_train", builtin=True)
DATASETS.register("synthetic", "fedcoe_edge.data.datasets:load_synthetic_pooled", builtin=True)


def register_trunk(name: str, factory: TrunkFactory | str, *, replace: bool = False) -> None:
    """Make ``ModelConfig(trunk=name)`` build ``factory(input_shape)`` as the shared trunk.

    The factory returns a ``torch.nn.Module`` mapping ``(B, *input_shape)`` to features
    ``(B, *feat_shape)``; the feature shape is measured when the model is built, the trunk is
    exported as the bundle's ``trunk`` part and a device runs it from the ONNX file alone.
    """
    TRUNKS.register(name, factory, replace=replace)


def register_expert(name: str, factory: ExpertFactory | str, *, replace: bool = False) -> None:
    """Make ``ModelConfig(expert_kind=name)`` build every expert as
    ``factory(feat_shape, hidden, num_classes)``: a Module mapping ``(B, *feat_shape)`` to
    logits ``(B, num_classes)``, whose last ``nn.Linear`` is its output layer."""
    EXPERTS.register(name, factory, replace=replace)


def register_dataset(name: str, loader: Callable[[int], tuple[Any, Any]] | str, *,
                     replace: bool = False) -> None:
    """Make ``load_dataset(name)`` (``simulate``, a device agent's ``[data] dataset``) call
    ``loader(seed) -> (x, y)``: x float32 ``(N, *input_shape)``, y integer labels ``(N,)``."""
    DATASETS.register(name, loader, replace=replace)
