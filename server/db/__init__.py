"""Database: ORM tables (``models``) and engine/session handling (``session``)."""
