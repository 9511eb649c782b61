"""Static checks of the docker deployment (no Docker engine here): compose files parse, services and
variables are right, every SuperLink/SuperNode command line is accepted by the installed Flower's own
argument parsers, the Dockerfile copies files that exist, and the certificate script produces valid certs."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


def _load(name):
    return yaml.safe_load((DOCKER / name).read_text())


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "command":
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _services(*files):
    doc = {}
    for f in files:
        doc = _merge(doc, _load(f))
    return doc["services"]


def _superlink_parser():
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
    return _parse_args_run_superlink()


def _supernode_parser():
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode
    return _parse_args_run_supernode()


@pytest.mark.parametrize("files", [("compose.yaml",), ("compose.yaml", "compose.tls.yaml"),
                                   ("compose.yaml", "compose.gpu.yaml")])
def test_compose_commands_parse_with_flowers_own_parsers(files):
    svc = _services(*files)
    assert {"superlink", "supernode", "submit"} <= set(svc)
    sl = svc["superlink"]["command"]
    sn = svc["supernode"]["command"]
    assert sl[0] == "flower-superlink" and sn[0] == "flower-supernode"
    a = _superlink_parser().parse_args(sl[1:])  # raises SystemExit on any flag this Flower does not know
    b = _supernode_parser().parse_args(sn[1:])
    assert a.isolation == "subprocess" and b.isolation == "subprocess"
    # ports consistent: the SuperNodes and flwr talk to the SuperLink's one HTTP port
    port = int(a.port)
    assert b.superlink == f"superlink:{port}"
    assert f"superlink:{port}" in "\n".join(svc["submit"]["command"])
    assert any(p.endswith(f":{port}") for p in _services("compose.yaml")["superlink"]["ports"])
    tls = "compose.tls.yaml" in files
    assert (a.insecure, b.insecure) == (not tls, not tls)
    if tls:
        assert a.ssl_certfile and a.ssl_keyfile and a.ssl_ca_certfile and b.root_certificates
        assert "--insecure" not in " ".join(sl + sn)
    assert a.disable_runtime_dependency_installation if hasattr(a, "disable_runtime_dependency_installation") \
        else "--disable-runtime-dependency-installation" in sl


def test_number_of_supernodes_is_one_variable():
    sn = _services("compose.yaml")["supernode"]
    assert str(sn["deploy"]["replicas"]) == "${NUM_SUPERNODES:-2}"
    assert "num-clients=${NUM_SUPERNODES:-2}" in "\n".join(_services("compose.yaml")["submit"]["command"])
    assert "--node-config" not in " ".join(sn["command"])  # partitions are assigned by the server


def test_gpu_override_reserves_a_gpu_for_the_server():
    sl = _services("compose.yaml", "compose.gpu.yaml")["superlink"]
    devices = sl["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_submit_uses_a_valid_run_config():
    from fedmerge.common.task import FedConfig
    cmd = "\n".join(_services("compose.yaml")["submit"]["command"])
    m = re.search(r'--run-config \\\s*"([^"]+)"', cmd)
    assert m, cmd
    pairs = dict(kv.split("=", 1) for kv in m.group(1).split())
    # with the defaults filled in, the keys and values are accepted by the app's run-config reader
    filled = {k: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", v).strip("'") for k, v in pairs.items()}
    FedConfig.from_run_config(filled)
    assert "flwr run /app docker" in cmd


def test_dockerfile_copies_existing_files_and_installs_the_cli():
    text = (DOCKER / "Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY"):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src
    assert "pip install ." in text and "torch==2.14.1" in text
    import shutil as sh
    for binary in ("flower-superlink", "flower-supernode", "flwr"):
        assert sh.which(binary) or (Path(__import__("sys").executable).parent / binary).exists()
    ignore = (ROOT / ".dockerignore").read_text()
    assert ".venv" in ignore and "docker/certs" in ignore


@pytest.mark.skipif(shutil.which("openssl") is None or shutil.which("ssh-keygen") is None,
                    reason="openssl/ssh-keygen missing")
def test_gen_certs_script(tmp_path):
    out = tmp_path / "certs"
    for _ in range(2):  # idempotent
        p = subprocess.run(["bash", str(ROOT / "scripts" / "gen_certs.sh"), str(out), "3"], capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 0, p.stderr
    v = subprocess.run(["openssl", "verify", "-CAfile", str(out / "ca.crt"), str(out / "server.pem")],
                       capture_output=True, text=True)
    assert v.returncode == 0 and "OK" in v.stdout
    san = subprocess.run(["openssl", "x509", "-in", str(out / "server.pem"), "-noout", "-ext", "subjectAltName"],
                         capture_output=True, text=True).stdout
    assert "DNS:superlink" in san and "127.0.0.1" in san
    for i in range(3):
        assert (out / f"supernode_{i}").exists() and (out / f"supernode_{i}.pub").read_text().startswith("ecdsa")
    gitignore = (ROOT / ".gitignore").read_text()
    assert "docker/certs/" in gitignore
