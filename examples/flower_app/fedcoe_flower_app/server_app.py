"""The ServerApp: any registered fedcoe strategy (run config ``algorithm``) driven by Flower,
the global model scored on the server after each round (docs/engines.md, "Flower")."""

from fedcoe_edge.flower import server_app

app = server_app()
