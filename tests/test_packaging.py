"""The package is whole wherever it is imported from: a wheel built from the checkout, a wheel
built from the sdist, the test environment's own install, and the checkout root itself (where
`python -m fusedlora ...` from the README runs, importing the source tree). In each, the kernels
subpackage imports, `python -m fusedlora inspect` starts, and the top-level name `kernels`
stays another distribution's: the repository's kernels/ folder must never shadow it."""

import os
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENVIRONMENT_SITE = sysconfig.get_paths()["purelib"]


def _build_env() -> dict:
    return {key: value for key, value in os.environ.items() if key != "FUSEDLORA_BUILD_CUDA"}


def _run(command: list, cwd, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env or _build_env(), capture_output=True, text=True, timeout=timeout)


def _install(wheel: Path, site: Path) -> Path:
    installed = _run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(wheel)], site.parent)
    assert installed.returncode == 0, installed.stderr[-3000:]
    return site


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory) -> Path:
    """`pip wheel .` of the checkout, without the CUDA build flag, installed into a folder of its own."""
    out = tmp_path_factory.mktemp("wheel")
    built = _run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-w", str(out)], ROOT)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next(out.glob("fusedlora-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "fusedlora/data/amazon_reviews.tsv" in names and "fusedlora/kernels/forward.py" in names
    assert not any("/_C" in name for name in names)
    assert not any(name.startswith("kernels/") for name in names), "the wheel must not install a top-level kernels"
    return _install(wheel, out / "site")


@pytest.fixture(scope="module")
def sdist_site(tmp_path_factory) -> Path:
    """The sdist, then a wheel built from it (as pip does from PyPI), installed into a folder of its own."""
    out = tmp_path_factory.mktemp("sdist")
    built = _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--skip-dependency-check", "-o", str(out),
                  str(ROOT)], ROOT)
    assert built.returncode == 0, built.stderr[-3000:]
    sdist = next(out.glob("fusedlora-*.tar.gz"))
    wheeled = _run([sys.executable, "-m", "pip", "wheel", str(sdist), "--no-deps", "--no-build-isolation", "-w",
                    str(out)], out)
    assert wheeled.returncode == 0, wheeled.stderr[-3000:]
    return _install(next(out.glob("fusedlora-*.whl")), out / "site")


@pytest.fixture(scope="module")
def other_kernels(tmp_path_factory) -> Path:
    """A folder holding another distribution's top-level package `kernels` (as PyPI's `kernels`,
    which bitsandbytes imports, is)."""
    folder = tmp_path_factory.mktemp("other_kernels")
    (folder / "kernels").mkdir()
    (folder / "kernels" / "__init__.py").write_text("def get_kernel(name):\n    return name\n")
    return folder


SMOKE = textwrap.dedent("""
    import sys, torch, fusedlora
    import fusedlora.kernels.forward, fusedlora.backends.triton_launch, fusedlora.inspection.cli
    from fusedlora.demo import load_reviews
    import kernels
    expected_home, other_kernels = sys.argv[1:]
    assert fusedlora.__file__.startswith(expected_home), fusedlora.__file__
    assert kernels.__file__.startswith(other_kernels) and kernels.get_kernel("x") == "x", kernels
    w = fusedlora.quantize(torch.randn(48, 64), "nf4")
    layer = fusedlora.LoRALinear(w, r=4)
    layer(torch.randn(3, 64)).sum().backward()
    assert layer.lora_B.weight.grad is not None and len(load_reviews()) == 1000
    print("ok")
""")


def _check_importable(cwd: Path, search_path: list, expected_home: Path, other_kernels: Path, isolated: bool) -> None:
    """Run the smoke script and `python -m fusedlora inspect --help` from `cwd` with `search_path`
    on PYTHONPATH; `isolated` (-S) leaves out the environment's site hooks (an editable install's finder)."""
    env = {**_build_env(), "PYTHONPATH": os.pathsep.join(map(str, search_path))}
    flags = ["-S"] if isolated else []
    smoke = _run([sys.executable, *flags, "-c", SMOKE, str(expected_home), str(other_kernels)], cwd, env, timeout=300)
    assert smoke.returncode == 0 and smoke.stdout.strip() == "ok", smoke.stderr[-3000:]
    inspect = _run([sys.executable, *flags, "-m", "fusedlora", "inspect", "--help"], cwd, env, timeout=300)
    assert inspect.returncode == 0 and "--arch" in inspect.stdout, inspect.stderr[-3000:]


@pytest.mark.parametrize("install", ["wheel", "sdist"])
def test_an_installed_build_is_whole_away_from_the_checkout(install, request, other_kernels, tmp_path):
    site = request.getfixturevalue(f"{install}_site")
    _check_importable(tmp_path, [site, other_kernels, ENVIRONMENT_SITE], site / "fusedlora", other_kernels, True)


def test_the_test_environments_install_is_whole_away_from_the_checkout(other_kernels, tmp_path):
    import fusedlora

    home = Path(fusedlora.__file__).parent
    _check_importable(tmp_path, [other_kernels], home, other_kernels, False)


def test_the_checkout_root_imports_the_source_tree_whole(wheel_site, other_kernels):
    """The README's first command installs a wheel and runs `python -m fusedlora demo` from the root:
    there the source tree comes first on sys.path and must be complete by itself."""
    _check_importable(ROOT, [wheel_site, other_kernels, ENVIRONMENT_SITE], ROOT / "fusedlora", other_kernels, True)
