"""Static checks of the Docker deployment (docker/, scripts/gen_certs.sh); no Docker engine is needed.

The compose files are parsed, merged with each override the way Compose merges them, and interpolated with
Compose's ``${VAR:-default}`` rules; then every SuperLink/SuperNode command line is parsed by the installed
Flower's own argument parsers, the submit script is executed with a stand-in ``flwr`` whose arguments go through
Flower's ``flwr run`` command and whose run config goes through Flower's parser and fedmerge's reader, and the
connection file it writes is read back by Flower's config reader. The Dockerfile's sources and binaries are
checked, and the certificate script is run."""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
BASE = ("compose.yaml",)
TLS = ("compose.yaml", "compose.tls.yaml")
GPU = ("compose.yaml", "compose.gpu.yaml")
ALL = ("compose.yaml", "compose.gpu.yaml", "compose.tls.yaml")
AUTH = ("compose.yaml", "compose.tls.yaml", "compose.auth.yaml")
COMBOS = [BASE, TLS, GPU, ALL, AUTH]
SERVICES = {"superlink", "supernode", "submit"}


# --- Compose semantics (the parts these files use) ------------------------------------------------------------
def _target(vol) -> str:
    if isinstance(vol, dict):
        return vol["target"]
    parts = vol.split(":")
    return parts[1] if len(parts) > 1 else parts[0]


def _merge(base, over, key=None):
    """Compose's merge of override files: mappings merge recursively; command/entrypoint are replaced;
    volumes merge by container path; group_add/ports append; other sequences are replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(out[k], v, k) if k in out else copy.deepcopy(v)
        return out
    if key == "volumes" and isinstance(base, list) and isinstance(over, list):
        merged = {_target(v): v for v in base}
        merged.update({_target(v): v for v in over})
        return list(merged.values())
    if key in ("group_add", "ports") and isinstance(base, list) and isinstance(over, list):
        return base + [v for v in over if v not in base]
    return copy.deepcopy(over)


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def _interpolate(node, env: dict[str, str]):
    """Compose interpolation: ${VAR}, ${VAR:-default}; $$ is a literal $ (left for the container's shell)."""
    if isinstance(node, dict):
        return {k: _interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, env) for v in node]
    if isinstance(node, str):
        return _VAR.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1)) or (m.group(2) or ""), node)
    return node


def _raw(*files) -> dict:
    doc: dict = {}
    for f in files:
        doc = _merge(doc, yaml.safe_load((DOCKER / f).read_text()))
    return doc


def _services(*files, env: dict[str, str] | None = None) -> dict:
    return _interpolate(_raw(*files), env or {})["services"]


def _superlink_parser():
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
    return _parse_args_run_superlink()


def _supernode_parser():
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode
    return _parse_args_run_supernode()


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# --- compose files --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("files", COMBOS, ids="+".join)
def test_compose_commands_parse_with_flowers_own_parsers(files):
    svc = _services(*files)
    assert SERVICES <= set(svc)
    sl, sn = svc["superlink"]["command"], svc["supernode"]["command"]
    assert sl[0] == "flower-superlink" and sn[0] == "flower-supernode"
    a = _superlink_parser().parse_args(sl[1:])  # SystemExit on any flag or value this Flower does not accept
    b = _supernode_parser().parse_args(sn[1:])
    # the SuperLink launches the ServerApp, the SuperNodes the ClientApp, each in a subprocess
    assert a.isolation == "subprocess" and b.isolation == "subprocess"
    # nothing is installed at run time
    assert "--disable-runtime-dependency-installation" in sl
    assert a.runtime_dependency_install is False and b.runtime_dependency_install is False
    # one variable scales the federation: partitions come from the server, not from --node-config
    assert b.node_config is None
    # ports agree: SuperNodes, submit, the published port and the health check all use the SuperLink's port
    port = int(a.port)
    assert a.host == "0.0.0.0"
    assert b.superlink == f"superlink:{port}"
    assert f'address = "superlink:{port}"' in svc["submit"]["command"][-1]
    assert [p.split(":")[-1] for p in svc["superlink"]["ports"]] == [str(port)]
    # published on the host's loopback unless SUPERLINK_BIND says otherwise
    assert [p.split(":")[0] for p in svc["superlink"]["ports"]] == ["127.0.0.1"]
    assert f"('127.0.0.1', {port})" in " ".join(svc["superlink"]["healthcheck"]["test"])
    tls = "compose.tls.yaml" in files
    assert (a.insecure, b.insecure) == (not tls, not tls)
    if tls:
        assert a.ssl_certfile and a.ssl_keyfile and a.ssl_ca_certfile and b.root_certificates
        for name in SERVICES:
            assert "--insecure" not in " ".join(map(str, svc[name]["command"])), name
    # every service waits for a healthy SuperLink
    assert svc["supernode"]["depends_on"]["superlink"]["condition"] == "service_healthy"
    assert svc["submit"]["depends_on"]["superlink"]["condition"] == "service_healthy"
    assert svc["submit"]["restart"] == "no"


