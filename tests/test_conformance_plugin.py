"""The conformance plugin and the subprocess protocol, checked with targets that are not the
reference: a Python factory returning the reference (passes), one with a planted bug (fails
with a readable divergence), the C example target over the subprocess protocol on /dev/kvm
(passes on every trace it supports), and children that die, hang or answer garbage (one-line
errors). The plugin runs in a child pytest, as a user would run it."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_conformance import REFERENCE_XFAIL

from kvmspec.fuzz.cli import main
from kvmspec.fuzz.ops import (
    CheckExtension,
    ClearDirtyLog,
    CreateGuestMemfd,
    CreateVcpu,
    GetDirtyLog,
    Mmap,
    RegionAddr,
    SetUserMemoryRegion,
)
from kvmspec.fuzz.targets import TARGET_NAMES, make_target
from kvmspec.fuzz.targets.subprocess_target import (
    SubprocessTarget,
    TargetError,
    UnsupportedOperation,
)
from kvmspec.fuzz.trace import load
from kvmspec.spec.platforms import DEFAULT_PROFILE
from kvmspec.spec.uapi.constants import errno_name

ROOT = Path(__file__).resolve().parent.parent
C_SOURCE = ROOT / "fuzz" / "targets" / "c_target" / "kvm-c-target.c"
CORPUS = ROOT / "corpus" / "conformance" / DEFAULT_PROFILE.name
OVERLAP = CORPUS / "s3-overlap-eexist.jsonl"

TARGETS_MODULE = """
from kvmspec.fuzz.ops import SetUserMemoryRegion
from kvmspec.fuzz.targets.reference import ReferenceTarget


def reference(profile):
    return ReferenceTarget(profile)


class OverlapAnswersEinval(ReferenceTarget):
    '''Planted bug: a slot overlapping another is refused with EINVAL instead of EEXIST.'''

    name = "overlap-einval"

    def apply(self, op):
        observed = super().apply(op)
        if isinstance(op, SetUserMemoryRegion) and observed["errno"] == "EEXIST":
            return {"errno": "EINVAL"}
        return observed
"""

CHILD = """
import sys, time

mode = sys.argv[1]
sys.stdin.readline()  # the header
if mode == "deaf":
    time.sleep(60)
if mode == "exit":
    sys.stderr.write("child: cannot go on\\n")
    sys.exit(7)
for line in sys.stdin:
    if mode == "garbage":
        print("hello, not json", flush=True)
    elif mode == "no-errno":
        print('{"result": 1}', flush=True)
    elif mode == "hang":
        time.sleep(60)
    elif mode == "unsupported":
        print('{"unsupported": "mmap"}', flush=True)
    elif mode == "hva":
        print('{"errno": 0, "hva": 1073741824}', flush=True)
"""


def _run_plugin(cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """pytest with the plugin over the conformance suite, in a child process."""
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "kvmspec.fuzz.pytest_plugin",
            "-p",
            "no:cacheprovider",
            *args,
            "--pyargs",
            "kvmspec.fuzz.conformance_suite",
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def targets_module(tmp_path: Path) -> Path:
    (tmp_path / "my_targets.py").write_text(TARGETS_MODULE)
    return tmp_path


@pytest.fixture(scope="module")
def c_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The C example target, built with cc -O2 -Wall -Werror (skips without a compiler)."""
    compiler = shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler (cc) to build fuzz/targets/c_target")
    binary = tmp_path_factory.mktemp("c-target") / "kvm-c-target"
    subprocess.run(
        [compiler, "-O2", "-Wall", "-Werror", "-o", str(binary), str(C_SOURCE)],
        check=True,
        capture_output=True,
    )
    return binary


@pytest.fixture
def c_target(c_binary: Path) -> Path:
    """The C example target where it can run: it needs /dev/kvm (skips without)."""
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
    except OSError as error:
        pytest.skip(f"the C target needs /dev/kvm: {error.strerror}")
    return c_binary


@pytest.fixture
def child(tmp_path: Path) -> Path:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return script


def _child_target(script: Path, mode: str, timeout: float = 5.0) -> SubprocessTarget:
    return SubprocessTarget([sys.executable, str(script), mode], DEFAULT_PROFILE, timeout)


# --------------------------------------------------------------------------- the plugin


