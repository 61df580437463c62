"""npgpt installs one top-level import name: kernels/ and weights/ install as npgpt.kernels and npgpt.weights.

Hugging Face's `kernels` package (transformers imports it when present) owns the top-level name `kernels`;
the test stands in a package with that name and HF's entry point `get_kernel` (no network here), installs
both into a fresh environment in both orders, and checks that each stays usable and that uninstalling
one leaves the other's files alone. The fresh environment borrows this one's dependencies (numpy,
numba, ...) through a .pth file pointing at a view of site-packages without npgpt in it.
"""

import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF_KERNELS = '"""stand-in for Hugging Face\'s kernels package"""\n\ndef get_kernel(repo_id):\n    return repo_id\n'


def run(*cmd, cwd=None):
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def pip(env, *args):
    return run(sys.executable, "-m", "pip", "--python", os.path.join(env, "bin", "python"), "--disable-pip-version-check",
               "--no-input", *args)


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheels")
    src = out / "npgpt-src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv*", "__pycache__", "build", "*.egg-info",
                                                             ".pytest_cache", "*.nbi", "*.nbc"))
    hf = out / "hf-kernels"
    (hf / "kernels").mkdir(parents=True)
    (hf / "kernels" / "__init__.py").write_text(HF_KERNELS)
    (hf / "pyproject.toml").write_text('[project]\nname = "kernels"\nversion = "0.0.1"\n'
                                       '[tool.setuptools]\npackages = ["kernels"]\n')
    for project in (src, hf):
        run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--disable-pip-version-check",
            "-q", "-w", str(out), str(project))
    found = {p.name.split("-")[0]: str(p) for p in out.glob("*.whl")}
    return found["npgpt"], found["kernels"]


def fresh_env(tmp_path):
    """A venv without npgpt that can import this environment's dependencies."""
    env = tmp_path / "env"
    run(sys.executable, "-m", "venv", "--without-pip", str(env))
    deps = tmp_path / "deps"
    deps.mkdir()
    here = sysconfig.get_paths()["purelib"]
    for name in os.listdir(here):
        if not name.lower().startswith(("npgpt", "__editable__", "kernels", "weights")):
            os.symlink(os.path.join(here, name), deps / name)
    purelib = run(str(env / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    with open(os.path.join(purelib, "deps.pth"), "w") as f:
        f.write(str(deps) + "\n")
    return str(env), purelib


NPGPT_WORKS = "import npgpt.kernels, npgpt.weights; assert npgpt.kernels.KERNELS and npgpt.weights.load_params; print('ok')"
HF_WORKS = "from kernels import get_kernel; assert get_kernel('x') == 'x'; print('ok')"


@pytest.mark.parametrize("first", ["npgpt", "kernels"])
def test_npgpt_and_hf_kernels_coexist_in_either_order(wheels, tmp_path, first):
    npgpt_wheel, hf_wheel = wheels
    env, purelib = fresh_env(tmp_path)
    python = os.path.join(env, "bin", "python")
    order = [npgpt_wheel, hf_wheel] if first == "npgpt" else [hf_wheel, npgpt_wheel]
    for wheel in order:
        pip(env, "install", "--no-deps", "--no-index", "-q", wheel)
    assert sorted(n for n in os.listdir(purelib) if not n.endswith((".dist-info", ".pth", "__pycache__"))) \
        == ["kernels", "npgpt"], "npgpt must install exactly one top-level name"
    assert run(python, "-c", NPGPT_WORKS, cwd=tmp_path) == "ok\n"
    assert run(python, "-c", HF_WORKS, cwd=tmp_path) == "ok\n"
    assert run(os.path.join(env, "bin", "npgpt"), "--version").startswith("npgpt ")
    other, other_works = ("kernels", NPGPT_WORKS) if first == "npgpt" else ("npgpt", HF_WORKS)
    pip(env, "uninstall", "-y", "-q", other)                # the one installed second goes; the first stays whole
    assert run(python, "-c", other_works, cwd=tmp_path) == "ok\n"


def test_python_dash_m_ignores_weights_and_kernels_modules_in_the_working_dir(tmp_path, tiny_file):
    for name in ("weights.py", "kernels.py"):
        (tmp_path / name).write_text("raise SystemExit('the wrong module was imported')\n")
    r = subprocess.run([sys.executable, "-m", "npgpt", "inspect", str(tiny_file)], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "n_vocab=1000" in r.stdout


def test_run_time_code_imports_only_declared_packages():
    """Module-level imports of the installed packages are the standard library, npgpt itself, or a package
    setup.cfg declares at run time (safetensors is only a test tool; torch/transformers load lazily). The
    server's HTTP modules (npgpt/serve/, imported only by `npgpt serve`) may import the `serve` extra."""
    import ast
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    declared = {line.split(">")[0].split("=")[0].strip() for line in cfg["options"]["install_requires"].split("\n") if line.strip()}
    serve = {line.split(">")[0].strip().replace("-", "_") for line in cfg["options.extras_require"]["serve"].split("\n") if line.strip()}
    allowed = declared | {"tiktoken_ext"} | set(sys.stdlib_module_names) | {"npgpt"}
    found = {}
    for folder in ("npgpt", "kernels", "weights"):
        for root, _, files in os.walk(os.path.join(REPO, folder)):
            for name in (f for f in files if f.endswith(".py")):
                path = os.path.relpath(os.path.join(root, name), REPO)
                tree = ast.parse(open(os.path.join(root, name)).read())
                for node in tree.body:                     # module level only: lazy imports inside functions are extras
                    if isinstance(node, ast.Import):
                        found.update({(a.name.split(".")[0], path): name for a in node.names})
                    elif isinstance(node, ast.ImportFrom) and node.level == 0:
                        found[(node.module.split(".")[0], path)] = name
    extra = lambda m, path: path.startswith(os.path.join("npgpt", "serve")) and m in serve and not path.endswith("engine.py")
    assert {m: path for m, path in found if m not in allowed and not extra(m, path)} == {}
    assert {m for m, path in found if extra(m, path)} == {"fastapi", "prometheus_client"}   # the serve extra, nowhere else
    assert "safetensors" not in declared
