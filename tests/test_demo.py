"""The README's first command: the demo runs the whole flow and leaves nothing behind; without
its extra it names the extra in one line."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(180)


def _namespaces() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}


@pytest.mark.root
def test_demo_runs_the_whole_flow_and_cleans_up(python_for_other_uids: str) -> None:
    done = subprocess.run(
        [python_for_other_uids, "-c", "from azwi_netproxy.demo import main; raise SystemExit(main())"],
        check=False, capture_output=True, text=True, timeout=150, cwd="/",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "NOT Entra" in out  # the stand-in is named for what it is
    assert "curl as uid 1000" in out and "-> 200" in out
    assert "token for client 11111111-1111-4111-8111-111111111111" in out
    assert "token for client 22222222-2222-4222-8222-222222222222" in out
    assert "proxy stopped; curl as uid 1000 -> refused" in out
    assert "0 of them for a token" in out
    assert "every step behaved as expected" in out
    # The namespaces it says it made are gone. (Not "the same list as before": tests of other
    # sessions on the same machine make and remove namespaces meanwhile.)
    sandbox_line = out.partition("sandbox: namespaces")[2].partition("\n")[0]
    made = set(re.findall(r"\baz(?:pod|imds|sts|peer)-[0-9a-f]+\b", sandbox_line))
    assert len(made) == 3, out
    assert made & _namespaces() == set()


@pytest.mark.root
def test_demo_refuses_to_run_unprivileged(python_for_other_uids: str) -> None:
    done = subprocess.run(
        ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", python_for_other_uids, "-c",
         "from azwi_netproxy.demo import main; raise SystemExit(main())"],
        check=False, capture_output=True, text=True, timeout=30, cwd="/",
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["azwi-netproxy-demo: run as root (it creates network namespaces)"]


# The console script as pip installs it (its entry point, looked up by name), in an
# interpreter where `import pyroute2` fails as it does after `pip install azwi-netproxy`
# without the demo extra: a None in sys.modules makes the import raise ModuleNotFoundError.
WITHOUT_PYROUTE2 = """
import sys
from importlib.metadata import entry_points
sys.modules["pyroute2"] = None
sys.argv = ["azwi-netproxy-demo"]
sys.exit(entry_points(group="console_scripts")["azwi-netproxy-demo"].load()())
"""


def test_without_the_demo_extra_one_line_names_it_and_exits_2() -> None:
    done = subprocess.run([sys.executable, "-c", WITHOUT_PYROUTE2], check=False, capture_output=True,
                          text=True, timeout=30, cwd="/")
    assert done.returncode == 2, done
    assert done.stderr.splitlines() == [
        "azwi-netproxy-demo: error: the demo needs pyroute2: pip install 'azwi-netproxy[demo]'"]
