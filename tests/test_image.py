"""The container image: the Dockerfile's promises, checked without a Docker engine.

No Docker engine runs where these tests run, so they check what can be checked
without one:

- the Dockerfile itself, read by a small parser: the base image is pinned, the
  runtime stage runs as a non-root user with ``ENTRYPOINT ["kap"]``, carries
  the OCI labels, keeps no pip cache and installs no compiler, and turns off
  bytecode writes;
- the dependencies: installed from the hashed lock ``requirements/runtime.txt``,
  wheels only, without resolution; kap's wheel without dependencies;
- the build context: ``.dockerignore`` lets through what the ``COPY`` lines
  need and keeps the rest out;
- the build itself (``slow``): the Dockerfile's own ``RUN`` commands of the
  build stage are replayed outside Docker (the container paths mapped into a
  temporary directory, ``--build-arg REVISION`` given), and the resulting
  environment holds exactly the locked versions, names the revision in
  ``kap --version``, runs ``kap --help`` and a short real ``kap`` on a read-only
  root filesystem (a private mount namespace with ``/`` remounted read-only and
  no capabilities, when this machine allows it) and writes no file.
"""

from __future__ import annotations

import contextlib
import glob
import http.client
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
RUNTIME_LOCK = "requirements/runtime.txt"
# What `docker build --build-arg REVISION="$(git rev-parse HEAD)"` would pass.
IMAGE_REVISION = "feedc0de" * 5

# Images with a compiler or a package manager step that would bring one in.
COMPILER_WORDS = ("gcc", "g++", "clang", "build-essential", "make", "cc")


# --- a small Dockerfile reader -------------------------------------------------


@attrs.frozen
class Instruction:
    keyword: str  # upper case: FROM, RUN, ...
    args: str  # the rest of the logical line, continuations joined
    stage: int  # -1 before the first FROM (global ARGs), then 0, 1, ...


def parse_dockerfile(text: str) -> list[Instruction]:
    """Split a Dockerfile into instructions: comments dropped, continuations joined."""
    instructions: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments and parser directives, also inside continuations
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        logical = pending + line
        pending = ""
        keyword, _, args = logical.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, args.strip(), stage))
    assert not pending, "the Dockerfile ends inside a line continuation"
    return instructions


def parse_assignments(args: str) -> dict[str, str]:
    """``ENV``/``LABEL``/``ARG`` arguments in the ``key=value key2="v 2"`` form."""
    result = {}
    for word in shlex.split(args):
        key, sep, value = word.partition("=")
        result[key] = value if sep else ""
    return result


def expand(value: str, variables: dict[str, str]) -> str:
    return re.sub(
        r"\$\{(\w+)\}|\$(\w+)",
        lambda m: variables.get(m.group(1) or m.group(2), m.group(0)),
        value,
    )


@attrs.frozen
class Dockerfile:
    instructions: list[Instruction]

    @classmethod
    def read(cls, path: Path = DOCKERFILE) -> Dockerfile:
        return cls(parse_dockerfile(path.read_text()))

    @property
    def global_args(self) -> dict[str, str]:
        args: dict[str, str] = {}
        for ins in self.instructions:
            if ins.stage == -1 and ins.keyword == "ARG":
                args.update(parse_assignments(ins.args))
        return args

    @property
    def last_stage(self) -> int:
        return max(ins.stage for ins in self.instructions)

    def stage(self, index: int) -> list[Instruction]:
        return [ins for ins in self.instructions if ins.stage == index]

    def stage_named(self, name: str) -> int:
        for ins in self.instructions:
            words = ins.args.split()
            if ins.keyword == "FROM" and words[1:] in (["AS", name], ["as", name]):
                return ins.stage
        raise KeyError(name)

    def base_images(self) -> list[str]:
        """The image each stage starts from, ARGs expanded, stage references left out."""
        stage_names = set()
        images = []
        for ins in self.instructions:
            if ins.keyword != "FROM":
                continue
            words = [w for w in ins.args.split() if not w.startswith("--platform")]
            image = expand(words[0], self.global_args)
            if image not in stage_names:
                images.append(image)
            if len(words) == 3:
                stage_names.add(words[2])
        return images

    def args(self, stage: int, build_args: dict[str, str] | None = None) -> dict[str, str]:
        """A stage's ARGs: their defaults, overridden by ``--build-arg`` values."""
        args: dict[str, str] = {}
        for ins in self.stage(stage):
            if ins.keyword == "ARG":
                args.update(parse_assignments(ins.args))
        return {k: (build_args or {}).get(k, v) for k, v in args.items()}

    def env(self, stage: int, build_args: dict[str, str] | None = None) -> dict[str, str]:
        """A stage's ENV, with ``${ARG}`` references expanded."""
        args = self.args(stage, build_args)
        env: dict[str, str] = {}
        for ins in self.stage(stage):
            if ins.keyword == "ENV":
                env.update({k: expand(v, args) for k, v in parse_assignments(ins.args).items()})
        return env

    def last(self, keyword: str, stage: int) -> Instruction | None:
        found = [ins for ins in self.stage(stage) if ins.keyword == keyword]
        return found[-1] if found else None


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return Dockerfile.read()


