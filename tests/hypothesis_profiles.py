"""The hypothesis profiles of the suite. "ci", the default, draws the same examples on every run and
machine, so CI is reproducible; HYPOTHESIS_PROFILE=fuzz draws fresh ones."""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("fuzz", deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])


def _without_project_constants() -> None:
    """Hypothesis also draws literals that it finds in whichever of the project's own modules are
    imported at the time (its "local constants"), so a derandomized test drew other examples in a
    full run than alone, and others again after any edit of the package. Derandomized draws here
    use no such constants (tests/test_fuzz.py checks that the draws do not depend on imports)."""
    from hypothesis.internal.conjecture import providers

    assert hasattr(providers, "_get_local_constants"), "hypothesis moved its local constants: update this patch"
    none_found = providers.Constants()
    providers._get_local_constants = lambda: none_found


def load_profile() -> None:
    """Load HYPOTHESIS_PROFILE (default "ci")."""
    name = os.environ.get("HYPOTHESIS_PROFILE", "ci")
    settings.load_profile(name)
    if settings.default.derandomize:
        _without_project_constants()
