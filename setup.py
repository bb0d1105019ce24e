"""Packaging by discovery (the rest of the metadata is in pyproject.toml): the plug-in rooms at the top of the
repo (`vlacache/rooms.py`) install as `vlacache.<room>` with every package found under them, so a new
`backbones/<family>/` folder cannot be left out of a wheel."""

from setuptools import find_packages, setup

ROOMS = ("strategies", "backbones", "envs", "configs")  # as vlacache/rooms.py, which a build cannot import

packages = find_packages(include=["vlacache", "vlacache.*"])
package_dir = {"vlacache": "vlacache"}
for room in ROOMS:
    package_dir[f"vlacache.{room}"] = room
    packages += [f"vlacache.{room}"] + [f"vlacache.{room}.{sub}" for sub in find_packages(room)]

setup(packages=packages, package_dir=package_dir)
