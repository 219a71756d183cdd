"""Installs are reproducible: ``constraints.txt`` locks every dependency kullm names (all extras), and the tests run
on exactly the locked releases, so a fresh install gets what the suite passed with."""

from importlib.metadata import PackageNotFoundError, requires, version

from helpers import ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def locked() -> dict[str, Requirement]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate():
                pins[canonicalize_name(req.name)] = req
    return pins


def named_dependencies() -> set[str]:
    """What kullm's installed metadata requires, every extra's requirements included."""
    return {canonicalize_name(Requirement(r).name) for r in requires("kullm") or ()}


def test_the_lock_pins_one_exact_release_of_every_dependency_of_every_extra():
    pins = locked()
    missing = sorted(named_dependencies() - set(pins))
    assert not missing, f"not in constraints.txt: {missing}; run scripts/lock_deps.sh"
    loose = {name: str(req.specifier) for name, req in pins.items() if not str(req.specifier).startswith("==")}
    assert not loose, loose
    assert str(pins["torch"].specifier) == "==2.13.0"  # the CPU wheel README installs first


def test_the_suite_runs_on_the_locked_releases_of_kullms_dependencies():
    pins = locked()
    drift = {}
    for name in sorted(named_dependencies()):
        try:
            installed = version(name)
        except PackageNotFoundError:
            continue  # an extra this environment left out (mutation, bench)
        if not pins[name].specifier.contains(installed, prereleases=True):
            drift[name] = (installed, str(pins[name].specifier))
    assert not drift, f"installed ≠ locked (reinstall with -c constraints.txt, or relock on purpose): {drift}"
