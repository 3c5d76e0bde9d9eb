"""The closed loop across days: fit, synthesize and evaluate jobs, and the per-subject policy."""
