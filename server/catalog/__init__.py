"""Subjects, their electrode arrays and sites, and rigs."""
