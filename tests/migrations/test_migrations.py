"""Migrations go up and down on both databases, and match the ORM tables exactly."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from server.db.base import Base
from server.db.session import downgrade, upgrade


def test_models_match_migrations(database_url: str) -> None:
    engine = create_engine(database_url)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
    engine.dispose()
    assert diff == [], f"the ORM tables differ from the migrations; write a migration: {diff}"


def test_downgrade_to_base_and_back(database_url: str) -> None:
    engine = create_engine(database_url)
    tables = set(Base.metadata.tables)
    assert tables <= set(inspect(engine).get_table_names())
    downgrade(database_url, "base")
    left = set(inspect(engine).get_table_names()) & tables
    assert left == set(), f"tables left after downgrade: {left}"
    upgrade(database_url)
    assert tables <= set(inspect(engine).get_table_names())
    engine.dispose()
