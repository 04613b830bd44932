"""Safe outputs (elastic_fx._io): refused paths, atomic files, all-or-nothing folders, one writer."""

import os
import stat
import subprocess
import sys
import textwrap

import pytest

from elastic_fx._io import atomic_write, check_output, replace_dir
from elastic_fx.errors import ElasticFxError, ExportError


@pytest.mark.parametrize("make, pattern", [
    (lambda t: "", "is empty"),
    (lambda t: t, "is a directory, not a file"),
    (lambda t: os.symlink(t / "x", t / "l") or t / "l", "symbolic link"),
    (lambda t: os.mkfifo(t / "f") or t / "f", "special file"),
    (lambda t: "/proc/self/efx", "inside /proc"),
    (lambda t: "/sys/efx", "inside /sys"),
    (lambda t: "/dev/efx", "inside /dev"),
    (lambda t: t / ("n" * 256), "longer than"),
    (lambda t: (t / "f.txt").write_text("x") and t / "f.txt" / "y", "it is a file, not a directory"),
])
def test_unsafe_outputs_are_refused(make, pattern, tmp_path):
    path = make(tmp_path)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ElasticFxError, match=pattern):
        atomic_write(path, lambda tmp: tmp.write_text("data"))
    assert sorted(os.listdir(tmp_path)) == before


def test_a_name_at_the_limit_is_written_and_the_mode_follows_the_umask(tmp_path):
    name = "n" * 255
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / name, lambda tmp: tmp.write_text("data"))
    finally:
        os.umask(old)
    assert (tmp_path / name).read_text() == "data"
    assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644
    assert os.listdir(tmp_path) == [name]


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    out = tmp_path / "out"
    replace_dir(out, lambda tmp: (tmp / "a.txt").write_text("1"))
    owned = lambda d: {p.name for p in d.iterdir()} <= {"a.txt", "b.txt"}  # noqa: E731

    def broken(tmp):
        (tmp / "b.txt").write_text("half")
        raise RuntimeError("failed half way")

    with pytest.raises(RuntimeError):
        replace_dir(out, broken, owned=owned)
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]  # untouched
    replace_dir(out, lambda tmp: (tmp / "b.txt").write_text("2"), owned=owned)
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]  # replaced whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder or lock left
    (out / "mine.txt").write_text("user file")
    with pytest.raises(ElasticFxError, match="already holds files that elastic-fx did not write"):
        replace_dir(out, lambda tmp: None, owned=owned)


def test_a_second_process_writing_the_same_folder_is_refused(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from elastic_fx._io import _lock
        from elastic_fx.errors import ExportError
        with _lock(Path({str(out)!r}), ExportError):
            print("locked", flush=True)
            sys.stdin.readline()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ExportError, match="another elastic-fx process is writing"):
            replace_dir(out, lambda tmp: (tmp / "a").write_text("x"), ExportError)
        assert not out.exists()
    finally:
        holder.communicate("\n", timeout=60)
    replace_dir(out, lambda tmp: (tmp / "a").write_text("x"), ExportError)  # free again
    assert (out / "a").read_text() == "x"


def test_check_output_allows_plain_paths(tmp_path):
    assert check_output(tmp_path / "new" / "deeper" / "x.efx") == tmp_path / "new" / "deeper" / "x.efx"
    assert check_output(tmp_path, directory=True) == tmp_path
    with pytest.raises(ExportError, match="not a directory"):
        (tmp_path / "f").write_text("x")
        check_output(tmp_path / "f", "--out-dir", ExportError, directory=True)
