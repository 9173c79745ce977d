"""Package discovery: every package under fahr/ and data_pipelines/, plus the configs.

conf/ stays at the top level of the checkout and ships inside the wheel as ``fahr.conf`` (see
``package-dir`` in pyproject.toml); ``find_packages`` cannot see it there, so it is the one name added.
Everything else about the project is in pyproject.toml.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["fahr", "fahr.*", "data_pipelines", "data_pipelines.*"]), "fahr.conf"])
