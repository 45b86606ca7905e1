"""`pip install .` (not editable) into a throwaway virtualenv: the console script and the configs/
it ships work from a directory outside the checkout, and what runs is the installed copy."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from lingosteer import REPO_ROOT, config_path


# Run by the installed interpreter: where the packages and the configs they read come from.
WHERE_FROM = """
import json, alignment, lingosteer.entrypoints.serve, lingosteer
configs = lingosteer.config_path()
print(json.dumps({
    "lingosteer": lingosteer.__file__, "alignment": alignment.__file__, "configs": str(configs),
    "interference": str(lingosteer.entrypoints.serve.default_interference_file()),
    "files": sorted(str(p.relative_to(configs)) for p in configs.rglob("*") if p.is_file()),
}))
"""


def _copy_source_tree(destination: Path) -> Path:
    """The checkout's files as git sees them (tracked or new, not ignored), links kept as links.

    Built from a copy, because setuptools keeps its build/ folder between builds (a file deleted
    from the checkout would still be installed) and the test should leave the checkout as it was.
    """
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO_ROOT, capture_output=True, check=True).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO_ROOT / name
        if not source.is_symlink() and not source.exists():  # deleted, not yet committed
            continue
        (destination / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, destination / name, follow_symlinks=False)
    return destination


def _throwaway_venv(path: Path) -> Path:
    """A new virtualenv that reuses this environment's packages (dependencies, pip, setuptools).

    A plain path line in a .pth file adds the directory without running the .pth files in it,
    so the checkout's editable install (an import hook started by a .pth file) does not come along.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    site_packages = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                   capture_output=True, text=True, check=True).stdout.strip()
    ours = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    (Path(site_packages) / "reused-dependencies.pth").write_text("".join(f"{p}\n" for p in ours))
    return python


def _run(command: list, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run([str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return done


def test_non_editable_install_runs_from_any_directory(tmp_path, tiny_model_dir, data_dir):
    source = _copy_source_tree(tmp_path / "source")
    venv = tmp_path / "venv"
    python = _throwaway_venv(venv)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "LINGOSTEER_DATA_DIR")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PIP_NO_INDEX="1")
    elsewhere = tmp_path / "elsewhere"  # outside the checkout: nothing is found through the working directory
    elsewhere.mkdir()
    _run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", source], elsewhere, env)

    assert "align" in _run([venv / "bin" / "lingosteer", "--help"], elsewhere, env).stdout
    where = json.loads(_run([python, "-c", WHERE_FROM], elsewhere, env).stdout)
    for name in ("lingosteer", "alignment", "configs", "interference"):
        assert Path(where[name]).is_relative_to(venv), f"{name} comes from {where[name]}, not the installed copy"
    assert not Path(where["configs"]).is_symlink()  # the files themselves were installed, not the link
    shipped = sorted(str(p.relative_to(config_path())) for p in config_path().rglob("*") if p.is_file())
    assert where["files"] == shipped

    # A real command that needs configs/: "sw" becomes swh_Latn through configs/languages.tsv.
    _run([venv / "bin" / "lingosteer", "align", "fit", "--model", tiny_model_dir("llama"), "--source", "sw",
          "--data", f"sib200:train@{data_dir}", "--max-pairs", "20", "--chunk-size", "16", "--layers", "0",
          "--out", "swh_Latn"], elsewhere, env)
    manifest = json.loads((elsewhere / "swh_Latn" / "manifest.json").read_text())
    assert (manifest["source"], manifest["target"], manifest["layers"]) == ("swh_Latn", "eng_Latn", [0])


@pytest.mark.parametrize("parts", [("languages.tsv",), ("bench", "groups.yaml"), ("interference",)])
def test_config_path_finds_the_shipped_configs(parts):
    assert config_path(*parts).exists()
    assert config_path(*parts).resolve() == (REPO_ROOT / "configs").joinpath(*parts).resolve()
