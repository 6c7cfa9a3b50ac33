"""The example database a campaign shares: a local directory, or Redis for several machines.

Hypothesis keeps every failing example (and a corpus of interesting ones) in an example
database and replays them first on the next run, so a finding made once is retried on every
machine that shares the database. ``kvmspec campaign --database`` takes a folder
(default ``.hypothesis/examples``, Hypothesis's own) or a ``redis://host:port/db`` URL
(Hypothesis's RedisExampleDatabase; every campaign pointed at one server shares its examples).

Whatever the storage, entries are read through :class:`CheckedDatabase`: an entry that does
not decode as a Hypothesis choice sequence (a truncated file, another program's key, a
format from another Hypothesis version) is skipped, removed, and counted, so the campaign can
warn about it instead of silently losing the entry or failing on it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from hypothesis.database import (
    DirectoryBasedExampleDatabase,
    ExampleDatabase,
    choices_from_bytes,
)

DEFAULT_DATABASE = ".hypothesis/examples"


class DatabaseError(Exception):
    """The database the user named cannot be used (one line for the user)."""


class CheckedDatabase(ExampleDatabase):
    """Another database, read with every entry checked; ``skipped`` counts the bad ones."""

    def __init__(self, inner: ExampleDatabase) -> None:
        super().__init__()
        self.inner = inner
        self.skipped = 0

    def fetch(self, key: bytes) -> Iterable[bytes]:
        for value in list(self.inner.fetch(key)):
            if choices_from_bytes(value) is None:
                self.skipped += 1
                self.inner.delete(key, value)
                continue
            yield value

    def save(self, key: bytes, value: bytes) -> None:
        self.inner.save(key, value)

    def delete(self, key: bytes, value: bytes) -> None:
        self.inner.delete(key, value)

    def move(self, src: bytes, dest: bytes, value: bytes) -> None:
        self.inner.move(src, dest, value)


def open_database(where: str | None) -> CheckedDatabase:
    """The database ``where`` names: a ``redis://`` URL or a folder (None: the default)."""
    if where is not None and where.startswith(("redis://", "rediss://", "unix://")):
        try:
            from hypothesis.extra.redis import RedisExampleDatabase
            from redis import Redis
            from redis.exceptions import RedisError
        except ImportError as missing:
            raise DatabaseError(f"a Redis database needs the redis package ({missing})") from None
        try:
            client = Redis.from_url(where)
            client.ping()
        except (RedisError, ValueError) as error:
            raise DatabaseError(f"cannot use the Redis database {where}: {error}") from None
        return CheckedDatabase(RedisExampleDatabase(client))
    folder = Path(where if where is not None else DEFAULT_DATABASE)
    if folder.exists() and not folder.is_dir():
        raise DatabaseError(f"the example database {folder} is not a folder")
    return CheckedDatabase(DirectoryBasedExampleDatabase(folder))