@pytest.mark.parametrize("files", COMBOS, ids="+".join)
def test_one_image_built_once_and_shared(files):
    svc = _services(*files)
    assert [n for n in SERVICES if "build" in svc[n]] == ["superlink"]
    build = svc["superlink"]["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    assert len({svc[n]["image"] for n in SERVICES}) == 1
    for n in SERVICES - {"superlink"}:
        assert svc[n]["pull_policy"] == "never"  # never pulled from a registry: built by the superlink service
        assert "container_name" not in svc[n]
    assert svc["supernode"]["environment"]["FEDMERGE_DATA"] == "/data"
    assert any(_target(v) == "/data" and str(v).endswith(":ro") for v in svc["supernode"]["volumes"])
    assert "runs:/app/runs" in svc["superlink"]["volumes"] and "runs" in _raw(*files)["volumes"]


def test_base_image_is_a_build_argument_with_the_dockerfiles_default():
    for files in COMBOS:
        assert _services(*files)["superlink"]["build"]["args"]["BASE_IMAGE"] == "python:3.11-slim"
    args = _services(*BASE, env={"BASE_IMAGE": "localhost/fedmerge-base:bookworm"})["superlink"]["build"]["args"]
    assert args["BASE_IMAGE"] == "localhost/fedmerge-base:bookworm"


def test_number_of_supernodes_is_one_variable():
    raw = _raw(*BASE)["services"]
    assert str(raw["supernode"]["deploy"]["replicas"]) == "${NUM_SUPERNODES:-2}"
    # Compose's default mode, spelled out: podman-compose creates the replicas only when it is
    assert raw["supernode"]["deploy"]["mode"] == "replicated"
    assert "num-clients=${NUM_SUPERNODES:-2}" in raw["submit"]["command"][-1]
    for files in COMBOS:  # the overrides keep it (authenticated nodes are services of their own: one per key)
        if files != AUTH:
            assert _services(*files, env={"NUM_SUPERNODES": "5"})["supernode"]["deploy"]["replicas"] == "5"
    auth = _services(*AUTH)
    assert len([n for n in auth if n.startswith("supernode-")]) == 2 and "num-clients=2" in auth["submit"]["command"][-1]
    assert _services(*BASE)["supernode"]["deploy"]["replicas"] == "2"


def test_gpu_override_reserves_a_gpu_for_the_server():
    svc = _services(*GPU)
    dev = svc["superlink"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"] and dev["count"] == 1
    assert "cu" in svc["superlink"]["build"]["args"]["TORCH_INDEX_URL"].rsplit("/", 1)[-1]
    assert svc["superlink"]["image"] != _services(*BASE)["superlink"]["image"]  # does not replace the CPU image
    assert "/whl/cpu" in _services(*BASE)["superlink"]["build"]["args"]["TORCH_INDEX_URL"]


def test_tls_override_mounts_exactly_the_generated_files():
    svc = _services(*TLS)
    a = _superlink_parser().parse_args(svc["superlink"]["command"][1:])
    b = _supernode_parser().parse_args(svc["supernode"]["command"][1:])

    def mounts(name):
        return {v["target"]: v for v in svc[name]["volumes"] if isinstance(v, dict)}

    sl = mounts("superlink")
    for path in (a.ssl_ca_certfile, a.ssl_certfile, a.ssl_keyfile):
        m = sl[path]
        assert m["type"] == "bind" and m["read_only"] is True
        assert m["source"] == f"./certs/{Path(path).name}"  # the names gen_certs.sh writes
    assert {Path(p).name for p in (a.ssl_ca_certfile, a.ssl_certfile, a.ssl_keyfile)} == \
        {"ca.crt", "server.pem", "server.key"}
    assert mounts("supernode")[b.root_certificates]["source"] == "./certs/ca.crt"
    assert 'root-certificates = "/certs/ca.crt"' == svc["submit"]["environment"]["FLWR_CONNECTION_SECURITY"]
    assert "/certs/ca.crt" in mounts("submit")
    every = [v for n in SERVICES for v in svc[n].get("volumes", [])]
    assert not any("ca.key" in str(v) for v in every)  # the CA's key never enters a container
    assert svc["superlink"]["group_add"] == ["10001"]
    assert _services(*TLS, env={"CERTS_GID": "1234"})["superlink"]["group_add"] == ["1234"]


def test_published_port_is_loopback_unless_asked():
    svc = _services(*BASE, env={"SUPERLINK_BIND": "0.0.0.0", "SUPERLINK_PORT": "9001"})
    assert svc["superlink"]["ports"] == ["0.0.0.0:9001:8000"]
    assert "whoever reaches the SuperLink" in (DOCKER / "compose.yaml").read_text()


def test_auth_override_admits_only_registered_supernodes():
    svc = _services(*AUTH, env={"CERTS_GID": "1234"})
    a = _superlink_parser().parse_args(svc["superlink"]["command"][1:])
    assert a.enable_supernode_auth is True and a.ssl_certfile and not a.insecure
    assert svc["supernode"]["deploy"]["replicas"] == 0  # anonymous replicas are off
    nodes = sorted(n for n in svc if n.startswith("supernode-"))
    assert nodes == ["supernode-0", "supernode-1"]
    for i, name in enumerate(nodes):
        b = _supernode_parser().parse_args(svc[name]["command"][1:])
        assert b.auth_supernode_private_key == f"/keys/supernode_{i}" and b.root_certificates == "/certs/ca.crt"
        mounts = {v["target"]: v for v in svc[name]["volumes"] if isinstance(v, dict)}
        assert mounts[b.auth_supernode_private_key]["source"] == f"./certs/supernode_{i}"  # gen_certs.sh's names
        assert all(m["read_only"] for m in mounts.values()) and svc[name]["group_add"] == ["1234"]
        assert svc[name]["depends_on"]["register"]["condition"] == "service_completed_successfully"
    reg = svc["register"]
    script = reg["command"][-1]
    assert "flwr supernode register" in script and "/keys/supernode_*.pub" in script
    assert 'root-certificates = \\"/certs/ca.crt\\"' in script or 'root-certificates = "/certs/ca.crt"' in script
    assert reg["depends_on"]["superlink"]["condition"] == "service_healthy" and reg["restart"] == "no"
    assert set(svc["submit"]["depends_on"]) >= {"supernode-0", "supernode-1"}
    every = [v for n in svc for v in svc[n].get("volumes", [])]
    assert not any("ca.key" in str(v) for v in every)


# --- the submit service, executed with a stand-in flwr --------------------------------------------------------
def _run_submit(tmp_path: Path, files, env: dict[str, str]):
    svc = _services(*files, env=env)["submit"]
    cmd = svc["command"]
    assert cmd[:2] == ["sh", "-ec"], cmd
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    argv_file = tmp_path / "argv.json"
    stub = bin_dir / "flwr"
    stub.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"open({str(argv_file)!r}, 'w').write(json.dumps(sys.argv[1:]))\n")
    stub.chmod(0o755)
    home = tmp_path / "flwr_home"
    run_env = {**os.environ, **{k: str(v) for k, v in svc["environment"].items()},
               "FLWR_HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    p = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return json.loads(argv_file.read_text()), home


@pytest.mark.skipif(shutil.which("sh") is None, reason="no sh")
@pytest.mark.parametrize("files", [BASE, TLS], ids="+".join)
def test_submit_runs_flwr_run_with_a_valid_connection_and_run_config(tmp_path, files, monkeypatch):
    import typer
    from flwr.cli.app import app as flwr_cli
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.common.config import parse_config_args

    from fedmerge.common.task.config import FedConfig

    env = {"NUM_SUPERNODES": "3", "METHOD": "avg", "SPLIT": "80/20", "ARCH": "resnet20", "EPOCHS": "2"}
    argv, home = _run_submit(tmp_path, files, env)

    # the arguments are accepted by Flower's own `flwr run` command (parsed, not executed)
    run_cmd = typer.main.get_command(flwr_cli).commands["run"]
    params = run_cmd.make_context("run", argv[1:]).params
    assert argv[0] == "run" and str(params["app"]) == "/app" and params["superlink"] == "docker"
    assert params["stream"] is True

    # the run config parses with Flower's parser, overrides only keys the app declares, and fedmerge accepts it
    overrides = parse_config_args(params["run_config_overrides"])
    declared = _pyproject()["tool"]["flwr"]["app"]["config"]
    assert set(overrides) <= set(declared), set(overrides) - set(declared)
    cfg = FedConfig.from_run_config({**declared, **overrides})
    assert (cfg.num_clients, cfg.method, cfg.split, cfg.arch, cfg.epochs) == (3, "avg", "80/20", "resnet20", 2)
    assert cfg.out == "/app/runs/docker"

    # the connection file is read by Flower's config reader
    monkeypatch.setenv("FLWR_HOME", str(home))
    conn = read_superlink_connection("docker")
    assert conn.address == "superlink:8000"
    if "compose.tls.yaml" in files:
        assert conn.root_certificates == "/certs/ca.crt" and not conn.insecure
    else:
        assert conn.insecure and not conn.root_certificates


def test_app_components_declared_for_flwr_run():
    comps = _pyproject()["tool"]["flwr"]["app"]["components"]
    assert comps == {"serverapp": "fedmerge.server.app:app", "clientapp": "fedmerge.client.app:app"}


# --- Dockerfile -----------------------------------------------------------------------------------------------
def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DOCKER / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)  # join continuation lines
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_copies_existing_files_and_installs_the_package():
    ins = _dockerfile_instructions()
    copied = []
    for word, rest in ins:
        if word == "COPY":
            args = [a for a in rest.split() if not a.startswith("--")]
            for src in args[:-1]:
                assert (ROOT / src).exists(), src
                copied.append(src.rstrip("/"))
    # every package folder of the pyproject's package-dir mapping (a nested one inside its top folder), and
    # pyproject/README, are in the image
    package_dirs = {d.split("/")[0] for d in _pyproject()["tool"]["setuptools"]["package-dir"].values()}
    assert package_dirs | {"pyproject.toml", "README.md"} <= set(copied)
    runs = " ".join(rest for word, rest in ins if word == "RUN")
    assert "pip install --no-deps ." in runs
    assert '"torch==2.14.1" "torchvision==0.29.1"' in runs
    args = dict(rest.split("=", 1) for word, rest in ins if word == "ARG")
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    # the base image is a build argument declared before FROM, defaulting to the official slim Python image
    assert ins[0] == ("ARG", "BASE_IMAGE=python:3.11-slim") and ins[1] == ("FROM", "${BASE_IMAGE}")
    assert [w for w, _ in ins].count("FROM") == 1
    assert '--index-url "${TORCH_INDEX_URL}"' in runs
    assert ("USER", "flwr") in ins


def test_dockerfile_dependency_extraction_reads_the_real_pyproject(tmp_path):
    runs = " ".join(rest for word, rest in _dockerfile_instructions() if word == "RUN")
    snippet = re.search(r'python -c "(import tomllib;[^"]+)"', runs).group(1)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    out = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:-1] == _pyproject()["project"]["dependencies"]


