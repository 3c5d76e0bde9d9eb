"""The job queue (fit, synthesize, evaluate, export) and its REST API."""
