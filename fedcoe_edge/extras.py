"""The optional extras' version gate: an extra is used only within the releases it was tested on.

``[flower]`` and ``[ray]`` (pyproject.toml) pin a minor-release range; before anything starts,
the code behind each asks :func:`require_extra` for the installed version and gets one
ConfigError line when the package is missing or outside that range (docs/engines.md).
"""

from __future__ import annotations

import importlib.metadata
import re

from fedcoe_edge.errors import ConfigError

Minor = tuple[int, int]  # (major, minor) of a release


def version_range(minimum: Minor, below: Minor) -> str:
    """The pip specifier of ``minimum <= version < below``, e.g. ``>=2.55,<2.56``."""
    return f">={minimum[0]}.{minimum[1]},<{below[0]}.{below[1]}"


def require_extra(dist: str, title: str, extra: str, minimum: Minor, below: Minor,
                  version: str | None = None) -> str:
    """The installed version of ``dist`` (named ``title`` in messages), or ConfigError in one
    line when it is missing or outside ``[minimum, below)``; the line names the extra that
    installs a tested release. ``version`` overrides the installed one (tests, error paths)."""
    spec = version_range(minimum, below)
    if version is None:
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            raise ConfigError(f"{title} is not installed: pip install 'fedcoe-edge[{extra}]' "
                              f"({dist}{spec})") from None
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None or not minimum <= (int(match[1]), int(match[2])) < below:
        raise ConfigError(f"{dist} {version} is outside the tested range {dist}{spec}: "
                          f"pip install 'fedcoe-edge[{extra}]'")
    return version