@pytest.fixture(scope="module")
def project() -> dict[str, object]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_parser_reads_continuations_and_stages() -> None:
    text = (
        "# syntax=docker/dockerfile:1\nARG X=1\nFROM a AS b\nRUN one \\\n # c\n  && two\nFROM b\n"
    )
    assert parse_dockerfile(text) == [
        Instruction("ARG", "X=1", -1),
        Instruction("FROM", "a AS b", 0),
        Instruction("RUN", "one && two", 0),
        Instruction("FROM", "b", 1),
    ]


# --- what the Dockerfile promises ----------------------------------------------


def test_every_base_image_is_pinned_by_digest_or_exact_version(dockerfile: Dockerfile) -> None:
    images = dockerfile.base_images()
    assert images, "no FROM line"
    for image in images:
        assert "$" not in image, f"{image}: an ARG without a default"
        name, _, digest = image.partition("@")
        _, _, tag = name.rpartition(":")
        by_digest = re.fullmatch(r"sha256:[0-9a-f]{64}", digest) is not None
        by_version = re.match(r"\d+\.\d+\.\d+(-|$)", tag) is not None
        assert by_digest or by_version, f"{image} is pinned by neither digest nor exact version"


def test_runtime_stage_runs_as_a_non_root_user(dockerfile: Dockerfile) -> None:
    user = dockerfile.last("USER", dockerfile.last_stage)
    assert user is not None, "the runtime stage has no USER, so it runs as root"
    uid = user.args.split(":")[0]
    assert uid not in ("0", "root"), f"USER {user.args} is root"


def test_entrypoint_is_kap_in_exec_form(dockerfile: Dockerfile) -> None:
    entrypoint = dockerfile.last("ENTRYPOINT", dockerfile.last_stage)
    assert entrypoint is not None
    assert json.loads(entrypoint.args) == ["kap"]
    # A CMD would add arguments that every manifest's args then replace; none.
    assert dockerfile.last("CMD", dockerfile.last_stage) is None


def test_oci_labels_name_source_version_and_licence(
    dockerfile: Dockerfile, project: dict[str, object]
) -> None:
    stage = dockerfile.last_stage
    args: dict[str, str] = {}
    labels: dict[str, str] = {}
    for ins in dockerfile.stage(stage):
        if ins.keyword == "ARG":
            args.update(parse_assignments(ins.args))
        if ins.keyword == "LABEL":
            labels.update({k: expand(v, args) for k, v in parse_assignments(ins.args).items()})
    assert labels["org.opencontainers.image.source"] == project["urls"]["Source"]  # type: ignore[index]
    assert labels["org.opencontainers.image.version"] == project["version"]
    assert labels["org.opencontainers.image.licenses"] == project["license"]
    assert labels["org.opencontainers.image.title"] == "kap"


def test_no_compiler_and_no_pip_cache(dockerfile: Dockerfile) -> None:
    for ins in dockerfile.instructions:
        if ins.keyword != "RUN":
            continue
        words = set(re.split(r"[\s;&|]+", ins.args))
        assert not words & set(COMPILER_WORDS), f"RUN {ins.args}: installs or runs a compiler"
        assert not words & {"apt-get", "apk", "dnf", "yum"}, f"RUN {ins.args}: package manager"
        if "pip" in words:
            env = dockerfile.env(ins.stage)
            assert env.get("PIP_NO_CACHE_DIR") == "1" or "--no-cache-dir" in ins.args
    # The runtime stage only copies the built environment in; pip never runs there.
    runtime = dockerfile.stage(dockerfile.last_stage)
    assert not [ins for ins in runtime if ins.keyword == "RUN"]
    copies = [ins.args for ins in runtime if ins.keyword == "COPY"]
    assert copies
    assert all(c.startswith("--from=") for c in copies)


