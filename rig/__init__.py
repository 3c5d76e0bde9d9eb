"""The rig side of popcontrol: wire protocol, acquisition sources, alignment, daemon, presenter, simulator."""
