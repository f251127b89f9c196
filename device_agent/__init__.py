"""The FedCoE device agent (arXiv 2605.21264 over MQTT): persistent session with presence
and last-will, local fine-tuning of the assigned experts and the private level (which
never leaves the device), int8 delta uploads, int8 ONNX bundle rebuilds, cold start for a
late device. Entry point: ``fedcoe agent --config agent.toml`` (docs/daemons.md)."""
