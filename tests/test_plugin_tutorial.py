"""The tutorial of docs/plugins.md, run as a reader would: its files written out from the
page's code blocks, `pip install -e kudos/`, then its own tests (three real daemons among
them), its command and its listing.

The install goes into a throwaway virtual environment layered over the test's own (which
holds valuemesh), so the test's environment never gains the kudos plugin.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
DOCS = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"
# A tutorial file is a code block whose first line is a comment naming its path under kudos/.
FILE_BLOCK = re.compile(r"```(?:python|toml)\n# (kudos/\S+)\n(.*?)```", re.DOTALL)
FILES = {"kudos/pyproject.toml", "kudos/valuemesh_kudos/__init__.py", "kudos/valuemesh_kudos/commands.py",
         "kudos/valuemesh_kudos/routes.py", "kudos/tests/test_kudos.py", "kudos/tests/test_routes.py",
         "kudos/tests/test_agreement.py"}
INSTALL_TIMEOUT_S = 240
PYTEST_TIMEOUT_S = 180


def tutorial_files() -> dict[str, str]:
    """Path -> text of every file the tutorial (section 1) shows, its header comment included."""
    text = DOCS.read_text()
    part = text[text.index("## 1. Tutorial"):text.index("## 2. ")]
    return {path: f"# {path}\n{body}" for path, body in FILE_BLOCK.findall(part)}


def overlay_venv(root: Path) -> Path:
    """A venv whose site-packages also reads this interpreter's, with their .pth files
    (valuemesh's editable install is one); what is installed into it stays in it."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    ours = sysconfig.get_paths()["purelib"]
    Path(site, "_valuemesh_tests_overlay.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    return python


def run(cmd: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VALUEMESH_HOME")}
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def test_the_page_shows_every_file_of_the_tutorial_once() -> None:
    text = DOCS.read_text()
    assert set(tutorial_files()) == FILES
    assert len(FILE_BLOCK.findall(text)) == len(FILES)
    tree = text[text.index("### 1.1 The package"):text.index("`pyproject.toml` names")]
    assert all(Path(f).name in tree for f in FILES)


def test_the_tutorial_installs_and_passes_its_own_tests(tmp_path: Path) -> None:
    for path, body in tutorial_files().items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(body)
    python = overlay_venv(tmp_path / "venv")

    # 1.6, as written, from the folder that holds kudos/.
    run([str(python), "-m", "pip", "install", "--quiet", "-e", "kudos/"], tmp_path, INSTALL_TIMEOUT_S)
    # 1.3, 1.5 and 1.7: `pytest` in kudos/, three real daemons included (about 12 s alone).
    pytest_in_kudos = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    out = run(pytest_in_kudos, tmp_path / "kudos", PYTEST_TIMEOUT_S).stdout
    assert "4 passed" in out, out

    valuemesh = [str(python), "-m", "valuemesh.cli.main", "--home", str(tmp_path / "home")]
    listed = json.loads(run([*valuemesh, "--json", "plugin", "list"], tmp_path).stdout)
    [doc] = [p for p in listed["plugins"] if p["name"] == "kudos"]
    assert (doc["version"], doc["distribution"], doc["error"], doc["hook_errors"]) == (
        "1.0", "valuemesh-kudos", None, {})
    assert doc["cli"] and doc["routes"] and doc["views"] == ["counts"]
    assert "Give kudos to MEMBER" in run([*valuemesh, "kudos", "give", "--help"], tmp_path).stdout
