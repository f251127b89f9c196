"""The ClientApp: node config ``partition-id`` picks the client; it trains with the
strategy's own ``client_update`` and keeps its private experts in the node's state."""

from fedcoe_edge.flower import client_app

app = client_app()
