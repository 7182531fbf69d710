"""The wheelhouse: every wheel the project needs, fetched on a machine with internet, for an
offline target (a GPU server or cluster node without internet access).

Run (on the machine with internet, from the repository root):

    python -m orchestrator.tools.wheelhouse                      # CPython 3.12, manylinux x86_64, no torch
    python -m orchestrator.tools.wheelhouse --extra pytest,hypothesis --chunks 60
    python -m orchestrator.tools.wheelhouse --exclude ''         # torch and its CUDA wheels too
    python -m orchestrator.tools.wheelhouse --exclude-from have.txt   # leave out what the target has

where have.txt comes from the target: `python3 -m orchestrator.tools.wheelhouse --freeze-names > have.txt`
(from a checkout there) or `python3 -m pip list --format=freeze > have.txt` (the same lines);

then, on the target, with the folder copied over: `sh wheelhouse/install.sh` (into the current
environment of `$PYTHON`) or `TARGET=/opt/kvdeps sh wheelhouse/install.sh` (into a folder for
PYTHONPATH). Standard library only: it runs before the project's dependencies are installed,
and drives the `pip` of the Python that runs it.

What lands in the folder (default `wheelhouse/`):
- the wheels of `[project].dependencies` of pyproject.toml, plus `--extra` requirements, plus
  `[build-system].requires` (so `pip install --no-index --find-links wheelhouse --no-deps -e .`
  builds the project offline), each with its whole dependency tree, resolved by pip for the
  target (`--python-version`, `--platform`: pip's own tag and marker logic, never a guess here);
- files larger than `--split-mib` cut into `<file>.part00`, `.part01`, ...;
- `SHA256SUMS` of the whole files, `requirements.txt` (what install.sh installs),
  `excluded.txt` (the requirements on what was left out: the project's own and those in the
  kept wheels' metadata) and `install.sh`, which joins the parts, checks every sum, checks
  that the target's Python has what was left out at versions excluded.txt accepts (missing or
  too old: it stops and names them, before installing anything) and runs `pip install --no-index`;
- with `--chunks MIB`, all of it laid out as `batch0/`, `batch1/`, ..., each at most MIB, for a
  transfer that takes a limited size at a time; on the target: `cp batch*/* wheelhouse/`.

Key decisions:
- Exclusion without downloading. `pip download` resolves dependencies, so an excluded package
  that another one requires cannot simply be dropped. Each excluded name is instead offered to
  pip as a stub: an empty wheel of the same name at every version the index has, with the local
  label `+wheelhouse` (so it sorts above the real one of the same version) and no dependencies.
  pip picks the stub, never fetches the real wheel (torch is 530 MB, and old pips download a
  wheel to read its metadata), and never pulls the excluded package's own dependency tree; a
  dependency that something kept also needs is still resolved. Stubs are dropped afterwards.
  `--exclude torch==2.11.0` pins the one version the target has (`pip index versions` is then
  not asked); so does every `name==version` line of an `--exclude-from` file. A pinned version
  that the project's tree does not accept (pip's conflict report names the stub's constraint)
  is dropped from the exclusions and the package fetched after all, with a line saying so:
  the target's copy is too old (or too new) to use. Patterns (`nvidia-*`) are matched against
  what was resolved, then stubbed the same way and resolved again; a pattern never drops a
  requirement the project names itself (name it exactly to exclude it), so `nvidia-*` keeps
  `nvidia-ml-py`.
- Sdist-only dependencies (hydra's antlr4-python3-runtime) are built into wheels here with
  `pip wheel`, and kept only if the result is pure Python (`py3-none-any`), which fits any target.
- install.sh into the current environment installs `requirements.txt` with pip's resolver; into
  `TARGET` it installs exactly the runtime wheels, `--no-deps`, since pip ignores installed
  packages there. Either way an excluded package must already be in `$PYTHON`, which is why
  it is checked first (with the target's own markers and pip's vendored `packaging`) rather
  than found missing at import.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from datetime import date
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: the tomli that pip vendors reads the same TOML
    from pip._vendor import tomli as tomllib  # type: ignore[no-redef]

MIB = 1024 * 1024
DEFAULT_PYTHON = "3.12"
DEFAULT_PLATFORM = "manylinux_2_28_x86_64"
# GPU hosts bring torch with their CUDA build, and with it triton and the CUDA wheels.
DEFAULT_EXCLUDE = "torch,triton,nvidia-*,cuda-*"
DEFAULT_SPLIT_MIB = 60.0
DEFAULT_CHUNK_MIB = 60.0
STUB_LABEL = "wheelhouse"
SCRIPT_MARK = "# Offline install written by: python -m orchestrator.tools.wheelhouse"
_ANY_SCRIPT_MARK = "# Offline install written by: python -m orchestrator."  # this one or before the move
META_FILES = ("install.sh", "SHA256SUMS", "requirements.txt", "excluded.txt")
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
REPO_PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def normalize(name: str) -> str:
    """PEP 503 name: 'Hydra_Core' -> 'hydra-core'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_dist(name: str) -> str:
    """The name as a wheel's file name spells it: 'hydra-core' -> 'hydra_core'."""
    return re.sub(r"[-_.]+", "_", name)


