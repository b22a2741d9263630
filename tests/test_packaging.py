"""`pip install .` (not editable) gives working console scripts and a loadable addon file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A venv (as if activated: its bin/ alone on PATH) holding a regular install of a copy of
    the sources (so no build/ lands in the checkout). The dependencies come from the test venv
    through a .pth line, which adds its directory but not its .pth files: the editable install
    stays invisible."""
    work = tmp_path_factory.mktemp("packaging")
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    shutil.copytree(ROOT / "lib", source / "lib", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    (site / "test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", str(source)],
        check=True,
        capture_output=True,
    )
    return venv


def test_console_scripts_and_the_addon_work_from_a_regular_install(installed, tmp_path, confdir, upstream, marker):
    bin_ = installed / "bin"
    addon = subprocess.check_output([bin_ / "ai-cache", "addon-path"], text=True).strip()
    assert Path(addon).is_relative_to(installed) and Path(addon).is_file()
    package = subprocess.check_output(
        [bin_ / "python", "-c", "import ai_cache.addon; print(ai_cache.addon.__file__)"], text=True
    )
    assert Path(package).is_relative_to(installed)  # not the checkout's lib/
    # with-ai-cache runs `mitmdump -s "$(ai-cache addon-path)"` with the installed package.
    log = tmp_path / "proxy.log"
    program = (
        "import httpx, sys; print(httpx.post(sys.argv[1] + '/v1/chat/completions', json={'model': 'm', "
        "'messages': [{'role': 'user', 'content': sys.argv[2]}]}).headers['x-ai-cache-status'])"
    )
    ran = subprocess.run(
        [
            bin_ / "with-ai-cache",
            "--dir",
            str(tmp_path / "c"),
            "--confdir",
            str(confdir),
            "--log",
            str(log),
            "--",
            sys.executable,
            "-c",
            program,
            upstream.url,
            marker,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": str(bin_)},
    )
    assert (ran.returncode, ran.stdout) == (0, "MISS\n"), ran.stderr
    assert f"Loading script {addon}" in log.read_text()
    assert "ai-cache: mode=record" in log.read_text()
    assert "ai-cache: 1 LLM call: 0 hits, 1 miss; 1 stored" in ran.stderr
    listed = subprocess.run([bin_ / "ai-cache", "--dir", str(tmp_path / "c"), "ls"], capture_output=True, text=True)
    assert listed.returncode == 0 and marker in listed.stdout, listed.stderr
