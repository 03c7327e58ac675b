"""Only what pyproject.toml cannot say: the package list is kdrun* plus kdrun.conf, the repository's
top-level conf/ installed as kdrun/conf (every other setting is in pyproject.toml)."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["kdrun", "kdrun.*"]), "kdrun.conf"],
    package_dir={"kdrun.conf": "conf"},
)
