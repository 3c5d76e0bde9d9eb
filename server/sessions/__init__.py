"""Recording sessions, their blocks, next-block scheduling and presentations."""