def requirement_name(requirement: str) -> str:
    """'mlflow>=3.17.2,<3.18' -> 'mlflow'; 'ray[default]>=2' -> 'ray'."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"expected a requirement such as 'pytest>=8', received {requirement!r}")
    return normalize(match.group(1))


def split_list(text: str) -> list[str]:
    """Comma-separated requirements, keeping specifier commas: 'a>=1,<2,b' -> ['a>=1,<2', 'b']."""
    items: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if items and piece[0] in "<>=!~":
            items[-1] += "," + piece
        else:
            items.append(piece)
    return items


def read_requirements(pyproject: Path) -> tuple[list[str], list[str]]:
    """(`[project].dependencies`, `[build-system].requires`) of a pyproject.toml."""
    if not pyproject.is_file():
        raise ValueError(f"expected a pyproject.toml file, received {str(pyproject)!r}: pass --pyproject PATH")
    data = tomllib.loads(pyproject.read_text())
    runtime = list(data.get("project", {}).get("dependencies", []))
    build = list(data.get("build-system", {}).get("requires", []))
    return runtime, build


@dataclass(frozen=True)
class Exclusion:
    """One `--exclude` item: a name or a pattern, optionally with the version the target has."""

    pattern: str  # normalized name, or a glob such as 'nvidia-*'
    version: str | None = None  # 'torch==2.11.0' -> '2.11.0'

    @property
    def is_pattern(self) -> bool:
        return any(c in self.pattern for c in "*?[")

    def matches(self, name: str, direct: set[str]) -> bool:
        """Whether it drops `name`; a pattern never drops one of the project's own requirements."""
        if not self.is_pattern:
            return normalize(name) == self.pattern
        return normalize(name) not in direct and fnmatch.fnmatchcase(normalize(name), self.pattern)


def parse_exclusion(item: str, source: str = "--exclude") -> Exclusion:
    """'torch' / 'nvidia-*' / 'torch==2.11.0+cu130' -> an Exclusion; ValueError naming `source`."""
    name, _, version = item.partition("==")
    if not re.fullmatch(r"[A-Za-z0-9*?\[\]._-]+", name.strip()) or ("==" in item and not version.strip()):
        raise ValueError(f"expected {source} items like 'torch', 'nvidia-*' or 'torch==2.11.0', received {item!r}")
    if version and any(c in name for c in "*?["):
        raise ValueError(f"expected a version only after an exact name, received {item!r}: drop '=={version}'")
    return Exclusion(normalize(name.strip()), version.strip() or None)


def parse_exclusions(text: str) -> list[Exclusion]:
    """'torch==2.11.0,nvidia-*' -> exclusions; '' or 'none' -> nothing excluded."""
    if text.strip().lower() == "none":
        return []
    return [parse_exclusion(item) for item in split_list(text)]


def read_exclusion_file(path: Path) -> list[Exclusion]:
    """An `--exclude-from` file: one name, pattern or name==version a line, '#' comments; the
    output of `pip list --format=freeze` or `--freeze-names` as it is ('name @ URL' reads as
    the name; '-e' lines are skipped)."""
    if not path.is_file():
        raise ValueError(f"expected --exclude-from to name a file, received {str(path)!r}: e.g. the output of "
                         f"`python3 -m pip list --format=freeze` on the target")
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        item = line.split("#", 1)[0].strip()
        if not item or item.startswith("-"):
            continue
        item = item.split(" @ ", 1)[0].split(";", 1)[0].strip().replace("===", "==")
        out.append(parse_exclusion(item, f"--exclude-from {path}:{number}"))
    return out


def merge_exclusions(exclusions: list[Exclusion]) -> list[Exclusion]:
    """One exclusion per name or pattern, in first-seen order; a pinned version wins over none."""
    merged: dict[str, Exclusion] = {}
    for exclusion in exclusions:
        if exclusion.pattern not in merged or exclusion.version is not None:
            merged[exclusion.pattern] = exclusion
    return list(merged.values())


