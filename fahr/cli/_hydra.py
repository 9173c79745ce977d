"""Where the Hydra configs live, whether fahr runs from a checkout or an installed wheel."""

from __future__ import annotations

from pathlib import Path


def config_dir() -> str:
    """Absolute path of the ``conf/`` directory.

    Installed (wheel or editable), ``conf/`` is the package ``fahr.conf``; from a bare checkout on
    ``PYTHONPATH`` it is ``<checkout>/conf``.
    """
    checkout = Path(__file__).resolve().parents[2] / "conf"
    if (checkout / "pretrain.yaml").is_file():
        return str(checkout)
    from importlib.resources import files

    return str(files("fahr.conf"))
