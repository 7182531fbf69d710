"""Tests of the offline wheelhouse (`python -m orchestrator.tools.wheelhouse`), without network.

Run: python -m pytest tests/orchestrator/test_wheelhouse.py -q

Real pip against a local folder of real wheels built here from tiny source packages:
tiny-alpha needs tiny-beta; tiny-torch (excluded, like torch) needs tiny-triton and tiny-beta;
tiny-gamma is large enough to be split; tiny-delta exists only as an sdist (like hydra's antlr4
runtime); tiny-build is the build-system requirement. pip runs with no config file, so this
machine's own indexes and constraints stay out of it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

from orchestrator.tools import wheelhouse as wh

PY = f"{sys.version_info.major}.{sys.version_info.minor}"
SPLIT_MIB = 0.01  # 10,485 bytes: tiny-gamma's wheel (~30 KB) comes in 3 or more parts
CHUNK_MIB = 0.04  # 41,943 bytes a batch
BLOB = base64.b64encode(hashlib.shake_256(b"tiny-gamma").digest(40_000)).decode()  # incompressible-ish

PACKAGES = {  # name: (dependencies, module source)
    "tiny-alpha": (["tiny-beta>=1"], "from tiny_beta import BETA\nALPHA = 'alpha+' + BETA\n"),
    "tiny-beta": ([], "BETA = 'beta'\n"),
    "tiny-gamma": ([], f"BLOB = {BLOB!r}\n"),
    "tiny-torch": (["tiny-triton", "tiny-beta"], "import tiny_triton\n"),
    "tiny-triton": ([], "TRITON = 1\n"),
    "tiny-build": ([], "BUILD = 1\n"),
}
PROJECT = """\
[build-system]
requires = ["tiny-build"]

[project]
name = "tiny-project"
version = "0.1"
dependencies = ["tiny-alpha", "tiny-gamma", "tiny-torch>=2"]
"""


def hermetic_env(**extra: str) -> dict[str, str]:
    """This process's environment without pip settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


