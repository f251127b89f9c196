"""The daemons' shared protocol now lives in :mod:`fedcoe_edge.protocol`, below both daemons
(docs/design.md, section 2); this name stays an alias of that very module so existing
``device_agent.protocol`` imports keep working."""

import sys

from fedcoe_edge import protocol as _protocol

sys.modules[__name__] = _protocol