def test_runtime_needs_no_writable_root_filesystem(dockerfile: Dockerfile) -> None:
    env = dockerfile.env(dockerfile.last_stage)
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    # ... and the bytecode exists because the build stage compiled it, in a mode
    # that does not depend on file modification times surviving COPY.
    build = dockerfile.stage(dockerfile.stage_named("build"))
    assert any(
        "compileall" in ins.args and "unchecked-hash" in ins.args
        for ins in build
        if ins.keyword == "RUN"
    )


# --- the dependencies ---------------------------------------------------------


def build_commands(dockerfile: Dockerfile) -> list[list[str]]:
    """The words of every command the build stage RUNs (``&&`` splits commands)."""
    build = dockerfile.stage(dockerfile.stage_named("build"))
    runs = [ins.args for ins in build if ins.keyword == "RUN"]
    return [shlex.split(command) for run in runs for command in run.split("&&")]


def pip_installs(dockerfile: Dockerfile) -> list[list[str]]:
    """The words of every ``pip ... install`` command in the build stage."""
    commands = build_commands(dockerfile)
    return [words for words in commands if words[0] == "pip" and "install" in words]


def test_dependencies_come_only_from_the_hashed_lock(dockerfile: Dockerfile) -> None:
    installs = pip_installs(dockerfile)
    assert installs, "no pip install in the build stage"
    for words in installs:
        assert "--no-deps" in words, f"{shlex.join(words)}: pip would resolve dependencies"
    from_lock = [w for w in installs if "-r" in w]
    assert len(from_lock) == 1, "the dependencies should come from one lock"
    words = from_lock[0]
    assert words[words.index("-r") + 1] == RUNTIME_LOCK
    assert "--require-hashes" in words
    assert "--only-binary=:all:" in words, "an sdist would need a compiler"
    # Every other install is kap's own wheel.
    for words in installs:
        if words is not from_lock[0]:
            assert words[-1].startswith("/dist/kap-") and words[-1].endswith(".whl"), words


def test_build_stage_checks_the_installed_set_is_complete(dockerfile: Dockerfile) -> None:
    # --no-deps trusts the lock to hold every dependency; pip check proves it.
    assert ["pip", "--python", "/opt/kap/bin/python", "check"] in build_commands(dockerfile)


def test_revision_build_arg_reaches_the_wheel_build(dockerfile: Dockerfile) -> None:
    build = dockerfile.stage_named("build")
    env = dockerfile.env(build, {"REVISION": IMAGE_REVISION})
    assert env.get("KAP_REVISION") == IMAGE_REVISION  # setup.py writes it into the wheel
    assert "REVISION" in dockerfile.args(dockerfile.last_stage)  # and the OCI label


# --- the build context ------------------------------------------------------


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus ``**``) as a regex."""
    pattern = pattern.strip("/")
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def read_dockerignore(path: Path = DOCKERIGNORE) -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        rules.append((negated, _dockerignore_regex(line.lstrip("!"))))
    return rules


def in_context(relpath: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether the builder sends ``relpath``: the last rule matching it or a parent wins."""
    parts = relpath.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for negated, regex in rules:
        if any(regex.fullmatch(c) for c in candidates):
            included = negated
    return included


def copy_sources(dockerfile: Dockerfile) -> list[str]:
    """The build-context paths the Dockerfile COPYs (``--from`` copies left out)."""
    sources = []
    for ins in dockerfile.instructions:
        if ins.keyword in ("COPY", "ADD") and "--from=" not in ins.args:
            words = [w for w in shlex.split(ins.args) if not w.startswith("--")]
            sources += words[:-1]
    return sources


def test_dockerignore_rules_behave_like_docker() -> None:
    rules = [(False, _dockerignore_regex("*")), (True, _dockerignore_regex("kap/"))]
    rules.append((False, _dockerignore_regex("**/__pycache__")))
    assert in_context("kap/cli.py", rules)
    assert not in_context("tests/test_image.py", rules)
    assert not in_context("kap/__pycache__/cli.cpython-311.pyc", rules)