def installed_distributions() -> list[str]:
    """'name==version' of every distribution this Python sees (its site-packages and sys.path),
    sorted by name: what `--freeze-names` prints on the target."""
    from importlib import metadata

    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and normalize(name) not in found:
            found[normalize(name)] = f"{normalize(name)}=={dist.version}"
    return [found[name] for name in sorted(found)]


def expand_platforms(platforms: list[str]) -> list[str]:
    """Add the older glibc tags a manylinux_2_Y target also runs: 2_28 -> 2_28 ... 2_17, 2014.

    pip expands manylinux2014 (to 2010 and 1) by itself but not manylinux_2_Y, so a wheel tagged
    only manylinux_2_24 would otherwise be missed for a glibc 2.28 target.
    """
    out: list[str] = []
    for platform in platforms:
        match = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
        if not match:
            out.append(platform)
            continue
        minor, arch = int(match.group(1)), match.group(2)
        out += [f"manylinux_2_{m}_{arch}" for m in range(minor, 16, -1)]
        if minor >= 17:
            out.append(f"manylinux2014_{arch}")
    return list(dict.fromkeys(out))


def target_options(python_version: str, platforms: list[str]) -> list[str]:
    """pip's options that pick wheels for the target instead of for this machine."""
    abi = "cp" + python_version.replace(".", "")
    opts = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp", "--abi", abi]
    for platform in platforms:
        opts += ["--platform", platform]
    return opts


def wheel_name_version(filename: str) -> tuple[str, str]:
    """'hydra_core-1.3.2-py3-none-any.whl' -> ('hydra-core', '1.3.2')."""
    parts = filename[: -len(".whl")].split("-")
    if not filename.endswith(".whl") or len(parts) < 5:
        raise RuntimeError(f"pip saved {filename!r}, which is not a wheel file name")
    return normalize(parts[0]), parts[1]


def is_pure(filename: str) -> bool:
    """A wheel that runs on any Python 3 and platform: '...-py3-none-any.whl'."""
    python_tag, abi, platform = filename[: -len(".whl")].split("-")[-3:]
    return abi == "none" and platform == "any" and "py3" in python_tag.split(".")


def unresolvable_requirement(pip_output: str) -> str | None:
    """The one requirement pip found no wheel for ('antlr4-python3-runtime==4.9.*'), or None when
    it failed otherwise (two requirements in conflict, a typo, the network)."""
    missing = re.search(r"satisfies the requirement (\S+)", pip_output)
    if missing:
        return missing.group(1).rstrip(";")
    # ResolutionImpossible: "hydra-core 1.3.8 depends on antlr4-python3-runtime==4.9.*", one line per version.
    wanted = {r.rstrip(";") for r in re.findall(r" depends on (\S+)", pip_output)}
    return wanted.pop() if len(wanted) == 1 else None


def conflicting_pins(pip_output: str) -> set[str]:
    """Names whose pinned stub pip could not use: 'The user requested (constraint) torch==2.4.0+wheelhouse'."""
    found = re.findall(rf"\(constraint\) ([A-Za-z0-9._-]+)==\S*[+.]{STUB_LABEL}\b", pip_output)
    return {normalize(name) for name in found}


def stub_version(version: str) -> str:
    """The stub's version: the real one with the local label 'wheelhouse' (sorts just above it)."""
    return f"{version}.{STUB_LABEL}" if "+" in version else f"{version}+{STUB_LABEL}"


def is_stub(filename: str) -> bool:
    return re.search(rf"[+.]{STUB_LABEL}-py3-none-any\.whl$", filename) is not None


