"""The Atheris targets follow the OSS-Fuzz and ClusterFuzzLite conventions, and libFuzzer's
parallel modes work on them.

.clusterfuzzlite/build.sh is run here with the builder's two helpers stubbed (pip3 and
compile_python_fuzzer), so the test checks what the script itself decides: every
fuzz/fuzz_*.py is built, with its seed corpus zipped and its options file written."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CFLITE = REPO / ".clusterfuzzlite"
HAS_ATHERIS = importlib.util.find_spec("atheris") is not None


def test_the_project_is_a_python_project_built_by_its_script() -> None:
    assert (CFLITE / "project.yaml").read_text().split() == ["language:", "python"]
    dockerfile = (CFLITE / "Dockerfile").read_text()
    assert "FROM gcr.io/oss-fuzz-base/base-builder-python" in dockerfile
    assert "COPY .clusterfuzzlite/build.sh $SRC/" in dockerfile
    assert os.access(CFLITE / "build.sh", os.X_OK)


@pytest.mark.skipif(shutil.which("zip") is None, reason="zip is not installed")
def test_the_build_script_builds_every_fuzz_target_with_its_seeds(tmp_path: Path) -> None:
    tools = tmp_path / "bin"
    tools.mkdir()
    log = tmp_path / "compiled.txt"
    (tools / "pip3").write_text("#!/bin/sh\nexit 0\n")
    (tools / "compile_python_fuzzer").write_text(f'#!/bin/sh\necho "$1" >> {log}\n')
    for tool in tools.iterdir():
        tool.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    environment = dict(os.environ, SRC=str(tmp_path), OUT=str(out))
    environment["PATH"] = f"{tools}:{environment['PATH']}"
    subprocess.run(["bash", str(CFLITE / "build.sh")], cwd=REPO, env=environment, check=True)
    targets = sorted(path.stem for path in (REPO / "fuzz").glob("fuzz_*.py"))
    assert sorted(Path(line).stem for line in log.read_text().split()) == targets
    for target in targets:
        seeds = sorted(path.name for path in (REPO / "corpus/seeds" / target[5:]).iterdir())
        with zipfile.ZipFile(out / f"{target}_seed_corpus.zip") as archive:
            assert sorted(archive.namelist()) == seeds
    assert (out / "fuzz_memslots.options").read_text() == "[libfuzzer]\nmax_len = 1024\n"
    assert (out / "fuzz_x86.options").read_text() == "[libfuzzer]\nmax_len = 256\n"


@pytest.mark.skipif(not HAS_ATHERIS, reason="atheris cannot be imported")
def test_libfuzzer_fork_mode_runs_a_target(tmp_path: Path) -> None:
    """-fork=N: libFuzzer runs N child fuzzers of the script and merges their corpora."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    result = subprocess.run(
        [
            str(REPO / "fuzz" / "fuzz_memslots.py"),
            *("-fork=2", "-max_total_time=4", f"-artifact_prefix={tmp_path}/"),
            *(str(corpus), str(REPO / "corpus/seeds/memslots")),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "job: " in result.stderr and "INFO: exiting: 0" in result.stderr
    assert any(corpus.iterdir())


@pytest.mark.skipif(not HAS_ATHERIS, reason="atheris cannot be imported")
def test_libfuzzer_jobs_mode_runs_workers(tmp_path: Path) -> None:
    """-jobs=N -workers=N: N independent runs of the script, each with its log."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    result = subprocess.run(
        [
            *(sys.executable, str(REPO / "fuzz" / "fuzz_memslots.py")),
            *("-jobs=2", "-workers=2", "-max_total_time=3"),
            *(str(corpus), str(REPO / "corpus/seeds/memslots")),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for job in (0, 1):
        assert "Done " in (tmp_path / f"fuzz-{job}.log").read_text()
