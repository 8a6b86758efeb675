"""The huge-page start-up of the ``valuefn`` command (valuefn._host)."""

import os
import platform
import subprocess
import sys

import pytest

from valuefn import _host


def _environment(environ, libc="glibc", thp_mode="madvise"):
    return _host.huge_pages_environment(environ, libc=libc, thp_mode=thp_mode)


def test_madvise_mode_on_glibc_adds_the_tunable_and_keeps_the_rest():
    environ = {"PATH": "/bin", "XLA_FLAGS": "--x"}
    assert _environment(environ) == {**environ, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert environ == {"PATH": "/bin", "XLA_FLAGS": "--x"}


def test_other_tunables_are_kept_and_the_new_one_appended():
    environ = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert _environment(environ)["GLIBC_TUNABLES"] == (
        "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    )


@pytest.mark.parametrize(
    "environ, libc, thp_mode",
    [
        ({}, "glibc", "always"),
        ({}, "glibc", "never"),
        ({}, "glibc", None),
        ({}, "", "madvise"),
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "glibc", "madvise"),
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "glibc", "madvise"),
        ({"VALUEFN_HUGE_PAGES": "0"}, "glibc", "madvise"),
    ],
)
def test_nothing_changes_where_the_tunable_cannot_help_or_is_already_chosen(
    environ, libc, thp_mode
):
    assert _environment(environ, libc, thp_mode) is None


def test_the_mode_read_is_the_bracketed_one(tmp_path, monkeypatch):
    mode_file = tmp_path / "enabled"
    monkeypatch.setattr(_host, "_THP_MODE", mode_file)
    assert _host.transparent_huge_pages() is None
    mode_file.write_text("always [madvise] never\n")
    assert _host.transparent_huge_pages() == "madvise"
    mode_file.write_text("[always] madvise never\n")
    assert _host.transparent_huge_pages() == "always"


@pytest.mark.skipif(sys.platform != "linux", reason="the start-up runs on Linux only")
def test_the_rerun_keeps_the_arguments_and_sets_the_tunable_once(tmp_path):
    """A script that calls ``rerun_with_huge_pages`` reports what its second start saw."""
    (tmp_path / "probe.py").write_text(
        "import os, sys\n"
        "from valuefn import _host\n"
        "print('start', flush=True)\n"
        "_host.rerun_with_huge_pages('probe')\n"
        "print(sys.argv[1:], os.environ.get('GLIBC_TUNABLES'))\n"
    )
    environ = {
        k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "VALUEFN_HUGE_PAGES")
    }
    environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(tmp_path), environ.get("PYTHONPATH")])
    )
    lines = subprocess.run(
        [sys.executable, "-m", "probe", "a b", "--c"],
        env=environ,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    expected = _host.huge_pages_environment(
        environ, libc=platform.libc_ver()[0], thp_mode=_host.transparent_huge_pages()
    )
    if expected is None:
        assert lines == ["start", "['a b', '--c'] None"]
    else:
        assert lines == ["start", "start", "['a b', '--c'] glibc.malloc.hugetlb=1"]