def test_plugin_passes_a_python_factory_returning_the_reference(targets_module: Path) -> None:
    """Every trace and the differential machine pass, but for the reference's documented
    divergences from the kernel (tests/test_conformance.py's REFERENCE_XFAIL), which the
    plugin reports as failures like any other target's."""
    result = _run_plugin(
        targets_module, "--kvmspec-target=my_targets:reference", "--kvmspec-examples=10"
    )
    traces = len(list(CORPUS.parent.glob("*/*.jsonl")))
    known = len(REFERENCE_XFAIL)
    assert result.returncode == (1 if known else 0), result.stdout + result.stderr
    summary = f"{known} failed, {traces + 1 - known} passed" if known else f"{traces + 1} passed"
    assert summary in result.stdout, result.stdout
    # The failures' section headers name each failing trace: "_ test_conformance_trace[id] _".
    failed = set(re.findall(r"^_+ test_conformance_trace\[(.+?)\] _+$", result.stdout, re.M))
    assert failed == set(REFERENCE_XFAIL), result.stdout


def test_plugin_reports_a_planted_bug_as_a_readable_divergence(targets_module: Path) -> None:
    result = _run_plugin(
        targets_module,
        "--kvmspec-target=my_targets:OverlapAnswersEinval",
        "-k",
        "s3-overlap-eexist or differential",
        "--kvmspec-examples=200",
        "--hypothesis-seed=0",
    )
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert "2 failed" in out, out
    step = next(s for s in load(OVERLAP).steps if s.expect == {"errno": "EEXIST"})
    assert f"s3-overlap-eexist.jsonl:{step.line}: " in out, out
    assert json.dumps(step.op.to_json()) in out
    assert 'expected {"errno": "EEXIST"}' in out and 'observed {"errno": "EINVAL"}' in out
    assert "errno differs: expected EEXIST, observed EINVAL" in out
    # The memslot contract judges the same step: a rule id with its statement and source.
    assert "contract violation C-MEMSLOT-EEXIST: " in out, out
    assert "source: kernel: virt/kvm/kvm_main.c:kvm_check_memslot_overlap" in out
    # The differential machine finds it too, and shows the operations it ran as trace lines.
    assert (
        'set_user_memory_region: reference {"errno": "EEXIST"}, overlap-einval '
        '{"errno": "EINVAL"}: errno differs: expected EEXIST, observed EINVAL'
    ) in out
    assert '{"op": "set_user_memory_region", ' in out


def test_plugin_rejects_a_bad_target_in_one_line(tmp_path: Path) -> None:
    result = _run_plugin(tmp_path, "--kvmspec-target=no_such_module:factory")
    assert result.returncode == 4
    errors = [line for line in result.stderr.splitlines() if "--kvmspec-target" in line]
    assert len(errors) == 1 and "cannot import no_such_module" in errors[0], result.stderr


def test_plugin_reports_a_child_that_answers_garbage(child: Path) -> None:
    command = f"subprocess:{sys.executable} {child} garbage"
    result = _run_plugin(child.parent, f"--kvmspec-target={command}", "-k", "s3-overlap-eexist")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "target failed: subprocess:" in result.stdout
    assert "answered a line that is not a JSON object: 'hello, not json'" in result.stdout


@pytest.mark.kvm
def test_plugin_passes_the_c_target_on_every_trace_it_supports(c_target: Path) -> None:
    result = _run_plugin(c_target.parent, f"--kvmspec-target=subprocess:{c_target}")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary, summary
    # 73 of the 101 traces (the others run a guest or a dirty ring), and the machine.
    assert int(summary.split(" passed")[0].split()[-1]) >= 70, summary
    skips = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skips and all("unsupported operation: " in line for line in skips), skips


# --------------------------------------------------------------------------- the C target


def test_c_target_names_errnos_as_python_does(c_binary: Path) -> None:
    out = subprocess.run(
        [str(c_binary), "--errno-names"], capture_output=True, text=True, check=True
    ).stdout
    names = {}
    for line in out.splitlines():
        code, observation = line.split(" ", 1)
        names[int(code)] = json.loads(observation)["errno"]
    assert names == {code: errno_name(code) for code in range(1, 201)}
    assert names[errno.EEXIST] == "EEXIST" and names[errno.EAGAIN] == "EAGAIN"