def write_source(root: Path, name: str, version: str, deps: list[str], code: str) -> Path:
    """A setuptools source tree of one module named after the package."""
    src = root / f"{name}-{version}"
    module = name.replace("-", "_")
    (src / module).mkdir(parents=True)
    (src / module / "__init__.py").write_text(code)
    (src / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{name}"
        version = "{version}"
        dependencies = {deps!r}
        """).replace("'", '"'))
    return src


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> Path:
    """The local 'index': wheels of the tiny packages, and tiny-delta as an sdist only."""
    root = tmp_path_factory.mktemp("sources")
    links = tmp_path_factory.mktemp("links")
    sources = [write_source(root, name, "2.0" if name == "tiny-torch" else "1.0", deps, code)
               for name, (deps, code) in PACKAGES.items()]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(links), *map(str, sources)], check=True, env=hermetic_env())
    delta = write_source(root, "tiny_delta", "1.0", [], "DELTA = 'delta'\n")
    (delta / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: tiny_delta\nVersion: 1.0\n")
    with tarfile.open(links / "tiny_delta-1.0.tar.gz", "w:gz") as sdist:
        sdist.add(delta, arcname=delta.name)
    return links


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("project") / "pyproject.toml"
    path.write_text(PROJECT)
    return path


def run_wheelhouse(index: Path, project: Path, out: Path, *args: str) -> None:
    argv = ["--pyproject", str(project), "--out", str(out), "--python-version", PY,
            "--no-index", "--find-links", str(index), "--no-build-isolation", "--extra", "tiny-delta", *args]
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("PIP_")]:
            mp.delenv(key)
        mp.setenv("PIP_CONFIG_FILE", os.devnull)
        assert wh.main(argv) == 0


@pytest.fixture(scope="module")
def batched(index, project, tmp_path_factory) -> Path:
    """A wheelhouse that excludes tiny-torch, split at SPLIT_MIB and laid out in batches."""
    out = tmp_path_factory.mktemp("built") / "wheelhouse"
    run_wheelhouse(index, project, out, "--exclude", "tiny-torch",
                   "--split-mib", str(SPLIT_MIB), "--chunks", str(CHUNK_MIB))
    return out


def gather(batched: Path, dest: Path) -> Path:
    """What the target does after the transfer: cp batch*/* wheelhouse/."""
    dest.mkdir(parents=True)
    for batch in sorted(batched.glob("batch*")):
        for f in batch.iterdir():
            shutil.copy(f, dest / f.name)
    return dest


def sums(folder: Path) -> dict[str, str]:
    return {name: digest for digest, name in
            (line.split("  ") for line in (folder / "SHA256SUMS").read_text().splitlines())}


def install(folder: Path, python: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(folder / "install.sh")], cwd=cwd, capture_output=True, text=True,
                          env=hermetic_env(PYTHON=python, **env))


def test_batches_hold_every_file_under_the_limit(batched):
    assert sorted(p.name for p in batched.iterdir()) == [f"batch{i}" for i in range(len(list(batched.iterdir())))]
    limit = int(CHUNK_MIB * wh.MIB)
    for batch in batched.iterdir():
        assert sum(f.stat().st_size for f in batch.iterdir()) <= limit, batch.name
    assert (batched / "batch0" / "install.sh").is_file() and (batched / "batch0" / "SHA256SUMS").is_file()


def test_wheelhouse_leaves_out_the_excluded_tree_but_keeps_shared_dependencies(batched, tmp_path):
    flat = gather(batched, tmp_path / "wh")
    names = sorted(wh.wheel_name_version(w)[0] for w in sums(flat))
    # tiny-triton was needed only by the excluded tiny-torch; tiny-beta is needed by tiny-alpha too.
    assert names == ["tiny-alpha", "tiny-beta", "tiny-build", "tiny-delta", "tiny-gamma"]
    assert not [f for f in os.listdir(flat) if "torch" in f or "triton" in f or wh.STUB_LABEL + "-" in f]
    assert (flat / "requirements.txt").read_text().split() == ["tiny-alpha", "tiny-gamma", "tiny-torch>=2", "tiny-delta"]
    assert (flat / "excluded.txt").read_text() == "tiny-torch>=2  # required by the project\n"


def test_big_wheel_is_split_into_parts_whose_join_matches_the_manifest(batched, index, tmp_path):
    flat = gather(batched, tmp_path / "wh")
    gamma = next(w for w in sums(flat) if w.startswith("tiny_gamma"))
    assert not (flat / gamma).exists()
    parts = sorted(flat.glob(gamma + ".part*"))
    assert len(parts) >= 3 and [p.name[-6:] for p in parts] == [f"part{i:02d}" for i in range(len(parts))]
    assert all(p.stat().st_size <= SPLIT_MIB * wh.MIB for p in parts)
    joined = b"".join(p.read_bytes() for p in parts)
    assert hashlib.sha256(joined).hexdigest() == sums(flat)[gamma]
    assert joined == (index / gamma).read_bytes()
    small = [w for w in sums(flat) if w != gamma]
    assert all(hashlib.sha256((flat / w).read_bytes()).hexdigest() == sums(flat)[w] for w in small)


def test_install_sh_into_a_target_folder_then_import_from_it(batched, index, tmp_path):
    flat = gather(batched, tmp_path / "wh")
    python = make_venv(tmp_path / "venv", [index], "tiny-torch")  # the target brings its own 'torch'
    proc = install(flat, python, cwd=tmp_path, TARGET="deps")  # relative to where it is run
    assert proc.returncode == 0, proc.stderr
    target = tmp_path / "deps"
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith("-info")) == [
        "tiny_alpha", "tiny_beta", "tiny_delta", "tiny_gamma"]  # no tiny_build: only for building
    check = ("import tiny_alpha, tiny_delta, tiny_gamma; print(tiny_alpha.__file__); "
             "print(tiny_alpha.ALPHA, tiny_delta.DELTA, len(tiny_gamma.BLOB))")
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=tmp_path,
                         env=hermetic_env(PYTHONPATH=str(target)), check=True).stdout.split()
    assert out == [str(target / "tiny_alpha" / "__init__.py"), "alpha+beta", "delta", str(len(BLOB))]
    assert (flat / next(w for w in sums(flat) if w.startswith("tiny_gamma"))).is_file()  # joined in place


def make_venv(path: Path, links: list[Path], *preinstalled: str) -> str:
    """A venv that borrows this Python's pip (system site-packages), with `preinstalled` in it."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(path)], check=True)
    python = str(path / "bin" / "python")
    if preinstalled:
        finds = [arg for link in links for arg in ("--find-links", str(link))]
        subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", *finds, *preinstalled],
                       check=True, env=hermetic_env())
    return python


@pytest.fixture(scope="module")
def old_torch(tmp_path_factory) -> Path:
    """A folder with tiny-torch 1.0, older than the project accepts (it needs tiny-torch>=2)."""
    root, links = tmp_path_factory.mktemp("old-source"), tmp_path_factory.mktemp("old")
    deps, code = PACKAGES["tiny-torch"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(links), str(write_source(root, "tiny-torch", "1.0", deps, code))],
                   check=True, env=hermetic_env())
    return links


def test_install_sh_into_the_environment_resolves_offline(batched, index, tmp_path):
    python = make_venv(tmp_path / "venv", [index], "tiny-torch")  # the target brings its own 'torch'
    proc = install(gather(batched, tmp_path / "wh"), python, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    check = "import tiny_alpha, tiny_delta, tiny_gamma, tiny_torch; print(tiny_alpha.__file__)"
    out = subprocess.run([python, "-c", check], capture_output=True, text=True, check=True).stdout
    assert out.startswith(str(tmp_path / "venv"))


@pytest.mark.parametrize("into", ["environment", "target folder"])
def test_install_sh_refuses_when_the_excluded_package_is_missing(batched, index, tmp_path, into):
    python = make_venv(tmp_path / "venv", [index])
    env = {"TARGET": str(tmp_path / "deps")} if into == "target folder" else {}
    proc = install(gather(batched, tmp_path / "wh"), python, cwd=tmp_path, **env)
    assert proc.returncode == 1
    assert "tiny-torch is not installed (needed: tiny-torch>=2, required by the project)" in proc.stderr
    assert "--exclude ''" in proc.stderr
    assert not (tmp_path / "deps").exists()


def test_install_sh_refuses_an_excluded_package_at_a_version_the_project_does_not_accept(
        batched, index, old_torch, tmp_path):
    python = make_venv(tmp_path / "venv", [index, old_torch], "tiny-torch==1.0")
    proc = install(gather(batched, tmp_path / "wh"), python, cwd=tmp_path, TARGET=str(tmp_path / "deps"))
    assert proc.returncode == 1
    assert "tiny-torch 1.0 is installed, but tiny-torch>=2 is needed (required by the project)" in proc.stderr
    assert not (tmp_path / "deps").exists()


def test_install_sh_names_a_missing_part_and_how_to_gather_the_batches(batched, tmp_path):
    flat = gather(batched, tmp_path / "wh")
    last = sorted(flat.glob("*.part*"))[-1]
    last.unlink()
    proc = install(flat, sys.executable, cwd=tmp_path, TARGET=str(tmp_path / "deps"))
    assert proc.returncode == 1
    assert f"missing {last.name}" in proc.stderr and "cp batch*/*" in proc.stderr
    assert not (tmp_path / "deps").exists()


def test_corrupt_part_fails_the_checksum(batched, tmp_path):
    flat = gather(batched, tmp_path / "wh")
    part = sorted(flat.glob("*.part*"))[0]
    data = bytearray(part.read_bytes())
    data[100] ^= 0xFF
    part.write_bytes(bytes(data))
    proc = install(flat, sys.executable, cwd=tmp_path, TARGET=str(tmp_path / "deps"))
    assert proc.returncode == 1 and "checksums differ" in proc.stderr


def test_pinned_exclusion_and_patterns_never_drop_direct_requirements(index, project, tmp_path, capsys):
    out = tmp_path / "wheelhouse"
    # tiny-b* matches tiny-beta (a dependency: left out) and tiny-build (a build requirement: kept);
    # tiny-g* matches only tiny-gamma, which the project names itself: kept.
    run_wheelhouse(index, project, out, "--exclude", "tiny-torch==2.0,tiny-b*,tiny-g*")
    names = sorted(wh.wheel_name_version(w)[0] for w in sums(out))
    assert names == ["tiny-alpha", "tiny-build", "tiny-delta", "tiny-gamma"]
    assert (out / "excluded.txt").read_text().splitlines() == [
        "tiny-torch>=2  # required by the project", "tiny-beta>=1  # required by tiny-alpha 1.0"]
    assert "left out (the target must have them): tiny-beta, tiny-torch" in capsys.readouterr().out
    # a second run replaces a wheelhouse written before
    run_wheelhouse(index, project, out, "--exclude", "")
    names = sorted(wh.wheel_name_version(w)[0] for w in sums(out))
    assert names == ["tiny-alpha", "tiny-beta", "tiny-build", "tiny-delta", "tiny-gamma", "tiny-torch", "tiny-triton"]


def test_exclude_from_a_freeze_list_pins_what_fits_and_fetches_what_does_not(index, project, tmp_path, capsys):
    have = tmp_path / "have.txt"
    have.write_text(textwrap.dedent("""\
        # python3 -m pip list --format=freeze, on the target
        tiny-beta==1.0
        tiny-torch==1.0        # older than the project's tiny-torch>=2: fetched after all
        tiny-triton @ file:///wheels/tiny_triton-1.0-py3-none-any.whl
        -e git+https://example.invalid/x.git#egg=x

        """))
    out = tmp_path / "wheelhouse"
    run_wheelhouse(index, project, out, "--exclude", "", "--exclude-from", str(have))
    printed = capsys.readouterr().out
    assert "the target's tiny-torch==1.0 does not fit what the project needs" in printed
    assert "fetched although the target has them, at versions that do not fit: tiny-torch==1.0" in printed
    assert "left out (the target must have them): tiny-beta, tiny-triton" in printed
    names = sorted(wh.wheel_name_version(w)[0] for w in sums(out))
    assert names == ["tiny-alpha", "tiny-build", "tiny-delta", "tiny-gamma", "tiny-torch"]
    assert (out / "excluded.txt").read_text().splitlines() == [
        "tiny-beta>=1  # required by tiny-alpha 1.0", "tiny-triton  # required by tiny-torch 2.0",
        "tiny-beta  # required by tiny-torch 2.0"]


def test_freeze_names_lists_this_python_for_exclude_from(tmp_path, capsys):
    assert wh.main(["--freeze-names", "--pyproject", "/nonexistent"]) == 0  # nothing else is read
    lines = capsys.readouterr().out.splitlines()
    names = [line.split("==")[0] for line in lines]
    assert names == sorted(set(names)) and f"pytest=={pytest.__version__}" in lines
    (tmp_path / "have.txt").write_text("\n".join(lines))
    parsed = wh.read_exclusion_file(tmp_path / "have.txt")
    assert wh.Exclusion("pytest", pytest.__version__) in parsed and len(parsed) == len(lines)


def test_exclusion_file_errors_name_the_line_and_merging_keeps_pins(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("torch\nnvidia-*==12\n")
    with pytest.raises(ValueError, match="expected a version only after an exact name"):
        wh.read_exclusion_file(bad)
    bad.write_text("torch\n\ntorch==\n")
    with pytest.raises(ValueError, match=r"expected --exclude-from .*bad.txt:3 items like"):
        wh.read_exclusion_file(bad)
    merged = wh.merge_exclusions(wh.parse_exclusions("torch,nvidia-*") + [wh.Exclusion("torch", "2.11.0+cu130")])
    assert merged == [wh.Exclusion("torch", "2.11.0+cu130"), wh.Exclusion("nvidia-*")]


def test_conflicting_pins_are_read_from_pips_conflict_report():
    report = ("The conflict is caused by:\n    The user requested tiny-torch>=2\n"
              "    The user requested (constraint) tiny-torch==1.0+wheelhouse\n"
              "    The user requested (constraint) Torch==2.11.0+cu130.wheelhouse\n"
              "    The user requested (constraint) numpy==2.0\n")
    assert wh.conflicting_pins(report) == {"tiny-torch", "torch"}


@pytest.mark.parametrize("argv, message", [
    (["--split-mib", "0"], "expected --split-mib > 0"),
    (["--split-mib", "70", "--chunks"], "expected --split-mib no larger than --chunks (60)"),
    (["--python-version", "312"], "expected --python-version like 3.12, received '312'"),
    (["--exclude", "nvidia-*==12"], "expected a version only after an exact name"),
    (["--exclude", "torch=="], "expected --exclude items like"),
    (["--platform", "Linux x86"], "expected --platform like manylinux_2_28_x86_64"),
    (["--extra", ">=3"], "expected a requirement such as 'pytest>=8'"),
    (["--pyproject", "/nonexistent/pyproject.toml"], "expected a pyproject.toml file"),
    (["--chunks", "abc"], "invalid float value: 'abc'"),
    (["--exclude-from", "/nonexistent/have.txt"], "expected --exclude-from to name a file"),
])
def test_argument_errors_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        wh.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: " in err and message in err, err


def test_out_folder_with_other_files_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exc:
        wh.main(["--out", str(tmp_path)])
    assert exc.value.code == 2 and "pick another folder or empty it" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_split_list_keeps_specifier_commas():
    assert wh.split_list("pytest>=8,<9, hypothesis,,ray[default]~=2.5") == ["pytest>=8,<9", "hypothesis", "ray[default]~=2.5"]


def test_exclusions_parse_and_match():
    torch, nvidia = wh.parse_exclusions("Torch==2.11.0,nvidia-*")
    assert (torch.pattern, torch.version, nvidia.pattern, nvidia.version) == ("torch", "2.11.0", "nvidia-*", None)
    assert nvidia.matches("nvidia_cublas", direct={"nvidia-ml-py"})
    assert not nvidia.matches("nvidia-ml-py", direct={"nvidia-ml-py"})
    assert torch.matches("torch", direct={"torch"}) and not torch.matches("torchvision", direct=set())
    assert wh.parse_exclusions("") == [] == wh.parse_exclusions("none")


def test_manylinux_platform_brings_older_glibc_tags():
    platforms = wh.expand_platforms(["manylinux_2_28_x86_64"])
    assert platforms[0] == "manylinux_2_28_x86_64" and platforms[-2:] == ["manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    assert len(platforms) == 28 - 17 + 2
    assert wh.expand_platforms(["macosx_11_0_arm64"]) == ["macosx_11_0_arm64"]


def test_plan_batches_first_fit_decreasing_with_the_script_first():
    sizes = {"install.sh": 2, "SHA256SUMS": 1, "a": 6, "b": 5, "c": 4, "d": 3}
    batches = wh.plan_batches(sizes, limit=10)
    assert batches == [["install.sh", "SHA256SUMS", "a"], ["b", "c"], ["d"]]
    with pytest.raises(ValueError, match="expected every file at most 10 bytes"):
        wh.plan_batches({"big": 11}, limit=10)


def test_unresolvable_requirement_is_found_only_when_pip_names_one():
    conflict = ("hydra-core 1.3.8 depends on antlr4-python3-runtime==4.9.*\n"
                "hydra-core 1.3.7 depends on antlr4-python3-runtime==4.9.*\n")
    assert wh.unresolvable_requirement(conflict) == "antlr4-python3-runtime==4.9.*"
    assert wh.unresolvable_requirement(
        "Could not find a version that satisfies the requirement tiny-delta (from versions: none)") == "tiny-delta"
    two = ("torch 2.13.0 depends on nvidia-cudnn-cu13==9.20.0.48; platform_system == \"Linux\"\n"
           "torch 2.12.1 depends on nvidia-cublas<=13.1.1.3\n")
    assert wh.unresolvable_requirement(two) is None


def test_stub_sorts_just_above_the_real_release(tmp_path):
    path = wh.write_stub_wheel(tmp_path, "torch", "2.11.0")
    assert path.name == "torch-2.11.0+wheelhouse-py3-none-any.whl" and wh.is_stub(path.name)
    assert wh.stub_version("2.11.0+cu130") == "2.11.0+cu130.wheelhouse"
    assert not wh.is_stub("torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl")


def _imported_modules(path: Path) -> set[str]:
    """Every module name a file imports, and every `module.name` it imports from one
    (a relative import keeps its leading dots)."""
    import ast

    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return names


ROOT = Path(__file__).resolve().parents[2]


def test_no_runtime_module_imports_the_tools():
    runtime = [p for p in (ROOT / "orchestrator").rglob("*.py") if "tools" not in p.relative_to(ROOT).parts]
    runtime += list((ROOT / "kvcore").rglob("*.py"))
    assert len(runtime) > 20
    offenders = {str(p.relative_to(ROOT)): sorted(n for n in _imported_modules(p) if "wheelhouse" in n or
                                                   n.startswith("orchestrator.tools"))
                 for p in runtime}
    assert {p: names for p, names in offenders.items() if names} == {}
    # and the check sees such an import where there is one
    assert "orchestrator.tools.wheelhouse" in _imported_modules(ROOT / "tests/orchestrator/test_wheelhouse.py")
    assert not (ROOT / "orchestrator" / "wheelhouse.py").exists()
