"""Alembic environment: runs migrations on the engine `orchestrator.db.upgrade` hands in."""

from __future__ import annotations

from alembic import context

from schemas.models import Base

config = context.config
engine = config.attributes["engine"]

with engine.begin() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying
    )
    context.run_migrations()
