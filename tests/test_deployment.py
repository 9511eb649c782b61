"""The docker-compose topology, natively: a SuperLink and two SuperNodes as processes on 127.0.0.1, the app
submitted with ``flwr run``, one CCA round end to end. Insecure, and TLS with SuperNode authentication."""
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RUN_CONFIG = ("arch='cnn' width=0.25 epochs=1 max-train=256 probe-size=120 max-test=200 split='iid' "
              "method='cca'")

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_certs(d: Path) -> dict:
    """A CA, a SuperLink certificate for 127.0.0.1/localhost signed by it, and two SuperNode key pairs."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmerge test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "superlink")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.DNSName("superlink"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    d.mkdir(parents=True, exist_ok=True)
    files = {"ca": d / "ca.crt", "cert": d / "server.pem", "key": d / "server.key"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                               serialization.NoEncryption()))
    for i in range(3):
        k = ec.generate_private_key(ec.SECP384R1())
        files[f"node{i}"] = d / f"node{i}"
        files[f"node{i}"].write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                      serialization.NoEncryption()))
        files[f"node{i}.pub"] = d / f"node{i}.pub"
        files[f"node{i}.pub"].write_bytes(k.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                      serialization.PublicFormat.OpenSSH))
    return files


class Topology:
    def __init__(self, tmp: Path, tls: bool):
        self.tmp, self.tls = tmp, tls
        self.procs: list[subprocess.Popen] = []
        self.port = _free_port()
        self.env = {**os.environ, "FLWR_HOME": str(tmp / "flwr_home"), "OMP_NUM_THREADS": "1",
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "FEDMERGE_DATA": os.pathsep.join(filter(None, [str(ROOT / "common" / "embedded"),
                                                                   os.environ.get("FEDMERGE_DATA", "")]))}
        (tmp / "flwr_home").mkdir(parents=True)
        self.certs = _make_certs(tmp / "certs") if tls else {}
        conn = f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{self.port}"\n'
        conn += f'root-certificates = "{self.certs["ca"]}"\n' if tls else "insecure = true\n"
        (tmp / "flwr_home" / "config.toml").write_text(conn)

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "w")
        p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.tmp,
                             start_new_session=True)
        self.procs.append(p)
        return p

    def superlink(self) -> None:
        args = [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
                "--database", str(self.tmp / "state.db"), "--disable-runtime-dependency-installation"]
        if self.tls:
            args += ["--ssl-ca-certfile", str(self.certs["ca"]), "--ssl-certfile", str(self.certs["cert"]),
                     "--ssl-keyfile", str(self.certs["key"]), "--enable-supernode-auth"]
        else:
            args += ["--insecure"]
        self.start("superlink", args)
        deadline = time.time() + 60
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.5)
        raise AssertionError("superlink did not open its port:\n" + self.log("superlink"))

    def supernode(self, i: int, node_config: bool) -> None:
        args = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}", "--port", str(_free_port())]
        if node_config:
            args += ["--node-config", f"partition-id={min(i, 1)} num-partitions=2"]
        if self.tls:
            args += ["--root-certificates", str(self.certs["ca"]),
                     "--auth-supernode-private-key", str(self.certs[f"node{i}"]),
                     "--auth-supernode-public-key", str(self.certs[f"node{i}.pub"])]
        else:
            args += ["--insecure"]
        self.start(f"supernode{i}", args)

    def flwr(self, *args, timeout=240) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], capture_output=True, text=True, env=self.env, cwd=ROOT,
                              timeout=timeout)

    def log(self, name: str) -> str:
        p = self.tmp / f"{name}.log"
        return p.read_text()[-4000:] if p.exists() else ""

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def _run_round(topo: Topology, out: Path, clients: int = 2, timeout: float = 240) -> dict:
    p = topo.flwr("run", ".", "test", "--stream", "--run-config",
                  f"{RUN_CONFIG} num-clients={clients} min-clients={clients} out='{out}'", timeout=timeout)
    logs = "\n".join(f"== {n}\n{topo.log(n)}" for n in ["superlink"] + [f"supernode{i}" for i in range(clients)])
    assert (out / "result.json").exists(), f"flwr run: {p.stdout[-3000:]}\n{p.stderr[-3000:]}\n{logs}"
    return json.loads((out / "result.json").read_text())


def test_native_deployment_insecure_server_assigns_partitions(tmp_path):
    topo = Topology(tmp_path, tls=False)
    try:
        topo.superlink()
        for i in range(2):
            topo.supernode(i, node_config=False)  # as in compose: replicas without per-node config
        result = _run_round(topo, tmp_path / "out")
    finally:
        topo.stop()
    assert result["method"] == "cca" and result["clients_merged"] == [0, 1] and not result["partial"]
    assert result["accuracy"]["merged"] is not None and result["clients_rejected"] == []


def test_native_deployment_eight_supernodes(tmp_path):
    """The compose topology at NUM_SUPERNODES=8: eight SuperNode processes on 127.0.0.1 without --node-config
    (the server assigns the partitions), one CCA round, every client merged. Memory per SuperNode at this and
    other sizes: ``python -m benchmarks.scale --deployment N`` (docker/README.md)."""
    n = 8
    topo = Topology(tmp_path, tls=False)
    try:
        topo.superlink()
        for i in range(n):
            topo.supernode(i, node_config=False)
        result = _run_round(topo, tmp_path / "out", clients=n, timeout=900)
    finally:
        topo.stop()
    assert result["clients_merged"] == list(range(n)) and result["clients_rejected"] == []
    assert result["accuracy"]["merged"] is not None and not result["partial"]
    assert len(result["rounds"][0]["merge_info"]["gamma_scores"]) == 6


def test_native_deployment_tls_with_supernode_auth(tmp_path):
    topo = Topology(tmp_path, tls=True)
    try:
        topo.superlink()
        for i in range(2):
            reg = topo.flwr("supernode", "register", str(topo.certs[f"node{i}.pub"]), "test", timeout=60)
            assert reg.returncode == 0, reg.stdout + reg.stderr
        for i in range(2):
            topo.supernode(i, node_config=True)
        topo.supernode(2, node_config=True)  # a third SuperNode whose key was never registered
        result = _run_round(topo, tmp_path / "out")
        listed = topo.flwr("supernode", "list", "test", "--format", "json", timeout=60)
    finally:
        topo.stop()
    assert result["clients_merged"] == [0, 1] and result["accuracy"]["merged"] is not None
    assert len(result["rounds"][0]["client_metrics"]) == 2  # the unregistered node never took part
    # ... because the SuperLink refused it, not because it was slow: the refusal is in both logs
    unregistered_key = (topo.certs["node2.pub"]).read_text().split()[1]
    superlink_log = (tmp_path / "superlink.log").read_text()
    assert "activate-node" in superlink_log and "No SuperNode found with the given public key" in superlink_log
    assert "Failed to activate SuperNode" in (tmp_path / "supernode2.log").read_text()
    # and the federation's node list holds the two registered nodes only
    assert listed.returncode == 0, listed.stdout + listed.stderr
    nodes = _node_entries(json.loads(listed.stdout))
    assert len(nodes) == 2 and unregistered_key not in listed.stdout, listed.stdout


def _node_entries(payload) -> list:
    """The SuperNode entries of ``flwr supernode list --format json`` (a list under the first list-valued key)."""
    if isinstance(payload, list):
        return payload
    for v in payload.values():
        if isinstance(v, list):
            return v
    raise AssertionError(f"no node list in {payload}")
