"""The build's huge-page re-execution: which switches it sets, when it stays out of the way, and
that a real re-executed process sees them."""

import os
import subprocess
import sys
import textwrap

import pytest

from moqe_compile.cli import hugepages as hp


def test_environment_adds_both_switches_and_keeps_users_tunables():
    env = hp.environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "PATH": "/bin"})
    assert env["THP_MEM_ALLOC_ENABLE"] == "1"
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert env[hp.DONE] == "1" and env["PATH"] == "/bin"


def test_environment_keeps_a_users_own_choice():
    env = hp.environment({"THP_MEM_ALLOC_ENABLE": "0", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert env["THP_MEM_ALLOC_ENABLE"] == "0"
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"


def test_wanted_only_once_on_linux_with_thp_and_not_switched_off(tmp_path):
    madvise, never = tmp_path / "madvise", tmp_path / "never"
    madvise.write_text("always [madvise] never\n")
    never.write_text("always madvise [never]\n")
    assert hp.wanted({}, "linux", madvise)
    assert not hp.wanted({}, "linux", never)
    assert not hp.wanted({}, "linux", tmp_path / "missing")
    assert not hp.wanted({}, "darwin", madvise)
    assert not hp.wanted({hp.SWITCH: "0"}, "linux", madvise)
    assert not hp.wanted({hp.DONE: "1"}, "linux", madvise)  # no second re-execution


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="re-executes only on Linux")
def test_reexecuted_process_sees_the_switches(tmp_path):
    mode = tmp_path / "mode"
    mode.write_text("always [madvise] never\n")
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        from moqe_compile.cli import hugepages as hp
        hp.THP_MODE = Path({str(mode)!r})
        if hp.DONE in os.environ:
            print(os.environ["THP_MEM_ALLOC_ENABLE"], os.environ["GLIBC_TUNABLES"], sys.argv[1:])
        else:
            hp.reexec_with_hugepages()
            print("not re-executed")
    """))
    env = {k: v for k, v in os.environ.items() if k not in (hp.DONE, hp.SWITCH, "GLIBC_TUNABLES",
                                                           "THP_MEM_ALLOC_ENABLE")}
    out = subprocess.run([sys.executable, str(script), "build", "-o", "x"], env=env, capture_output=True,
                         text=True, check=True).stdout.split("\n")[0]
    assert out == "1 glibc.malloc.hugetlb=1 ['build', '-o', 'x']"
    env[hp.SWITCH] = "0"
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "not re-executed"