def test_binaries_used_by_the_image_are_installed_by_the_project():
    """CMD and every compose command start a console script of Flower, a dependency of the project."""
    deps = " ".join(_pyproject()["project"]["dependencies"])
    assert re.search(r"\bflwr(\[[^\]]*\])?>=1\.41", deps)
    scripts = {ep.name for ep in metadata.distribution("flwr").entry_points if ep.group == "console_scripts"}
    cmd = next(rest for word, rest in _dockerfile_instructions() if word == "CMD")
    used = {json.loads(cmd)[0]}
    for files in COMBOS:
        svc = _services(*files)
        used |= {svc["superlink"]["command"][0], svc["supernode"]["command"][0]}
        used |= set(re.findall(r"\bexec (\S+)", svc["submit"]["command"][-1]))
    assert used == {"flower-superlink", "flower-supernode", "flwr"}
    assert used <= scripts
    for name in used:  # and they are on this machine too
        assert shutil.which(name) or (Path(sys.executable).parent / name).exists(), name
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignore and "docker/certs" in ignore


# --- certificate script ---------------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl missing")
def test_gen_certs_script(tmp_path):
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key

    script = ROOT / "scripts" / "gen_certs.sh"
    out = tmp_path / "certs"

    def gen(n, **env):
        p = subprocess.run(["bash", str(script), str(out), str(n)], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHON": sys.executable, "KEY_BITS": "2048", **env})
        assert p.returncode == 0, p.stderr
        return p

    gen(2, GEN_CERTS_NO_SSH_KEYGEN="" if shutil.which("ssh-keygen") else "1")
    first = {f.name: f.read_bytes() for f in out.iterdir()}
    gen(3, GEN_CERTS_NO_SSH_KEYGEN="1")  # idempotent, and the key pair path without ssh-keygen
    again = {f.name: f.read_bytes() for f in out.iterdir()}
    assert all(again[name] == data for name, data in first.items())  # nothing regenerated
    assert set(again) - set(first) == {"supernode_2", "supernode_2.pub"}

    v = subprocess.run(["openssl", "verify", "-CAfile", str(out / "ca.crt"), str(out / "server.pem")],
                       capture_output=True, text=True)
    assert v.returncode == 0 and "OK" in v.stdout
    san = subprocess.run(["openssl", "x509", "-in", str(out / "server.pem"), "-noout", "-text"],
                         capture_output=True, text=True).stdout
    assert "DNS:superlink" in san and "DNS:localhost" in san and "IP Address:127.0.0.1" in san
    mode = {name: stat.S_IMODE((out / name).stat().st_mode) for name in again}
    assert mode["ca.key"] == 0o600 and mode["server.key"] == 0o640 and mode["supernode_0"] == 0o640
    for i in range(3):  # SuperNode keys load the way flower-supernode and `flwr supernode register` load them
        key = load_ssh_private_key((out / f"supernode_{i}").read_bytes(), None)
        assert key.curve.name == "secp384r1"
        assert try_load_public_key(out / f"supernode_{i}.pub")
    assert "docker/certs/" in (ROOT / ".gitignore").read_text().split()
