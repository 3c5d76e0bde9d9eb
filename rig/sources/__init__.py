"""Acquisition sources: Open Ephys ZMQ, replay of a recording, the simulator."""
