"""A chapter's set-up cells run as Colab runs them: a fresh virtual environment holding only the
notebook, the install cell's path taken (``google.colab`` importable), the package installed from
a wheel built from this tree (``ADLIB_INSTALL``, the install cell's override of the git URL), and the
data downloaded by the cell itself from a local HTTP server (``ADLIB_MVTEC_URL``) into an empty home."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, f"{cmd[:4]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The package built from this tree, as `pip install git+URL` would build it."""
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)])
    (built,) = out.glob("adlib_book-*.whl")
    return built


def test_sync_tool_reports_every_notebook_in_step():
    """Install cells, GPU metadata and run-time lines are written from _config.yml / pyproject.toml."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "sync_notebooks.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    url = next(line.split("url:")[1].strip() for line in (ROOT / "_config.yml").read_text().splitlines()
               if line.strip().startswith("url:"))
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = json.loads(path.read_text())
        assert nb["metadata"]["accelerator"] == "GPU"
        install = "".join(next(c for c in nb["cells"] if c["cell_type"] == "code")["source"])
        assert "adlib-book[" in install and f"@ git+{url}" in install, path.name
        assert "colab-badge" not in "".join(nb["cells"][0]["source"])   # Jupyter Book's launch button instead


def _real_bottle_archive(real_root: Path, out: Path) -> None:
    """``bottle.tar.xz`` of real bottle files, a few per folder (masks with their images), as MVTec serves it."""
    category = real_root / "bottle"
    with tarfile.open(out, "w:xz", preset=0) as tar:
        for folder in sorted(p for p in category.glob("*/*") if p.is_dir()):
            for path in sorted(folder.glob("*.png"))[:2]:
                tar.add(path, arcname=str(path.relative_to(real_root)))
                if folder.parent.name == "test" and folder.name != "good":
                    mask = category / "ground_truth" / folder.name / f"{path.stem}_mask.png"
                    tar.add(mask, arcname=str(mask.relative_to(real_root)))
        for name in ("license.txt", "readme.txt"):
            if (category / name).is_file():
                tar.add(category / name, arcname=f"bottle/{name}")


@pytest.mark.slow
def test_chapter_00_set_up_cells_in_a_fresh_environment_as_in_colab(wheel, tmp_path, real_root):
    venv = tmp_path / "venv"
    _run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    # The heavy dependencies (torch, pip, ...) come from this project's environment through a .pth line,
    # as Colab has them preinstalled; adlib itself is only what the install cell installs.
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "preinstalled.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    fake = tmp_path / "fake_colab" / "google" / "colab"
    fake.mkdir(parents=True)
    (fake.parent / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("# stands in for Colab's module: its presence is how a notebook knows\n")
    nb = json.loads((ROOT / "notebooks" / "00_data_and_metrics.ipynb").read_text())
    code = [("".join(c["source"])) for c in nb["cells"] if c["cell_type"] == "code"][:2]
    script = tmp_path / "setup_cells.py"
    script.write_text("\n\n".join(code) + textwrap.dedent("""

        import adlib, os
        print("IN_COLAB", IN_COLAB)
        print("adlib from", os.path.dirname(adlib.__file__))
    """))
    from test_download import Server   # the local HTTP server of the download tests (Range requests)

    served = tmp_path / "served"
    (served / "mvtec").mkdir(parents=True)
    _real_bottle_archive(real_root, served / "mvtec" / "bottle.tar.xz")
    server = Server(served)
    server.thread.start()
    home = tmp_path / "home"   # an empty user cache: the data can only come from the download
    env = {k: v for k, v in os.environ.items() if k not in ("ADLIB_DATA", "XDG_CACHE_HOME")}
    env.update({"PYTHONPATH": str(tmp_path / "fake_colab"), "MPLBACKEND": "Agg", "HOME": str(home),
                "ADLIB_INSTALL": f"{wheel}[notebooks]", "PIP_NO_INDEX": "1", "ADLIB_MVTEC_URL": server.url})
    try:
        proc = _run([str(python), str(script)], cwd=tmp_path, env=env)
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
    assert "IN_COLAB True" in proc.stdout
    assert f"adlib from {site}" in proc.stdout          # the installed wheel, not this checkout
    assert "data: real MVTec AD 'bottle'" in proc.stdout and "device: " in proc.stdout
    assert server.paths() == ["/mvtec/bottle.tar.xz"]    # downloaded once, by the set-up cell
    downloaded = home / ".cache" / "adlib" / "mvtec_ad" / "bottle"
    assert sorted(p.name for p in (downloaded / "train" / "good").glob("*.png")) == \
        sorted(p.name for p in sorted((real_root / "bottle" / "train" / "good").glob("*.png"))[:2])
