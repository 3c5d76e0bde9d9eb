"""The presentation client: PsychoPy RSVP (run.py) and its headless twin (headless.py)."""