def write_stub_wheel(folder: Path, name: str, version: str) -> Path:
    """An empty wheel with metadata only: pip takes it for `name` and asks for nothing more."""
    version = stub_version(version)
    dist = f"{wheel_dist(name)}-{version}"
    files = {
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: wheelhouse\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{path},,\n" for path in files) + f"{dist}.dist-info/RECORD,,\n"
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in {**files, f"{dist}.dist-info/RECORD": record}.items():
            archive.writestr(member, text)
    return path


class PipError(RuntimeError):
    """pip failed; `output` holds what it printed."""

    def __init__(self, args: list[str], output: str):
        super().__init__(f"pip {args[0]} failed:\n" + "\n".join(output.splitlines()[-40:]))
        self.output = output


def run_pip(args: list[str], verbose: bool) -> str:
    """Run pip with `args`; return its output, raise PipError when it fails."""
    if verbose:
        print("+ pip " + " ".join(args), file=sys.stderr)
    proc = subprocess.Popen(PIP + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # type: ignore[union-attr]
        lines.append(line)
        if verbose:
            sys.stderr.write(line)
    if proc.wait() != 0:
        raise PipError(args, "".join(lines))
    return "".join(lines)


def index_versions(name: str, target: list[str], index: list[str], verbose: bool) -> list[str]:
    """Every version of `name` the index has for the target (`pip index versions`), newest first."""
    try:
        output = run_pip(["index", "versions", name, *target, *index], verbose)
    except PipError as err:
        if "No matching distribution" in err.output:
            return []
        raise RuntimeError(f"pip could not list the versions of {name} ({err}); give the version the "
                           f"target has instead: --exclude {name}==VERSION") from err
    for line in output.splitlines():
        if line.startswith("Available versions:"):
            return [v.strip() for v in line.split(":", 1)[1].split(",") if v.strip()]
    return []


@dataclass
class Resolver:
    """Resolves and downloads a requirement set for the target, with stubs for exclusions."""

    target: list[str]  # target_options(...)
    index: list[str]  # pass-through index options: --index-url, --find-links, --no-index, ...
    exclusions: list[Exclusion]
    direct: set[str]  # normalized names the project requires itself
    work: Path  # scratch folder: stubs/, built/, constraints.txt, staging folders
    no_build_isolation: bool = False
    verbose: bool = False

    def __post_init__(self) -> None:
        self.stubs = self.work / "stubs"
        self.built = self.work / "built"
        self.stubs.mkdir(parents=True, exist_ok=True)
        self.built.mkdir(parents=True, exist_ok=True)
        self.constraints = self.work / "constraints.txt"
        self.constraints.write_text("")
        self.stubbed: set[str] = set()
        self.pinned: dict[str, str] = {}  # name -> the target's version (from --exclude name==version)
        self.unpinned: dict[str, str] = {}  # pinned names whose version did not fit: fetched after all
        self.picked: set[str] = set()  # excluded names that pip needed (it took their stubs)
        self.built_from_sdist: list[str] = []
        self.runs = 0
        for exclusion in self.exclusions:
            if not exclusion.is_pattern:
                self._stub(exclusion.pattern, exclusion.version)

    def _stub(self, name: str, version: str | None) -> None:
        """Offer pip stubs of `name`: at `version` only (pinned), or at every version the index has."""
        self.stubbed.add(name)
        if version is not None:
            write_stub_wheel(self.stubs, name, version)
            self.pinned[name] = version
            self._write_constraints()
            return
        versions = index_versions(name, self.target, self.index, self.verbose)
        for v in versions:
            write_stub_wheel(self.stubs, name, v)
        if not versions:
            print(f"wheelhouse: note: the index has no {name} for the target, so nothing to leave out")

    def _write_constraints(self) -> None:
        self.constraints.write_text("".join(f"{n}=={stub_version(v)}\n" for n, v in sorted(self.pinned.items())))

    def _unpin(self, name: str) -> None:
        """The target's version of `name` does not fit the requirements: fetch `name` after all."""
        version = self.pinned.pop(name)
        self.unpinned[name] = version
        self.stubbed.discard(name)
        self.exclusions = [e for e in self.exclusions if e.pattern != name]
        for stub in self.stubs.glob(f"{wheel_dist(name)}-*.whl"):
            stub.unlink()
        self._write_constraints()

    def _build_sdist(self, requirement: str) -> None:
        """Build a wheel from an sdist (no wheel on the index); keep it only if it is pure Python."""
        print(f"wheelhouse: {requirement} has no wheel for the target; building it from its sdist")
        before = set(os.listdir(self.built))
        args = ["wheel", "--no-deps", "-w", str(self.built), *self.index, requirement]
        if self.no_build_isolation:
            args.insert(1, "--no-build-isolation")
        run_pip(args, self.verbose)
        for filename in sorted(set(os.listdir(self.built)) - before):
            if not is_pure(filename):
                raise RuntimeError(
                    f"{requirement}: the index has no wheel for the target and it builds here as "
                    f"{filename}, which is not pure Python; build that wheel on a machine like the "
                    f"target and pass its folder with --find-links"
                )
            self.built_from_sdist.append(filename)

    def download(self, requirements: list[str]) -> Path:
        """Resolve `requirements` with their dependency trees for the target, less the excluded
        packages and whatever only they need; return a staging folder holding exactly those wheels."""
        tried: set[str] = set()
        while True:
            self.runs += 1
            staging = self.work / f"staging{self.runs}"
            links = ["--find-links", str(self.stubs), "--find-links", str(self.built)]
            args = ["download", "-d", str(staging), *self.target, *self.index, *links,
                    "-c", str(self.constraints), *requirements]
            try:
                run_pip(args, self.verbose)
            except PipError as err:
                conflicts = sorted(conflicting_pins(err.output) & set(self.pinned))
                if conflicts:
                    print("wheelhouse: the target's " + ", ".join(f"{n}=={self.pinned[n]}" for n in conflicts)
                          + " does not fit what the project needs; fetching the version it needs instead")
                    for name in conflicts:
                        self._unpin(name)
                    continue
                missing = unresolvable_requirement(err.output)
                if missing is None or missing in tried:
                    raise
                tried.add(missing)
                self._build_sdist(missing)
                continue
            found = [f for f in os.listdir(staging) if not is_stub(f)]
            matched = {
                name for name, _ in map(wheel_name_version, found)
                if name not in self.stubbed and any(e.matches(name, self.direct) for e in self.exclusions)
            }
            if not matched:
                for f in os.listdir(staging):
                    if is_stub(f):
                        self.picked.add(wheel_name_version(f)[0])
                        (staging / f).unlink()
                return staging
            print(f"wheelhouse: leaving out {', '.join(sorted(matched))} (--exclude); resolving again")
            for name in sorted(matched):
                self._stub(name, None)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def split_file(path: Path, part_bytes: int) -> list[Path]:
    """Cut `path` into `<name>.part00`, `.part01`, ... of `part_bytes` each; remove the original."""
    parts = []
    with path.open("rb") as f:
        for i, block in enumerate(iter(lambda: f.read(part_bytes), b"")):
            part = path.with_name(f"{path.name}.part{i:02d}")
            part.write_bytes(block)
            parts.append(part)
    path.unlink()
    return parts


def plan_batches(sizes: dict[str, int], limit: int, first: tuple[str, ...] = META_FILES) -> list[list[str]]:
    """Files into batches of at most `limit` bytes each: `first` in batch 0, then the rest
    largest first, each into the first batch it fits (first-fit decreasing)."""
    too_big = {name: size for name, size in sizes.items() if size > limit}
    if too_big:
        raise ValueError(f"expected every file at most {limit} bytes for the batches, received {too_big}: "
                         f"use a --split-mib no larger than --chunks")
    order = [n for n in first if n in sizes] + sorted(
        (n for n in sizes if n not in first), key=lambda n: (-sizes[n], n))
    batches: list[list[str]] = []
    used: list[int] = []
    for name in order:
        for i, total in enumerate(used):
            if total + sizes[name] <= limit:
                batches[i].append(name)
                used[i] += sizes[name]
                break
        else:
            batches.append([name])
            used.append(sizes[name])
    return batches


def render_install_script(*, python_version: str, platforms: list[str], joins: dict[str, int],
                          runtime_wheels: list[str], left_out: dict[str, str], summary: str) -> str:
    """install.sh: join the parts, check SHA256SUMS, pip install offline (environment or TARGET)."""
    left = " ".join(sorted(left_out))
    left_note = ", ".join(f"{n} ({why})" for n, why in sorted(left_out.items())) or "nothing"
    join_lines = "".join(f"join {name} {count}\n" for name, count in sorted(joins.items()))
    wheel_lines = "".join(f'    "$here/{name}" \\\n' for name in runtime_wheels)
    return f"""#!/bin/sh
{SCRIPT_MARK}
# {summary}
# Target: CPython {python_version}, {platforms[0]} and older.
# Left out, the target must already have it: {left_note}.
#
#   sh install.sh                       # into the environment of $PYTHON (default: python3)
#   TARGET=/opt/kvdeps sh install.sh    # into a folder; then: export PYTHONPATH=/opt/kvdeps
#
# Copied over in batches? Put all their files in one folder first: cp batch*/* wheelhouse/
set -eu
here=$(cd "$(dirname "$0")" && pwd)
PYTHON=${{PYTHON:-python3}}
TARGET=${{TARGET:-}}
case $PYTHON in */*) PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON") ;; esac
case $TARGET in ""|/*) ;; *) TARGET=$PWD/$TARGET ;; esac
cd "$here"

fail() {{ echo "install.sh: $*" >&2; exit 1; }}

# join NAME COUNT: rebuild a file that was cut into NAME.part00 ... for transfer
join() {{
    [ -f "$1" ] && return 0
    i=0
    : > "$1.joining"
    while [ "$i" -lt "$2" ]; do
        part=$(printf '%s.part%02d' "$1" "$i")
        [ -f "$part" ] || {{ rm -f "$1.joining"; fail "missing $part: copy every batch's files into $here (cp batch*/* $here/)"; }}
        cat "$part" >> "$1.joining"
        i=$((i + 1))
    done
    mv "$1.joining" "$1"
}}
{join_lines}
while read -r sum name; do
    [ -f "$name" ] || fail "missing $name: copy every batch's files into $here (cp batch*/* $here/)"
done < SHA256SUMS
if command -v sha256sum >/dev/null 2>&1; then
    sha256sum -c --quiet SHA256SUMS || fail "checksums differ: copy the files again"
else
    shasum -a 256 -c SHA256SUMS >/dev/null || fail "checksums differ: copy the files again"
fi

version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])') || fail "cannot run $PYTHON: set PYTHON=/path/to/python{python_version}"
[ "$version" = "{python_version}" ] || fail "these wheels are for Python {python_version}, $PYTHON is $version: set PYTHON=/path/to/python{python_version}"

# What this wheelhouse left out ({left or "nothing"}) must be in $PYTHON, at versions the
# project's dependency tree accepts (excluded.txt): checked now rather than failing at import.
problems=$("$PYTHON" - "$here/excluded.txt" <<'CHECK'
{CHECK_SCRIPT}CHECK
) || fail "cannot check with $PYTHON what this wheelhouse left out (it needs pip): install pip, or set PYTHON"
if [ -n "$problems" ]; then
    echo "install.sh: $PYTHON lacks what this wheelhouse left out:" >&2
    printf '%s\n' "$problems" | sed 's/^/  /' >&2
    fail "install it first (GPU hosts: their CUDA build of torch), set PYTHON to a Python that has it, or rebuild the wheelhouse without leaving it out (--exclude '' or fewer names)"
fi

if [ -n "$TARGET" ]; then
    "$PYTHON" -m pip install --disable-pip-version-check --no-index --no-deps --upgrade --target "$TARGET" \\
{wheel_lines}    ;
    echo "install.sh: installed into $TARGET; use it with: export PYTHONPATH=$TARGET"
else
    "$PYTHON" -m pip install --disable-pip-version-check --no-index --find-links "$here" -r requirements.txt
fi
"""


# Run by install.sh with the target's Python on excluded.txt: prints one line per requirement
# left out of the wheelhouse that this Python does not meet (markers evaluated here, on the target).
CHECK_SCRIPT = """\
import sys
from importlib import metadata
from pip._vendor.packaging.requirements import Requirement

problems = []
for line in open(sys.argv[1]):
    text, _, why = line.partition("#")
    text, why = text.strip(), why.strip()
    if not text:
        continue
    requirement = Requirement(text)
    if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
        continue
    try:
        have = metadata.version(requirement.name)
    except metadata.PackageNotFoundError:
        problems.append(f"{requirement.name} is not installed (needed: {text}, {why})")
        continue
    if not requirement.specifier.contains(have, prereleases=True):
        problems.append(f"{requirement.name} {have} is installed, but {text} is needed ({why})")
print("\\n".join(dict.fromkeys(problems)))
"""


def excluded_requirements(wheels: list[Path], requirements: list[str], left_out: set[str]) -> list[str]:
    """The requirements on what was left out, as excluded.txt lists them: 'torch>=2.11,<2.14  #
    required by the project', 'tiny-beta>=1  # required by tiny-alpha 1.0' (from each wheel's
    Requires-Dist, markers kept); a left-out name nobody constrains appears bare."""
    lines = [f"{r}  # required by the project" for r in requirements if requirement_name(r) in left_out]
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            meta = next((n for n in archive.namelist() if n.endswith(".dist-info/METADATA")), None)
            text = archive.read(meta).decode("utf-8", "replace") if meta else ""
        name, version = wheel_name_version(wheel.name)
        for line in text.split("\n\n", 1)[0].splitlines():
            if line.startswith("Requires-Dist:"):
                requirement = line.split(":", 1)[1].strip()
                if requirement_name(requirement) in left_out:
                    lines.append(f"{requirement}  # required by {name} {version}")
    named = {requirement_name(line) for line in lines}
    lines += [f"{name}  # left out" for name in sorted(left_out - named)]
    return list(dict.fromkeys(lines))


def human(n: int) -> str:
    """Bytes for people: '262.0 MiB', '29.4 KiB'."""
    return f"{n / MIB:.1f} MiB" if n >= MIB else f"{n / 1024:.1f} KiB"


def prepare_out(out: Path) -> None:
    """Empty `out` (`validate` made sure it is absent, empty or a wheelhouse written before)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)


def build(args: argparse.Namespace) -> None:
    """Fetch, split, checksum and lay out the wheelhouse as `args` say; print what it holds."""
    runtime, build_requires = read_requirements(args.pyproject)
    extras = [r for item in args.extra for r in split_list(item)]
    requirements = runtime + extras
    direct = {requirement_name(r) for r in requirements + build_requires}
    platforms = expand_platforms(args.platform or [DEFAULT_PLATFORM])
    target = target_options(args.python_version, platforms)
    index = list(args.pip_index_options)
    out: Path = args.out
    prepare_out(out)

    with tempfile.TemporaryDirectory(prefix="wheelhouse-") as tmp:
        resolver = Resolver(target, index, args.exclusions, direct, Path(tmp),
                            no_build_isolation=args.no_build_isolation, verbose=args.verbose)
        print(f"wheelhouse: resolving {len(requirements)} requirements for CPython {args.python_version}, "
              f"{platforms[0]} (and older); excluding {', '.join(e.pattern for e in args.exclusions) or 'nothing'}")
        runtime_dir = resolver.download(requirements)
        runtime_wheels = sorted(os.listdir(runtime_dir))
        runtime_left_out = set(resolver.picked)
        for name in runtime_wheels:
            shutil.move(str(runtime_dir / name), out / name)
        if build_requires:
            print(f"wheelhouse: resolving the build requirements: {', '.join(build_requires)}")
            build_dir = resolver.download(build_requires)
            for name in os.listdir(build_dir):
                if not (out / name).exists():
                    shutil.move(str(build_dir / name), out / name)
        left_out = {n: "required by the project" if n in direct else "required by a dependency"
                    for n in resolver.picked}
        unpinned = dict(resolver.unpinned)
        built_from_sdist = resolver.built_from_sdist

    (out / "excluded.txt").write_text("".join(
        f"{line}\n" for line in excluded_requirements([out / w for w in runtime_wheels], requirements, runtime_left_out)))
    wheels = sorted(w for w in os.listdir(out) if w.endswith(".whl"))
    (out / "SHA256SUMS").write_text("".join(f"{sha256(out / w)}  {w}\n" for w in wheels))
    total = sum((out / w).stat().st_size for w in wheels)
    sizes = {w: (out / w).stat().st_size for w in wheels}
    part_bytes = int(args.split_mib * MIB)
    joins = {w: len(split_file(out / w, part_bytes)) for w in wheels if sizes[w] > part_bytes}
    (out / "requirements.txt").write_text("".join(f"{r}\n" for r in requirements))
    summary = (f"{len(wheels)} wheels, {human(total)}, written {date.today().isoformat()}"
               + (f"; built from sdists: {', '.join(built_from_sdist)}" if built_from_sdist else ""))
    script = out / "install.sh"
    script.write_text(render_install_script(
        python_version=args.python_version, platforms=platforms, joins=joins,
        runtime_wheels=runtime_wheels, left_out=left_out, summary=summary))
    script.chmod(0o755)

    print(f"wheelhouse: wrote {out}/: {summary}")
    print(f"wheelhouse: left out (the target must have them): {', '.join(sorted(left_out)) or 'nothing'}")
    if unpinned:
        print("wheelhouse: fetched although the target has them, at versions that do not fit: "
              + ", ".join(f"{n}=={v}" for n, v in sorted(unpinned.items())))
    for w in sorted(sizes, key=lambda w: -sizes[w])[:5]:
        print(f"  {human(sizes[w]):>10}  {w}" + (f"  (split into {joins[w]} parts)" if w in joins else ""))
    if args.chunks is not None:
        lay_out_batches(out, int(args.chunks * MIB))
    print(f"wheelhouse: on the target: sh {out.name}/install.sh  (or TARGET=/some/dir sh {out.name}/install.sh)")


def lay_out_batches(out: Path, limit: int) -> list[list[str]]:
    """Move every file of `out` into batch0/, batch1/, ..., each at most `limit` bytes; print the plan."""
    sizes = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
    batches = plan_batches(sizes, limit)
    for i, names in enumerate(batches):
        folder = out / f"batch{i}"
        folder.mkdir()
        for name in names:
            shutil.move(str(out / name), folder / name)
        print(f"  batch{i}/  {human(sum(sizes[n] for n in names))}, {len(names)} file{'s' if len(names) > 1 else ''}:")
        for name in names:
            print(f"    {human(sizes[name]):>10}  {name}")
    print(f"wheelhouse: {len(batches)} batches of at most {human(limit)}; "
          f"on the target put them together again: mkdir -p wheelhouse && cp batch*/* wheelhouse/")
    return batches


class _Parser(argparse.ArgumentParser):
    """argparse with one line per mistake (no usage block), exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(
        prog="python -m orchestrator.tools.wheelhouse",
        description="Download every wheel the project needs for an offline target, split the big ones, "
                    "and write install.sh.")
    parser.add_argument("--out", type=Path, default=Path("wheelhouse"), help="folder to write (default: wheelhouse)")
    parser.add_argument("--pyproject", type=Path, default=REPO_PYPROJECT, help="the project's pyproject.toml")
    parser.add_argument("--python-version", default=DEFAULT_PYTHON, help="target CPython, e.g. 3.12 (default)")
    parser.add_argument("--platform", action="append", default=[],
                        help=f"target platform tag, repeatable (default {DEFAULT_PLATFORM}; older glibc tags are added)")
    parser.add_argument("--exclude", default=DEFAULT_EXCLUDE,
                        help=f"names or patterns the target already has, 'torch==2.11.0' to give its version; "
                             f"'' for none (default: {DEFAULT_EXCLUDE})")
    parser.add_argument("--exclude-from", action="append", default=[], type=Path, metavar="FILE",
                        help="more names to leave out, one a line ('#' comments), e.g. the target's "
                             "`python3 -m pip list --format=freeze` (name==version pins the target's version); "
                             "repeatable, added to --exclude")
    parser.add_argument("--freeze-names", action="store_true",
                        help="print name==version of every package this Python has, then exit "
                             "(run on the target: ... --freeze-names > have.txt)")
    parser.add_argument("--extra", action="append", default=[],
                        help="more requirements, comma-separated, e.g. pytest,hypothesis (repeatable)")
    parser.add_argument("--split-mib", type=float, default=DEFAULT_SPLIT_MIB,
                        help=f"cut files larger than this into parts (default {DEFAULT_SPLIT_MIB:g})")
    parser.add_argument("--chunks", type=float, nargs="?", const=DEFAULT_CHUNK_MIB, default=None, metavar="MIB",
                        help=f"lay the folder out as batch0/, batch1/, ... of at most MIB each (default {DEFAULT_CHUNK_MIB:g})")
    parser.add_argument("--no-build-isolation", action="store_true", help="passed to pip when an sdist is built")
    parser.add_argument("-v", "--verbose", action="store_true", help="show pip's commands and output")
    pip_index = parser.add_argument_group("pip index options, passed through to every pip call")
    pip_index.add_argument("--index-url", help="pip --index-url")
    pip_index.add_argument("--extra-index-url", action="append", default=[], help="pip --extra-index-url (repeatable)")
    pip_index.add_argument("--find-links", action="append", default=[], help="pip --find-links (repeatable)")
    pip_index.add_argument("--no-index", action="store_true", help="pip --no-index")
    args = parser.parse_args(argv)
    if args.freeze_names:
        return args
    try:
        validate(args)
    except ValueError as err:
        parser.error(str(err))
    return args


def validate(args: argparse.Namespace) -> None:
    """Check the arguments and derive `exclusions` and `pip_index_options`; ValueError on a mistake."""
    if not re.fullmatch(r"3\.\d{1,2}", args.python_version):
        raise ValueError(f"expected --python-version like 3.12, received {args.python_version!r}")
    if not args.split_mib * MIB >= 1:
        raise ValueError(f"expected --split-mib > 0 (e.g. 60), received {args.split_mib}")
    if args.chunks is not None and not args.split_mib <= args.chunks:
        raise ValueError(f"expected --split-mib no larger than --chunks ({args.chunks:g}) so every part fits a "
                         f"batch, received --split-mib {args.split_mib:g}: lower --split-mib")
    for platform in args.platform:
        if not re.fullmatch(r"[a-z0-9_]+", platform):
            raise ValueError(f"expected --platform like manylinux_2_28_x86_64, received {platform!r}")
    for item in args.extra:
        for requirement in split_list(item):
            requirement_name(requirement)
    if not args.pyproject.is_file():
        raise ValueError(f"expected a pyproject.toml file, received {str(args.pyproject)!r}: pass --pyproject PATH")
    exclusions = parse_exclusions(args.exclude)
    for path in args.exclude_from:
        exclusions += read_exclusion_file(path)
    args.exclusions = merge_exclusions(exclusions)
    index = ["--index-url", args.index_url] if args.index_url else []
    for url in args.extra_index_url:
        index += ["--extra-index-url", url]
    for link in args.find_links:
        index += ["--find-links", str(Path(link).resolve()) if Path(link).exists() else link]
    if args.no_index:
        index.append("--no-index")
    args.pip_index_options = index
    out = args.out
    if out.exists() and not out.is_dir():
        raise ValueError(f"expected --out to be a folder, received the file {str(out)!r}")
    if out.is_dir() and any(out.iterdir()):
        scripts = [out / "install.sh", out / "batch0" / "install.sh"]
        if not any(s.is_file() and _ANY_SCRIPT_MARK in s.read_text() for s in scripts):
            raise ValueError(f"expected --out to be empty or a wheelhouse written before, received "
                             f"{str(out)!r} with other files in it: pick another folder or empty it")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.freeze_names:
        print("\n".join(installed_distributions()))
        return 0
    try:
        build(args)
    except (PipError, RuntimeError) as err:
        print(f"wheelhouse: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