def test_build_context_holds_what_copy_needs_and_nothing_else(dockerfile: Dockerfile) -> None:
    rules = read_dockerignore()
    sources = copy_sources(dockerfile)
    assert sources
    for source in sources:
        path = REPO / source
        assert path.exists(), f"COPY {source}: not in the repository"
        files = [path] if path.is_file() else [p for p in path.rglob("*.py")]
        assert files, f"COPY {source}: nothing to copy"
        for f in files:
            rel = f.relative_to(REPO).as_posix()
            assert in_context(rel, rules), f"COPY {source} needs {rel}; .dockerignore drops it"
    outside_paths = (".git/HEAD", "tests/test_image.py", ".venv/bin/python", "dist/x.whl")
    for outside in (*outside_paths, "requirements/dev.txt", "build/lib/kap/_revision.txt"):
        assert not in_context(outside, rules), f"{outside} would be sent to the builder"
    assert not in_context("kap/__pycache__/x.cpython-311.pyc", rules)


# --- the build, replayed without Docker ---------------------------------------


def stage_context(dockerfile: Dockerfile, dest: Path) -> None:
    """Copy into ``dest`` what ``docker build`` would send and the build stage COPYs."""
    rules = read_dockerignore()
    for source in copy_sources(dockerfile):
        src = REPO / source
        files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
        for f in files:
            rel = f.relative_to(REPO).as_posix()
            if in_context(rel, rules):
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, target)


NETWORK_TROUBLE = re.compile(
    r"No matching distribution|Could not find a version|Temporary failure in name resolution"
    r"|Failed to establish a new connection|Max retries exceeded|Network is unreachable",
)


def replay_build_stage(
    dockerfile: Dockerfile, root: Path, build_args: dict[str, str] | None = None
) -> Path:
    """Run the build stage's RUN commands with container paths mapped under ``root``.

    ``/src`` is the build context (WORKDIR), ``/dist`` the wheel directory and
    ``/opt/kap`` the environment the runtime stage copies. ``pip`` and ``python``
    are this interpreter. ``build_args`` are ``docker build --build-arg``s: as
    in Docker, the stage's ARGs are in the environment of its RUN commands.
    Returns the environment's directory.
    """
    build = dockerfile.stage_named("build")
    mapping = {"/src": root / "src", "/dist": root / "dist", "/opt/kap": root / "opt" / "kap"}
    stage_context(dockerfile, mapping["/src"])
    env = {
        **os.environ,
        **dockerfile.args(build, build_args),
        **dockerfile.env(build, build_args),
    }

    def map_word(word: str) -> list[str]:
        for container, host in mapping.items():
            if word == container or word.startswith(container + "/"):
                word = str(host) + word[len(container) :]
                break
        if "*" in word:
            matches = sorted(glob.glob(word))
            assert matches, f"{word}: no match"
            return matches
        return [word]

    for ins in dockerfile.stage(build):
        if ins.keyword != "RUN":
            continue
        for command in ins.args.split("&&"):
            words = shlex.split(command)
            argv = [sys.executable, "-m", "pip"] if words[0] == "pip" else [sys.executable]
            assert words[0] in ("pip", "python"), f"cannot replay {command!r} outside Docker"
            argv += [mapped for w in words[1:] for mapped in map_word(w)]
            done = subprocess.run(
                argv, cwd=mapping["/src"], env=env, capture_output=True, text=True, timeout=600
            )
            if done.returncode != 0:
                output = done.stdout + done.stderr
                if NETWORK_TROUBLE.search(output):
                    pytest.skip(f"cannot reach the package index to install dependencies: {output}")
                pytest.fail(f"{command.strip()} failed:\n{output}")
    return mapping["/opt/kap"]


def read_only_root_works() -> bool:
    """Whether this process may make a private mount namespace with ``/`` read-only."""
    if shutil.which("unshare") is None or shutil.which("setpriv") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "--", "sh", "-c", READ_ONLY_ROOT + "; exec true"],
        capture_output=True,
    )
    return probe.returncode == 0


# In a private mount namespace: remount / read-only (submounts such as /proc and
# /dev keep theirs, as in a container), then drop every capability, as the
# manifests do.
READ_ONLY_ROOT = "mount --make-rprivate / && mount -o remount,bind,ro /"
SANDBOX = (
    READ_ONLY_ROOT + ' && exec setpriv --no-new-privs --bounding-set=-all --inh-caps=-all "$@"'
)


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    files = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                files[path] = (st.st_mtime_ns, st.st_size)
    return files


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@attrs.frozen
class Image:
    """The replayed image: an environment, the runtime ENV, and how to run in it."""

    prefix: Path
    env: dict[str, str]
    workdir: Path
    sandboxed: bool

    def argv(self, *args: str) -> list[str]:
        kap = [str(self.prefix / "bin" / "kap"), *args]
        if self.sandboxed:
            return ["unshare", "--mount", "--", "sh", "-c", SANDBOX, "sh", *kap]
        return kap


