"""Colab, played in CI: the notebooks' setup cell, run through IPython in a process that has
never seen `minimal`, must make `import minimal` and `load_model()` work without a restart."""

import json
import os
import re
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import colab_setup_cell  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def code_cells(path):
    return ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def test_every_setup_cell_and_badge_is_made_from_the_one_url():
    url = colab_setup_cell.repository_url()
    assert url.startswith("https://github.com/")
    for path in NOTEBOOKS:
        assert code_cells(path)[0] == colab_setup_cell.setup_cell(), (
            f"{path.name}: its setup cell differs; run python scripts/colab_setup_cell.py --write")
        assert code_cells(path)[-1] == colab_setup_cell.CLOSING, (
            f"{path.name}: its last cell is not the closing cell; run python scripts/colab_setup_cell.py --write")
        intro = "".join(json.loads(path.read_text())["cells"][0]["source"])
        assert colab_setup_cell.badge(path.name) in intro, f"{path.name}: its Colab badge is not made from {url}"
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"https://colab\.research\.google\.com/github/[^)\s]+", readme)
    assert len(links) == len(NOTEBOOKS)
    for path in NOTEBOOKS:
        assert colab_setup_cell.badge(path.name) in readme, f"README: the badge of {path.name} is not made from {url}"
    assert not re.search(r"github\.com/(?!" + re.escape(url.removeprefix("https://github.com/")) + r")[\w-]+/minimal\b",
                         readme), "README names another repository address"


DRIVER = textwrap.dedent('''
    import importlib.machinery, sys, types
    try:
        import minimal
        raise SystemExit("minimal is importable before the setup cell: the test proves nothing")
    except ModuleNotFoundError:
        pass
    colab = types.ModuleType("google.colab")  # what Colab's kernel has imported
    colab.__spec__ = importlib.machinery.ModuleSpec("google.colab", None)
    sys.modules["google.colab"] = colab
    from IPython.core.interactiveshell import InteractiveShell
    shell = InteractiveShell.instance()
    setup, imports = sys.argv[1], sys.argv[2]
    import os
    good = os.environ["MINIMAL_REPO_URL"]
    os.environ["MINIMAL_REPO_URL"] = good + "-does-not-exist"
    result = shell.run_cell(setup)
    assert isinstance(result.error_in_exec, RuntimeError), result.error_in_exec
    assert "could not clone " + good + "-does-not-exist" in str(result.error_in_exec), result.error_in_exec
    os.environ["MINIMAL_REPO_URL"] = good
    for attempt in (1, 2):  # running the cell again is harmless
        shell.run_cell(setup).raise_error()
    shell.run_cell(imports).raise_error()
    import minimal
    print("minimal from", minimal.__file__)
    print("model", type(shell.user_ns["model"]).__name__, shell.user_ns["model"].config.num_hidden_layers)
''')


def test_setup_cell_works_in_a_fresh_kernel_like_colabs(tmp_path):
    # A virtual environment of its own (so pip installs there, not into ours) that sees our
    # packages, torch included, but not our editable install of `minimal`: a plain path line
    # in a .pth file adds the folder without running the .pth files inside it.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "our-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = dict(os.environ, MINIMAL_REPO_URL=str(ROOT), MINIMAL_CLONE_DIR=str(tmp_path / "content" / "minimal"),
               MINIMAL_PROFILE="smoke", PYTHONNOUSERSITE="1")
    env.pop("PYTHONPATH", None)
    imports = code_cells(ROOT / "notebooks" / "00_the_problem.ipynb")[1]  # the notebook's own import cell
    run = subprocess.run([str(python), "-c", DRIVER, colab_setup_cell.setup_cell(), imports],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"minimal from {tmp_path / 'content' / 'minimal' / 'minimal'}" in run.stdout, run.stdout
    assert "model LlamaForCausalLM 30" in run.stdout, run.stdout
