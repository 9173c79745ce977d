"""The wheel carries the configs, and pyproject lists every package."""

import subprocess
import sys
import tomllib
import zipfile

from conftest import REPO


def test_pyproject_lists_every_package():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts)
               for top in ("fahr", "data_pipelines") for p in (REPO / top).rglob("__init__.py")}
    on_disk |= {"fahr.conf"}
    assert on_disk <= listed, f"add to pyproject.toml [tool.setuptools] packages: {sorted(on_disk - listed)}"


def test_wheel_ships_configs(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(REPO)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("fahr-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for cfg in ["pretrain.yaml", "demo.yaml", "export.yaml", "experiment/demo_pretrain.yaml",
                "experiment/fahr_face_pretrain.yaml", "model/vit_base.yaml", "logger/wandb.yaml"]:
        assert f"fahr/conf/{cfg}" in names
    assert not any(n.startswith("fahr/conf/local/") and n.endswith(".yaml") for n in names)
