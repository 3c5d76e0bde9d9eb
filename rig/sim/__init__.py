"""The virtual monkey: a hidden V4-like ground truth that spikes on a 30 kHz clock."""
