"""The README's two commands: their shape, and `.ci/run` running the test one verbatim.

Running them takes minutes (a 6.6 GB install, then the demo or the whole suite), so this
file checks what keeps them working in either order on one clone: one line each, the same
venv step tolerating an existing `.venv`, `.ci/run` ending with the test command verbatim,
and its pytest arguments selecting a slow and a cluster test that the quick default
deselects (collection only, no test runs). The check is also run on broken copies of the
README and .ci/run, so a check that checks nothing fails.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI = ROOT / ".ci" / "run"
PREFIX = "python3 -m pip install uv && "
CLUSTER_TEST = "tests/test_cluster.py::test_local_multinode_scores_the_demo_and_stops_only_its_own_nodes"
SLOW_TEST = "tests/test_faults_train.py::test_train_worker_killed_resumes_from_checkpoint"


def two_commands(text: str) -> tuple[str, str]:
    """(demo command, test command): the bash blocks of the "Two commands" section."""
    m = re.search(r"^## Two commands.*?$(.*?)^## ", text, re.MULTILINE | re.DOTALL)
    assert m, "README.md has no '## Two commands' section"
    blocks = re.findall(r"^```bash\n(.*?)^```", m.group(1), re.MULTILINE | re.DOTALL)
    assert len(blocks) == 2, f"expected 2 bash blocks in the section, found {len(blocks)}"
    lines = [b.strip() for b in blocks]
    for b in lines:
        assert "\n" not in b, f"each command must be one line, got:\n{b}"
    (demo,) = [b for b in lines if b.endswith(".venv/bin/python jobs/demo.py")]
    (test,) = [b for b in lines if " -m pytest" in b]
    return demo, test


def command_lines(script: str) -> list[str]:
    """The non-blank, non-comment lines of a shell script."""
    return [line.strip() for line in script.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def venv_step(cmd: str) -> str:
    steps = cmd.split(" && ")
    assert cmd.startswith(PREFIX) and len(steps) == 4, f"expected `{PREFIX}<venv> && <install> && <run>`: {cmd}"
    return steps[1]


def check_commands(readme: str, ci: str) -> None:
    """The README's two commands and .ci/run agree; AssertionError naming what does not."""
    demo, test = two_commands(readme)
    # the first command's .venv must not make the second fail: `uv venv` without
    # --allow-existing (or a guard) exits 2 on "A virtual environment already exists"
    assert venv_step(demo) == venv_step(test), (venv_step(demo), venv_step(test))
    step = venv_step(test)
    assert "--allow-existing" in shlex.split(step) or step.startswith("[ -x .venv/bin/python ] ||"), (
        f"the venv step must keep an existing .venv (--allow-existing): {step}"
    )
    assert demo.split(" && ")[2] == "uv pip install -p .venv -e '.[metrics]'", demo
    assert test.split(" && ")[2] == "uv pip install -p .venv -e '.[test]'", test
    lines = command_lines(ci)
    assert test in lines, f".ci/run does not run the README's test command:\n  {test}"
    # last, so the script's exit status is the tests'
    assert lines[-1] == test, f".ci/run runs something after the tests: {lines[-1]!r}"
    assert "set -euo pipefail" in lines, ".ci/run must stop at the first failing command"


def test_readme_commands_and_ci_agree():
    check_commands(README.read_text(), CI.read_text())


OLD_VENV = "uv venv -p 3.11 .venv"  # what the README had: fails when .venv exists


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda r, c, t: (r.replace(venv_step(t), OLD_VENV), c.replace(venv_step(t), OLD_VENV)), "allow-existing"),
        (lambda r, c, t: (r.replace(t, t.replace(" -q", " -q -x")), c), "does not run the README's test command"),
        (lambda r, c, t: (r, c + "echo done\n"), "runs something after the tests"),
        (lambda r, c, t: (r, c.replace("set -euo pipefail", "set -u")), "first failing command"),
        (lambda r, c, t: (r.replace(" && .venv/bin/python jobs/demo.py", " &&\n.venv/bin/python jobs/demo.py"), c), "one line"),
    ],
    ids=["old_venv_step", "readme_changed_alone", "ci_runs_more", "ci_without_set_e", "two_line_command"],
)
def test_a_broken_readme_or_ci_fails_the_check(break_it, message):
    readme, ci = README.read_text(), CI.read_text()
    readme, ci = break_it(readme, ci, two_commands(readme)[1])
    with pytest.raises(AssertionError, match=message):
        check_commands(readme, ci)


def _collected(args: list[str]) -> list[str]:
    quiet = [] if "-q" in args else ["-q"]  # exactly one -q: node ids, one a line
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", *quiet, "-p", "no:cacheprovider", *args,
         CLUSTER_TEST.split("::")[0], SLOW_TEST.split("::")[0]],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return [line for line in r.stdout.splitlines() if "::" in line]


def test_the_readme_test_command_selects_the_slow_and_cluster_tests_the_default_deselects():
    _, test = two_commands(README.read_text())
    argv = shlex.split(test.split(" && ")[3])
    assert argv[:3] == [".venv/bin/python", "-m", "pytest"], argv
    with_readme_args = _collected(argv[3:])
    default = _collected([])
    for t in (CLUSTER_TEST, SLOW_TEST):
        assert t in with_readme_args, f"the README's test command deselects {t}"
        assert t not in default, f"the quick default (pyproject addopts) should deselect {t}"
    assert set(default) < set(with_readme_args)
