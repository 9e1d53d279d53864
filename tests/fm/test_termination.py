"""SIGTERM (SLURM time limit, scancel, Nextflow) runs the cleanup code: locks and temporaries go."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

HOLDER = textwrap.dedent("""
    import sys, time
    from fm.io import ItemLock, atomic_path
    from fm.termination import exit_on_sigterm
    if sys.argv[2] == "handled":
        assert exit_on_sigterm()
    lock = ItemLock(sys.argv[1] + "/slide.h5")
    assert lock.acquire()
    try:
        with atomic_path(sys.argv[1] + "/slide.h5") as tmp:
            tmp.write_text("half")
            print("ready", flush=True)
            time.sleep(60)
    finally:
        lock.release()
""")


def _terminate(tmp_path, mode: str) -> int:
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), mode], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    child.send_signal(signal.SIGTERM)
    return child.wait(30)


def test_sigterm_releases_locks_and_removes_temporaries(tmp_path):
    assert _terminate(tmp_path, "handled") == 143
    assert list(tmp_path.iterdir()) == []


def test_without_the_handler_a_terminated_process_leaves_them(tmp_path):
    # the control: Python's default dies on the spot, skipping every finally
    assert _terminate(tmp_path, "default") == -signal.SIGTERM
    left = sorted(p.name for p in tmp_path.iterdir())
    assert "slide.h5.lock" in left and any(name.startswith(".tmp-slide.h5.") for name in left)


def test_someone_elses_handler_is_kept_and_a_second_sigterm_is_ignored():
    from fm.termination import exit_on_sigterm

    previous = signal.signal(signal.SIGTERM, lambda *a: None)  # e.g. Lightning's SLURM handler
    try:
        assert not exit_on_sigterm()
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        assert exit_on_sigterm()
        with pytest.raises(SystemExit) as exit_info:
            signal.raise_signal(signal.SIGTERM)
        assert exit_info.value.code == 143
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN  # a second SIGTERM cannot cut the cleanup
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_every_command_ends_cleanly_on_sigterm_and_says_how_to_resume():
    command = textwrap.dedent("""
        import sys, time
        from fm import cli
        def invoke(verb, argv):
            print("ready", flush=True)
            time.sleep(60)
        cli.invoke = invoke
        sys.exit(cli.extract_main([]))
    """)
    child = subprocess.Popen([sys.executable, "-c", command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline().strip() == "ready"
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=30)
    assert child.returncode == 143
    assert "fm-extract: terminated (SIGTERM)" in err and "again to resume" in err and "Traceback" not in err


def test_a_command_run_in_process_leaves_the_default_handler_behind(monkeypatch):
    from fm import cli

    seen = []
    monkeypatch.setattr(cli, "invoke", lambda verb, argv: seen.append(signal.getsignal(signal.SIGTERM)))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert cli.extract_main([]) == 0
    assert seen and seen[0] is not signal.SIG_DFL  # installed while the command ran
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
