"""The campaign's shared example database: a folder or Redis, with undecodable entries
skipped, removed and counted, and a database that cannot be used refused in one line."""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis.database import InMemoryExampleDatabase, choices_to_bytes

from kvmspec.fuzz import campaign
from kvmspec.fuzz.campaign_database import CheckedDatabase, open_database
from kvmspec.fuzz.cli import main

GOOD = choices_to_bytes((1, True, b"\x00"))
JUNK = b"\xff not a choice sequence"  # (short junk such as b"junk" can decode as choices)


def test_an_undecodable_entry_is_skipped_removed_and_counted() -> None:
    inner = InMemoryExampleDatabase()
    inner.save(b"key", GOOD)
    inner.save(b"key", JUNK)
    database = CheckedDatabase(inner)
    assert list(database.fetch(b"key")) == [GOOD]
    assert database.skipped == 1
    assert list(inner.fetch(b"key")) == [GOOD]  # removed from the storage too


def test_a_campaign_uses_the_folder_it_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # no Atheris
    folder = tmp_path / "shared-examples"
    report = tmp_path / "report.json"
    areas = ["memslots/arm64"]
    assert campaign.run_campaign(areas, 0.02, "reference", str(report), 1, str(folder)) == 0
    assert json.loads(report.read_text())["corrupt_database_entries"] == 0
    assert not (tmp_path / ".hypothesis" / "examples").exists()  # not the default one


def test_a_database_that_cannot_be_used_is_one_line_and_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    assert main(["campaign", "--minutes", "0.01", "--database", str(not_a_folder)]) == 2
    assert capsys.readouterr().err.strip().endswith("is not a folder")
    with socket.socket() as sock:  # a loopback port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert main(["campaign", "--minutes", "0.01", "--database", f"redis://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvmspec: error: cannot use the Redis database") and err.count("\n") == 1


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A real redis-server on a free loopback port, for the duration of the test."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_two_campaigns_share_examples_through_redis(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = open_database(redis_url)
    database.save(b"shared-key", GOOD)
    database.save(b"shared-key", JUNK)
    # Another client (another machine) sees the entry, and the junk is skipped.
    other = open_database(redis_url)
    assert list(other.fetch(b"shared-key")) == [GOOD] and other.skipped == 1
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    report = tmp_path / "report.json"
    areas = ["memslots/arm64"]
    assert campaign.run_campaign(areas, 0.02, "reference", str(report), 1, redis_url) == 0
    assert json.loads(report.read_text())["areas"][0]["steps"] > 0
