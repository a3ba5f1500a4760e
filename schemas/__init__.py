"""Shared, dependency-light contracts: configuration models, statuses, events and errors.

Nothing here imports torch, ray or the database driver, so every layer (the CLI's fast paths,
workers, the dispatcher) can import it. The SQLAlchemy models live in `schemas.models` and are
imported only by the orchestrator.
"""
