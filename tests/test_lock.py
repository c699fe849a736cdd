"""One writer per run folder: a second process on a locked folder is refused at once, in one line naming the folder
and the holder's PID, before it writes anything; a lock whose holder is gone is taken over."""

import os
import subprocess
import sys

import pytest

from diffinject.core.lock import FolderBusy, lock_folder


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "diffinject.workers.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_a_second_process_is_refused_in_one_line_and_writes_nothing(tmp_path):
    folder = tmp_path / "run"
    lock_folder(folder)  # this process is the writer
    lock_folder(folder)  # and may open its folder again
    for command in (["run", "--preset", "quick", "--no-progress", "--out", str(folder)],
                    ["export", str(folder), "--to", str(tmp_path / "out")]):
        (folder / "synthetic").mkdir(exist_ok=True)
        (folder / "synthetic" / "samples.pt").write_bytes(b"")  # export looks for the samples before the lock
        done = _cli(*command)
        assert done.returncode == 2, done.stderr[-2000:]
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and f"run folder {folder.resolve()} is in use" in lines[0], done.stderr[-2000:]
        assert f"(pid {os.getpid()})" in lines[0]
    assert sorted(p.name for p in folder.rglob("*")) == [".lock", "samples.pt", "synthetic"]  # no config.json
    assert not (tmp_path / "out").exists()


def test_a_lock_whose_holder_is_gone_is_taken_over(tmp_path):
    folder = tmp_path / "run"
    code = f"from diffinject.core.lock import lock_folder; lock_folder({str(folder)!r}); print('held')"
    held = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert held.stdout.strip() == "held", held.stderr
    assert (folder / ".lock").read_text().strip() != str(os.getpid())  # the gone process's PID is still written
    lock_folder(folder)
    assert (folder / ".lock").read_text().strip() == str(os.getpid())


def test_a_held_lock_names_its_holder(tmp_path):
    folder = tmp_path / "run"
    code = (f"import sys; from diffinject.core.lock import lock_folder; lock_folder({str(folder)!r}); "
            "print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderBusy, match=rf"in use by another diffinject process \(pid {holder.pid}\)"):
            lock_folder(folder)
    finally:
        holder.communicate("", timeout=60)
    lock_folder(folder)  # released with its process