@pytest.fixture(scope="module")
def image(dockerfile: Dockerfile, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Image]:
    root = tmp_path_factory.mktemp("image")
    prefix = replay_build_stage(dockerfile, root, {"REVISION": IMAGE_REVISION})
    runtime_env = {
        k: expand(v, {"PATH": "/usr/bin:/bin"}).replace("/opt/kap", str(prefix))
        for k, v in dockerfile.env(dockerfile.last_stage).items()
    }
    workdir = root / "workdir"
    workdir.mkdir()
    env = {"HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8", **runtime_env}
    sandboxed = read_only_root_works()
    if not sandboxed:
        # Without a mount namespace: a read-only working directory and HOME
        # (effective only for a non-root user) plus the no-new-files check.
        workdir.chmod(0o555)
    yield Image(prefix, env, workdir, sandboxed)
    workdir.chmod(0o755)


@pytest.mark.slow
def test_image_build_installs_a_working_kap(image: Image) -> None:
    before = snapshot(image.prefix, image.workdir)
    done = subprocess.run(
        image.argv("--help"),
        cwd=image.workdir,
        env=image.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "--listen-port" in done.stdout
    assert snapshot(image.prefix, image.workdir) == before, "kap --help wrote files"


@pytest.mark.slow
def test_image_runs_on_a_read_only_root_and_stops_cleanly_on_sigterm(image: Image) -> None:
    if not image.sandboxed:
        print("no mount namespace here: checking only that no file was written")
    listen, health = free_port(), free_port()
    before = snapshot(image.prefix, image.workdir)
    argv = image.argv(
        "--listen-addr=127.0.0.1",
        f"--listen-port={listen}",
        f"--health-listen=127.0.0.1:{health}",
        "--no-discovery",
        "--fallback-upstreams=127.0.0.1:1",
        "--shutdown-grace=2s",
    )
    proc = subprocess.Popen(
        argv,
        cwd=image.workdir,
        env=image.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        status, body = 0, b""
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError):
                status, body = http_get(health, "/upstreams")
                if status == 200:
                    break
            time.sleep(0.1)
        assert proc.poll() is None, f"kap exited early:\n{proc.communicate()[1]}"
        assert status == 200, "the health server never answered"
        addresses = [u["address"] for u in json.loads(body)["upstreams"]]
        assert "127.0.0.1:1" in addresses
        assert http_get(health, "/healthz")[0] == 200
        failures = 0
        while failures < 2:  # a few probe rounds against the dead upstream
            assert time.monotonic() < deadline and proc.poll() is None, "no probe failed"
            (dead,) = json.loads(http_get(health, "/upstreams")[1])["upstreams"]
            failures = dead["probe_failures_total"]
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert "Read-only file system" not in stderr
    assert snapshot(image.prefix, image.workdir) == before, "kap wrote files"


def locked_pins() -> dict[str, str]:
    """``{normalised name: version}`` of the runtime lock (hack/lock.py reads it)."""
    spec = importlib.util.spec_from_file_location("kap_hack_lock", REPO / "hack" / "lock.py")
    assert spec is not None and spec.loader is not None
    lock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lock)
    pins: dict[str, str] = lock.pins((REPO / RUNTIME_LOCK).read_text())
    return pins


INSTALLED = (
    "import importlib.metadata as m, json, re; print(json.dumps("
    "{re.sub(r'[-_.]+', '-', d.metadata['Name']).lower(): d.version for d in m.distributions()}))"
)


@pytest.mark.slow
def test_image_holds_exactly_the_locked_versions_and_kap(
    image: Image, project: dict[str, object]
) -> None:
    done = subprocess.run(
        [str(image.prefix / "bin" / "python"), "-c", INSTALLED],
        cwd=image.workdir,
        env=image.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(done.stdout) == {**locked_pins(), "kap": project["version"]}


@pytest.mark.slow
def test_image_kap_version_names_the_revision_it_was_built_from(
    image: Image, project: dict[str, object]
) -> None:
    done = subprocess.run(
        image.argv("--version"),
        cwd=image.workdir,
        env=image.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"kap {project['version']} (revision {IMAGE_REVISION})"
