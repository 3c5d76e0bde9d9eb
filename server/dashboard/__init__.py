"""Operator dashboard: sign-in, scheduling, live monitor, models, synthesis gallery, loop, jobs."""
