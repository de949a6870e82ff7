"""Offline checks of the deployment files in cluster/.

* cluster/daskjob.yaml is validated against the DaskJob CRD of the Dask Kubernetes operator
  (vendored as tests/data/daskjob_crd.yaml), plus the conventions the CRD cannot express.
* The dglmm command lines of the job runner's script are checked against the dglmm argument
  parser (``dglmm.cli.build_parser()``), or against the documented flags while that does not
  exist yet.
* The runner script's shell logic is run with a stand-in ``dglmm`` on a local directory.
* cluster/local-cluster.sh starts a real scheduler and workers on 127.0.0.1 (marker ``cluster``).
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from string import Template
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "cluster" / "daskjob.yaml"
CRD = ROOT / "tests" / "data" / "daskjob_crd.yaml"
LOCAL_CLUSTER = ROOT / "cluster" / "local-cluster.sh"

# The documented flags of each subcommand, used while dglmm.cli.build_parser() does not exist.
FIT_VALUE_FLAGS = {
    "--formula", "--family", "--link", "--n-agq", "--trials", "--offset", "--weights",
    "--output", "--scheduler", "--scheduler-file", "--workers", "--checkpoint",
    "--random-effects", "--missing",
}  # fmt: skip
FIT_SWITCHES = {"--resume"}
PREPARE_VALUE_FLAGS = {"--group", "--partitions"}
KNOWN_COMMANDS = {
    # subcommand: (number of positional arguments, flags taking a value, switches)
    "fit": (1, FIT_VALUE_FLAGS, FIT_SWITCHES),
    "prepare": (2, PREPARE_VALUE_FLAGS, set()),
}
SHELL_OPERATORS = {";", "&&", "||", "|", "&", ">", ">>", "<", "2>", "2>&1"}


# ----------------------------------------------------------------------------- helpers


def load_documents() -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d is not None]
    assert docs, "cluster/daskjob.yaml holds no documents"
    return docs


def documents_of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in load_documents() if d.get("kind") == kind]


def the_daskjob() -> dict[str, Any]:
    jobs = documents_of_kind("DaskJob")
    assert len(jobs) == 1, f"expected one DaskJob in {MANIFEST.name}, found {len(jobs)}"
    return jobs[0]


def the_configmap() -> dict[str, Any]:
    maps = documents_of_kind("ConfigMap")
    assert len(maps) == 1, f"expected one ConfigMap in {MANIFEST.name}, found {len(maps)}"
    return maps[0]


def pod_specs(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    cluster = job["spec"]["cluster"]["spec"]
    return {
        "job": job["spec"]["job"]["spec"],
        "scheduler": cluster["scheduler"]["spec"],
        "worker": cluster["worker"]["spec"],
    }


def container(job: dict[str, Any], role: str) -> dict[str, Any]:
    containers = pod_specs(job)[role]["containers"]
    assert len(containers) == 1, f"{role} pod: expected one container"
    return containers[0]


def runner_script(job: dict[str, Any]) -> str:
    c = container(job, "job")
    argv = list(c.get("command", [])) + list(c.get("args", []))
    assert len(argv) == 3 and argv[0] in {"sh", "bash"} and argv[1] == "-c", (
        f"the job runner should run a shell script (sh|bash -c SCRIPT), got {argv[:2]}"
    )
    return argv[2]


def k8s_schema_to_jsonschema(node: Any, *, root: bool = True) -> Any:
    """Turn a CRD's structural OpenAPI v3 schema into a JSON Schema with the API server's
    strictness.

    * ``x-kubernetes-*`` keywords (list/map types, for server-side apply) are dropped.
    * ``nullable: true`` becomes "or null".
    * ``format: int-or-string`` is dropped, but its ``type: string`` kept: this CRD's
      generator wrote ports and quantities as plain strings, so an unquoted number there would
      be rejected by the API server as well (quote ``"8786"``, or better use a port name).
    * Objects with ``properties`` and no ``additionalProperties`` reject unknown fields: the
      API server would drop (prune) them silently, so a misspelt field is a bug.
    """
    if isinstance(node, list):
        return [k8s_schema_to_jsonschema(n, root=False) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key == "format" and value == "int-or-string":
            continue
        if key in {"properties", "patternProperties", "definitions"}:
            out[key] = {k: k8s_schema_to_jsonschema(v, root=False) for k, v in value.items()}
        elif key == "default":
            out[key] = value
        else:
            out[key] = k8s_schema_to_jsonschema(value, root=False)
    if root:
        # apiVersion, kind and metadata are implicit in every CRD schema.
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    if node.get("nullable") is True:
        out = {"anyOf": [out, {"type": "null"}]}
    return out


@functools.cache
def daskjob_validator() -> jsonschema.protocols.Validator:
    crd = yaml.safe_load(CRD.read_text())
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["spec"]["names"]["kind"] == "DaskJob"
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1"
    schema = k8s_schema_to_jsonschema(version["schema"]["openAPIV3Schema"])
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    cls.check_schema(schema)
    return cls(schema)


def schema_errors(doc: dict[str, Any]) -> list[str]:
    errors = sorted(daskjob_validator().iter_errors(doc), key=lambda e: list(e.absolute_path))
    return ["/".join(map(str, e.absolute_path)) + ": " + e.message for e in errors]


def dglmm_command_lines(script: str) -> list[list[str]]:
    """The argv (after ``dglmm``) of every dglmm invocation in a shell script."""
    joined = script.replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        if "dglmm" not in line:
            continue
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:  # a line inside a multi-line quoted string (python -c code)
            continue
        for i, token in enumerate(tokens):
            if token == "dglmm" and (i == 0 or tokens[i - 1] in {"exec", "then", "do", "&&"}):
                argv = []
                for t in tokens[i + 1 :]:
                    if t in SHELL_OPERATORS:
                        break
                    argv.append(t)
                commands.append(argv)
    return commands


def expand(argv: list[str], env: dict[str, str]) -> list[str]:
    """Substitute ``$VAR``/``${VAR}`` (the shell would; shlex does not)."""
    out = []
    for token in argv:
        missing = [
            name for name in re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", token) if name not in env
        ]
        assert not missing, f"{token!r} uses variables defined nowhere: {missing}"
        out.append(Template(token).substitute(env))
    return out


def runner_environment(job: dict[str, Any]) -> dict[str, str]:
    """What the runner's environment holds: the ConfigMap(s) it references, its own env, and
    DASK_SCHEDULER_ADDRESS from the operator."""
    maps = {m["metadata"]["name"]: m.get("data", {}) for m in documents_of_kind("ConfigMap")}
    c = container(job, "job")
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        if "configMapRef" in source:
            name = source["configMapRef"]["name"]
            assert name in maps, f"the runner references ConfigMap {name!r}, not in the file"
            env.update(maps[name])
    for item in c.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
    env.setdefault("DASK_SCHEDULER_ADDRESS", "tcp://dglmm-fit-scheduler.default.svc:8786")
    return env


def check_with_known_flags(argv: list[str]) -> None:
    assert argv and argv[0] in KNOWN_COMMANDS, f"unknown dglmm subcommand in {argv}"
    n_positional, value_flags, switches = KNOWN_COMMANDS[argv[0]]
    positional = []
    rest = argv[1:]
    i = 0
    while i < len(rest):
        token = rest[i]
        if token.startswith("--"):
            flag, has_inline_value, _ = token.partition("=")
            if flag in switches and not has_inline_value:
                i += 1
                continue
            assert flag in value_flags, f"dglmm {argv[0]}: unknown flag {flag}"
            if not has_inline_value:
                assert i + 1 < len(rest) and not rest[i + 1].startswith("--"), (
                    f"dglmm {argv[0]}: {flag} needs a value"
                )
                i += 1
        else:
            positional.append(token)
        i += 1
    assert len(positional) == n_positional, (
        f"dglmm {argv[0]} takes {n_positional} positional argument(s), got {positional}"
    )


def get_build_parser():
    try:
        import dglmm.cli as cli
    except ModuleNotFoundError as exc:
        if exc.name in {"dglmm.cli", "dglmm"}:
            return None
        raise
    return getattr(cli, "build_parser", None)


def check_dglmm_argv(argv: list[str]) -> None:
    build_parser = get_build_parser()
    if build_parser is None:
        check_with_known_flags(argv)
        return
    parser = build_parser()
    try:
        parser.parse_args(argv)
    except SystemExit as exc:  # argparse reports errors by exiting
        pytest.fail(f"`dglmm {shlex.join(argv)}` is rejected by the dglmm parser ({exc})")


def walk_containers(job: dict[str, Any]):
    for role, spec in pod_specs(job).items():
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            yield role, c


# ----------------------------------------------------------------------------- the manifest


def test_manifest_documents():
    docs = load_documents()
    kinds = [d.get("kind") for d in docs]
    assert kinds.count("DaskJob") == 1
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name")
    job = the_daskjob()
    assert job["apiVersion"] == "kubernetes.dask.org/v1"
    # A ConfigMap's values must be strings (an unquoted number is rejected by the API server).
    for cm in documents_of_kind("ConfigMap"):
        for key, value in cm.get("data", {}).items():
            assert isinstance(value, str), f"ConfigMap {key} must be a quoted string"


@pytest.mark.parametrize("index", range(len(documents_of_kind("DaskJob"))))
def test_daskjob_matches_crd_schema(index):
    doc = documents_of_kind("DaskJob")[index]
    errors = schema_errors(doc)
    assert not errors, "DaskJob does not match the CRD schema:\n" + "\n".join(errors)


def test_schema_check_catches_mistakes():
    """The validator really rejects what the API server would reject or prune."""
    job = the_daskjob()
    assert not schema_errors(job)

    bad = copy.deepcopy(job)
    container(bad, "worker")["resources"]["limits"]["memory"] = 8  # unquoted quantity
    assert any("resources/limits/memory" in e for e in schema_errors(bad))

    bad = copy.deepcopy(job)
    bad["spec"]["cluster"]["spec"]["worker"]["replica"] = 3  # misspelt field
    assert any("replica" in e for e in schema_errors(bad))

    bad = copy.deepcopy(job)
    del bad["spec"]["job"]
    assert any("job" in e for e in schema_errors(bad))


def test_workers_use_dask_worker_command():
    job = the_daskjob()
    args = container(job, "worker")["args"]
    assert args[:2] == ["dask", "worker"], f"worker args should start with `dask worker`: {args}"
    assert "--name" in args and args[args.index("--name") + 1] == "$(DASK_WORKER_NAME)"
    assert "--dashboard" in args
    assert args[args.index("--dashboard-address") + 1] in {"8788", ":8788"}
    ports = {p["name"]: p["containerPort"] for p in container(job, "worker")["ports"]}
    assert ports.get("http-dashboard") == 8788
    assert container(job, "scheduler")["args"][:2] == ["dask", "scheduler"]
    # The old hyphenated entry points are gone from recent distributed releases.
    text = MANIFEST.read_text()
    assert "dask-worker" not in text and "dask-scheduler" not in text
    assert isinstance(job["spec"]["cluster"]["spec"]["worker"]["replicas"], int)
    assert job["spec"]["cluster"]["spec"]["worker"]["replicas"] >= 1


def test_resources_are_strings():
    seen = 0
    for role, c in walk_containers(the_daskjob()):
        resources = c.get("resources", {})
        assert resources.get("limits"), f"{role} container has no resource limits"
        for kind in ("requests", "limits"):
            for name, value in resources.get(kind, {}).items():
                assert isinstance(value, str), (
                    f"{role} {kind}.{name} = {value!r}: Kubernetes quantities must be quoted"
                )
                seen += 1
    assert seen


def test_job_pod_never_restarts():
    assert pod_specs(the_daskjob())["job"]["restartPolicy"] == "Never"


def test_same_image_everywhere():
    images = {c["image"] for _, c in walk_containers(the_daskjob())}
    assert len(images) == 1, f"job runner, scheduler and workers should share one image: {images}"


def test_scheduler_service():
    job = the_daskjob()
    service = job["spec"]["cluster"]["spec"]["scheduler"]["service"]
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["ports"]}
    assert ports["tcp-comm"] == (8786, "tcp-comm")
    assert ports["http-dashboard"] == (8787, "http-dashboard")
    # The operator names the cluster of a DaskJob after the DaskJob.
    assert service["selector"]["dask.org/cluster-name"] == job["metadata"]["name"]
    assert service["selector"]["dask.org/component"] == "scheduler"
    container_ports = {p["name"]: p["containerPort"] for p in container(job, "scheduler")["ports"]}
    assert container_ports == {"tcp-comm": 8786, "http-dashboard": 8787}


def test_configuration_and_credentials_come_from_envfrom():
    job = the_daskjob()
    config_names = {m["metadata"]["name"] for m in documents_of_kind("ConfigMap")}
    for role in ("job", "worker"):
        sources = container(job, role).get("envFrom", [])
        config_refs = [s["configMapRef"]["name"] for s in sources if "configMapRef" in s]
        secret_refs = [s["secretRef"] for s in sources if "secretRef" in s]
        assert config_refs and set(config_refs) <= config_names, role
        assert secret_refs and all(s.get("optional") is True for s in secret_refs), role


# ----------------------------------------------------------------------------- runner script


def test_runner_script_is_valid_shell():
    if shutil.which("bash") is None:
        pytest.skip("bash not available")
    result = subprocess.run(
        ["bash", "-n"], input=runner_script(the_daskjob()), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_runner_dglmm_commands_are_valid_invocations():
    job = the_daskjob()
    env = runner_environment(job)
    commands = [expand(argv, env) for argv in dglmm_command_lines(runner_script(job))]
    by_name = {argv[0]: argv for argv in commands if argv}
    assert set(by_name) == {"prepare", "fit"}, f"dglmm commands found: {commands}"
    for argv in commands:
        check_dglmm_argv(argv)

    prepare, fit = by_name["prepare"], by_name["fit"]
    assert prepare[1] == env["DGLMM_RAW_URL"] and prepare[2] == env["DGLMM_PREPARED_URL"]
    assert prepare[prepare.index("--group") + 1] == "subscriber"
    assert fit[1] == env["DGLMM_PREPARED_URL"]
    assert fit[fit.index("--family") + 1] == "binomial"
    assert "~" in fit[fit.index("--formula") + 1]
    assert "--resume" in fit
    for flag in ("--output", "--checkpoint"):
        assert re.match(r"^[a-z0-9]+://", fit[fit.index(flag) + 1]), f"{flag} is not a URL"
    assert fit[fit.index("--scheduler") + 1] == env["DASK_SCHEDULER_ADDRESS"]


def test_command_line_checker_rejects_bad_invocations():
    """The fallback checker (used while dglmm.cli.build_parser does not exist) works."""
    check_with_known_flags(["fit", "data", "--formula", "y ~ x", "--resume"])
    check_with_known_flags(["prepare", "raw", "out", "--group=g"])
    for argv in (
        ["fit", "data", "--formla", "y ~ x"],
        ["fit", "data", "--formula"],
        ["fit", "--formula", "y ~ x"],
        ["prepare", "raw", "--group", "g"],
        ["fit", "data", "--group", "g"],
        ["predict", "r.json"],
    ):
        with pytest.raises(AssertionError):
            check_with_known_flags(argv)


def test_runner_script_prepares_once_then_fits(tmp_path):
    """Run the runner's script with a stand-in `dglmm` and a local prepared-data directory."""
    if shutil.which("bash") is None:
        pytest.skip("bash not available")
    pytest.importorskip("fsspec")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    fake = bin_dir / "dglmm"
    fake.write_text(
        textwrap.dedent(
            f"""\
            #!/bin/sh
            echo "$1" >> {shlex.quote(str(calls))}
            if [ "$1" = prepare ]; then
                mkdir -p "$3" && : > "$3/part.0.parquet"
                [ -n "${{FAIL_PREPARE:-}}" ] && exit 1
            fi
            exit 0
            """
        )
    )
    fake.chmod(0o755)
    prepared = tmp_path / "prepared"
    job = the_daskjob()
    env = {
        **os.environ,
        **runner_environment(job),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "DGLMM_PREPARED_URL": str(prepared),
        "DASK_SCHEDULER_ADDRESS": "tcp://127.0.0.1:8786",
    }
    script = runner_script(job)

    def run(**extra):
        return subprocess.run(
            ["bash", "-c", script], env={**env, **extra}, capture_output=True, text=True
        )

    def called():
        return calls.read_text().split() if calls.exists() else []

    # An interrupted prepare fails the job and leaves no completion marker ...
    assert run(FAIL_PREPARE="1").returncode != 0
    assert called() == ["prepare"]
    # ... so the next run redoes it from scratch, then fits.
    result = run()
    assert result.returncode == 0, result.stderr
    assert called() == ["prepare", "prepare", "fit"]
    # Prepared data complete: straight to the fit.
    result = run()
    assert result.returncode == 0, result.stderr
    assert called() == ["prepare", "prepare", "fit", "fit"]
    # Without the operator's scheduler address the script refuses to start.
    no_scheduler = {k: v for k, v in env.items() if k != "DASK_SCHEDULER_ADDRESS"}
    result = subprocess.run(["bash", "-c", script], env=no_scheduler, capture_output=True)
    assert result.returncode != 0
    assert called() == ["prepare", "prepare", "fit", "fit"]


