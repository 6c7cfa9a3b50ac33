"""One distribution, three folders, one namespace: the wheel holds kvmspec.spec,
kvmspec.reference and kvmspec.fuzz (nothing generic at the top of site-packages), and both
the editable install and an installed wheel import."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROBE = (
    "import kvmspec.spec.uapi.memslot_rules, kvmspec.reference.kvm_main, kvmspec.fuzz.cli;"
    "print(kvmspec.reference.kvm_main.__file__)"
)


def test_editable_install_imports() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, cwd="/"
    )
    assert result.stdout.strip().startswith(str(ROOT / "reference"))


def test_wheel_install_imports(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path), "."],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("kvmspec-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.startswith("kvmspec-")}
    assert tops == {"kvmspec"}
    assert "kvmspec/reference/kvm_main.py" in names
    assert "kvmspec/spec/uapi/memslot_rules.py" in names
    assert "kvmspec/fuzz/cli.py" in names

    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
    )
    assert result.stdout.strip().startswith(str(target))
