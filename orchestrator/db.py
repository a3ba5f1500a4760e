"""Engines and migrations for the run store.

SQLite runs in WAL mode with a busy timeout (the dispatcher writes while CLIs read); PostgreSQL is
used as is. `upgrade()` applies the Alembic migrations in orchestrator/migrations; the embedded
default runs it automatically, a production deployment runs `charforge db upgrade`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, inspect
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError

from schemas.errors import DatabaseUnavailable, InvalidSpec

MIGRATIONS = Path(__file__).parent / "migrations"


def redact(url: str) -> str:
    """The URL with its password hidden, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<invalid database URL>"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
        parsed.get_dialect()  # an unknown scheme (bogus://) fails here, not in create_engine
    except NoSuchModuleError:  # (an ArgumentError too)
        raise InvalidSpec(f"unknown database in URL {redact(url)}: use sqlite:/// or postgresql://") from None
    except ArgumentError:
        raise InvalidSpec(f"cannot read database URL {url!r}") from None
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            folder = Path(parsed.database).expanduser().parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # a file on the way, no permission, a read-only disk
                raise InvalidSpec(f"cannot make the database's folder {folder} (from {redact(url)}): "
                                  f"{exc.strerror or exc}") from None
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
    elif parsed.get_backend_name() == "postgresql":
        if parsed.drivername == "postgresql":  # psycopg 3 is the driver we ship
            parsed = parsed.set(drivername="postgresql+psycopg")
        kwargs["connect_args"] = {"connect_timeout": 5}
    try:
        engine = create_engine(parsed, **kwargs)
    except ModuleNotFoundError as exc:
        raise InvalidSpec(f"no driver for database URL {redact(url)}: {exc.name} is not installed") from None
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def unavailable(url: str, exc: BaseException) -> DatabaseUnavailable:
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    return DatabaseUnavailable(f"cannot reach the database at {redact(url)}: {reason}")


def _alembic_config(engine: Engine) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema up to `revision` (Alembic)."""
    from alembic import command

    try:
        command.upgrade(_alembic_config(engine), revision)
    except OperationalError as exc:
        raise unavailable(engine.url.render_as_string(hide_password=False), exc) from None


def is_current(engine: Engine) -> bool:
    """True when the database is at the newest migration (cheap: one query)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config(engine)).get_current_head()
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return False
        return MigrationContext.configure(conn).get_current_revision() == head
