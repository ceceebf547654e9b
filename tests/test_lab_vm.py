"""spfs-lab run on the host: exit status, output streaming, bounded failures (issue 2 item 4).
Each test boots a real guest (about 15 s under TCG)."""

import subprocess
import time
from pathlib import Path


from spfs.lab import vm
from spfs.lab.paths import CHECKOUT

SPFS_LAB = [str(CHECKOUT / ".venv" / "bin" / "spfs-lab")]


def test_exit_status_and_output_come_back() -> None:
    proc = subprocess.run(SPFS_LAB + ["run", "--timeout", "120", "--", "sh", "-c",
                                      "echo out-$((6*7)); echo err >&2; uname -r; exit 7"],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 7, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "out-42"
    assert "err" in lines
    assert lines[-1].startswith("6.1.")  # the guest runs Debian's 6.1 kernel, not the host's


def test_guest_sees_checkout_and_writes_results(tmp_path: Path) -> None:
    result = vm.run(vm.RunSpec(argv=["sh", "-c", 'cp pyproject.toml "$SPFS_LAB_RESULTS/"; '
                                     'touch pyproject.toml'], cwd=CHECKOUT, timeout=120),
                    out=open("/dev/null", "wb"))
    assert result.status == 0
    assert (result.results / "pyproject.toml").read_bytes() == \
        (CHECKOUT / "pyproject.toml").read_bytes()
    assert result.boot_seconds is not None and result.boot_seconds < 60


def _lab_qemus() -> set[str]:
    return set(subprocess.run(["pgrep", "-f", "qemu-system-x86_64.*spfs.run="],
                              capture_output=True, text=True).stdout.split())


def test_timeout_is_bounded_and_reaps_qemu() -> None:
    others = _lab_qemus()  # another lab run of this machine is none of our business
    t0 = time.monotonic()
    proc = subprocess.run(SPFS_LAB + ["run", "--timeout", "5", "--", "sleep", "1000"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == vm.EXIT_TIMEOUT
    assert time.monotonic() - t0 < 30
    assert "timed out" in proc.stderr and "guest console" in proc.stderr
    assert _lab_qemus() <= others, "the timed-out guest's qemu is still running"


def test_boot_failure_gives_clear_error(tmp_path: Path, monkeypatch) -> None:
    """A guest whose boot script is missing powers off at once with the reason."""
    monkeypatch.setattr(vm, "GUEST_DIR", tmp_path)  # boot.sh does not exist there
    t0 = time.monotonic()
    result = vm.run(vm.RunSpec(argv=["true"], timeout=120), out=open("/dev/null", "wb"))
    assert result.status == vm.EXIT_LAB_ERROR
    assert time.monotonic() - t0 < 60
    assert "boot script" in vm.console_tail(result.run_dir)
