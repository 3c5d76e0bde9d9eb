"""popcontrol server: REST API, database, ingest, jobs and the operator dashboard."""
