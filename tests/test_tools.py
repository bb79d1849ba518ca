"""A fresh machine passes or fails loudly: every tool the suite runs is
installed by ``make test``, and nothing skips quietly when one is missing.

(Debian's etcd-server ships no etcdctl; the restore and auth tests once
skipped or errored on a fresh machine while CI, on a machine where etcdctl had
been installed by hand, stayed green.)
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import require_tool

ROOT = Path(__file__).resolve().parent.parent


def makefile_tools() -> dict[str, str]:
    """The Makefile's ``TOOLS`` list: command -> Debian package."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")  # join continued lines
    match = re.search(r"^TOOLS\s*=\s*(.+)$", text, re.M)
    assert match, "the Makefile has no TOOLS list"
    return dict(pair.split(":", 1) for pair in match.group(1).split())


def test_the_makefile_installs_every_tool_the_suite_runs() -> None:
    tools = makefile_tools()
    assert {"etcd", "etcdctl"} <= set(tools), tools
    assert tools["etcdctl"] == "etcd-client", "Debian's etcd-server ships no etcdctl"


@pytest.mark.parametrize("tool", sorted(makefile_tools()))
def test_every_listed_tool_is_installed(tool: str) -> None:
    if tool.startswith("/"):  # a file, not a command (ZooKeeper's jar)
        assert Path(tool).exists(), f"{tool} is missing: `make test` installs it"
    else:
        require_tool(tool)


def test_a_skip_or_a_missing_tool_fails_the_run(tmp_path: Path) -> None:
    """Run pytest on a scratch test file with the suite's no-skip plugin: a
    skip, a skipif and ``require_tool`` of a missing command all fail."""
    (tmp_path / "test_scratch.py").write_text(
        textwrap.dedent(
            """
            import pytest
            from helpers import require_tool

            def test_skips():
                pytest.skip("etcdctl is not installed")

            @pytest.mark.skipif(True, reason="not on this machine")
            def test_skipif():
                pass

            def test_tool():
                require_tool("no-such-tool-on-any-machine")

            def test_passes():
                pass
            """
        )
    )
    tests_dir = Path(__file__).resolve().parent
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no_skips", "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), str(tmp_path / "test_scratch.py")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={"PYTHONPATH": str(tests_dir), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    summary = out.stdout.strip().splitlines()[-1]
    assert out.returncode == 1, out.stdout + out.stderr
    assert "skipped" not in summary, summary
    assert "1 passed" in summary, summary
    assert "2 failed" in summary and "1 error" in summary, summary
