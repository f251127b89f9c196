"""The FedCoE coordinator daemon (arXiv 2605.21264 over MQTT): device registry and round
log in SQLite, rounds with selection, deadline and quorum driving the same ``Strategy``
objects as the simulator, partial expert exchange, atomic checkpoints, resume after a
crash. Entry point: ``fedcoe coordinator --config coordinator.toml`` (docs/daemons.md)."""