@pytest.mark.kvm
def test_c_target_replays_through_kvmspec_replay(
    c_target: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["replay", str(OVERLAP), "--target", f"subprocess:{c_target}"]) == 0
    assert '"EEXIST"' in capsys.readouterr().out


@pytest.mark.kvm
def test_c_target_leaks_no_descriptor_and_exits_cleanly(c_target: Path) -> None:
    before = sorted(os.listdir("/proc/self/fd"))
    for _ in range(3):
        target = SubprocessTarget([str(c_target)], DEFAULT_PROFILE)
        process = target._process
        assert process is not None
        assert target.apply(Mmap("ram", 1 << 20)) == {"errno": 0}
        ram = RegionAddr("ram")
        slot = SetUserMemoryRegion(0, 1, 1 << 20, 1 << 16, ram)
        assert target.apply(slot) == {"errno": 0}
        assert target.apply(GetDirtyLog(0)) == {"errno": 0, "bitmap": [0]}
        assert target.apply(CheckExtension("KVM_CAP_USER_MEMORY")) == {"errno": 0, "result": 1}
        assert target.apply(CreateVcpu(0)) == {"errno": 0}
        assert target.apply(CreateGuestMemfd("g", 1 << 20)) == {"errno": 0}
        target.close()
        # The VM lives and dies with the child, which released it and exited by itself.
        assert process.returncode == 0
    assert sorted(os.listdir("/proc/self/fd")) == before


# --------------------------------------------------------------------------- bad children


@pytest.mark.parametrize(
    ("mode", "problem"),
    [
        ("exit", "closed its output; exited with status 7; stderr: child: cannot go on"),
        ("garbage", "answered a line that is not a JSON object: 'hello, not json'"),
        ("no-errno", 'answered without a valid "errno": \'{"result": 1}\''),
        ("hang", "the child gave no answer within 0.5 s"),
    ],
)
def test_a_failing_child_is_one_line_naming_the_command_and_the_op(
    child: Path, mode: str, problem: str
) -> None:
    target = _child_target(child, mode, timeout=0.5)
    op = Mmap("ram", 4096)
    with pytest.raises(TargetError) as raised:
        target.apply(op)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"subprocess:{sys.executable} {child} {mode}: on ")
    assert json.dumps(op.to_json()) in message
    assert problem in message
    # The child is gone and the target says so, without waiting again.
    with pytest.raises(TargetError, match="the target is closed"):
        target.apply(op)
    target.close()


def test_a_child_that_stops_reading_cannot_block_kvmspec(child: Path) -> None:
    target = _child_target(child, "deaf", timeout=0.5)
    big = ClearDirtyLog(0, 0, 1 << 20, tuple(range(1 << 17)))  # a 1 MB line: fills the pipe
    with pytest.raises(TargetError, match=r"the child did not read its input within 0\.5 s$"):
        target.apply(big)
    target.close()


def test_unsupported_answer_is_its_own_exception(child: Path) -> None:
    with _child_target(child, "unsupported") as target:
        with pytest.raises(UnsupportedOperation) as raised:
            target.apply(Mmap("ram", 4096))
        assert raised.value.op == "mmap"
        assert str(raised.value).endswith("does not support mmap")


def test_mmap_hva_is_taken_out_and_resolves_region_addresses(child: Path) -> None:
    with _child_target(child, "hva") as target:
        assert target.resolve is not None
        assert target.apply(Mmap("ram", 4096)) == {"errno": 0}
        assert target.resolve(RegionAddr("ram", 0x1000)) == (1 << 30) + 0x1000
        assert target.resolve(0x5000) == 0x5000


def test_a_command_that_cannot_start_is_unavailable() -> None:
    with pytest.raises(Exception, match="no-such-program: No such file"):
        make_target("subprocess:/no-such-program", DEFAULT_PROFILE)


def test_subprocess_names_are_target_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert "subprocess:./a-target --flag" in TARGET_NAMES
    assert "subprocess:" not in TARGET_NAMES and "qemu" not in TARGET_NAMES
    assert main(["replay", str(OVERLAP), "--target", "subprocess:"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "kvmspec: error: unknown target 'subprocess:' (reference, linux-kvm, subprocess:COMMAND)"
    )