# ----------------------------------------------------------------------------- local cluster


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@pytest.mark.cluster
def test_local_cluster_start_connect_stop(tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("bash not available")
    distributed = pytest.importorskip("distributed")
    state = tmp_path / "state"
    port = free_port()
    env = {
        **os.environ,
        "DGLMM_LOCAL_CLUSTER_DIR": str(state),
        "DGLMM_LOCAL_CLUSTER_PORT": str(port),
        "DGLMM_LOCAL_CLUSTER_DASHBOARD": "127.0.0.1:0",
        "DGLMM_LOCAL_CLUSTER_TIMEOUT": "60",
        "PYTHON": sys.executable,
    }

    def script(*args, timeout=150):
        return subprocess.run(
            ["bash", str(LOCAL_CLUSTER), *args],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    pids: list[int] = []
    try:
        started = script("start", "2")
        assert started.returncode == 0, started.stdout + started.stderr
        address = f"tcp://127.0.0.1:{port}"
        scheduler_file = state / "scheduler.json"
        assert f"scheduler: {address}" in started.stdout
        assert f"scheduler-file: {scheduler_file}" in started.stdout
        assert scheduler_file.exists()
        pids = [int(p.read_text()) for p in sorted(state.glob("*.pid"))]
        assert len(pids) == 3 and all(pid_alive(p) for p in pids)

        with distributed.Client(address, timeout="30s") as client:
            workers = client.scheduler_info(n_workers=-1)["workers"]
            assert len(workers) == 2
            assert all(w["host"] == "127.0.0.1" for w in workers.values())
            assert all(w["nthreads"] == 1 for w in workers.values())
            assert client.submit(sum, [1, 2, 3]).result(timeout=30) == 6
        with distributed.Client(scheduler_file=str(scheduler_file), timeout="30s") as client:
            assert client.scheduler.address == address

        status = script("status")
        assert status.returncode == 0 and "workers: 2" in status.stdout, status.stdout

        again = script("start", "2")
        assert again.returncode != 0 and "already running" in again.stderr
    finally:
        stopped = script("stop")
        for pid in pids:  # never leave processes behind, whatever failed above
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert stopped.returncode == 0, stopped.stderr
    assert not any(pid_alive(p) for p in pids)
    assert not list(state.glob("*.pid")) and not (state / "scheduler.json").exists()
    assert script("status").returncode == 3
