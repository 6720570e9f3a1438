"""Start Flower's deployment processes for thinwire (Flower 1.41): a SuperLink on the server and
one SuperNode per data owner; docs/flower.md walks through two machines with TLS and node auth.

- `serve_superlink(...)` / `serve_supernode(...)` run `flower-superlink` / `flower-supernode` in
  the foreground with the right flags and return its exit status (the `thinwire superlink` and
  `thinwire supernode` subcommands).
- `start_superlink(...)` / `start_supernode(...)` start them in the background in their own
  process group and return the `Popen`; `stop(*procs)` ends those groups by the processes' PIDs.
- `make_certificates(...)` writes a private CA and a server certificate (TLS);
  `make_node_key(...)` writes a SuperNode's EC key pair (OpenSSH format) for node authentication;
  `register_supernode(...)` registers its public key with the SuperLink (`flwr supernode register`);
  `write_connection(...)` names a SuperLink in `$FLWR_HOME/config.toml` for the `flwr` CLI;
  `submit(...)` runs `flwr run` with a thinwire run config.

In Flower 1.41 one HTTP(S) port of the SuperLink (default 8000) serves the Fleet API (SuperNodes),
the Control API (`flwr run`, `flwr supernode register`) and the Runtime API (its ServerApp). Each
SuperNode serves a Runtime API for its ClientApps on a local port (default 9094; give every
SuperNode on one machine its own). Every process gets telemetry and update checks off, and the
SuperLink runtime dependency installation off (`uv sync` of the app's dependencies: thinwire
must already be installed, at the same version, on every machine).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thinwire.errors import UsageError

DEFAULT_PORT = 8000
DEFAULT_NODE_PORT = 9094
QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


@dataclass(frozen=True)
class Certificates:
    """PEM files: the CA that signed the server certificate, the certificate and its key."""

    ca: Path
    cert: Path
    key: Path


def executable(name: str) -> str:
    """A Flower console script: beside this Python first (a venv not on PATH), then PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise UsageError(f"{name} not found; install Flower with: pip install 'flwr[simulation]>=1.41,<1.42'")
    return found


def flower_env(flwr_home: Path | str | None = None, **extra: str) -> dict[str, str]:
    """This process's environment plus telemetry/update checks off (and FLWR_HOME when given).

    Flower's processes start helpers (flower-superexec) by name, so this interpreter's bin
    directory goes first on PATH: a venv that was never activated still finds its own tools.
    """
    env = {**os.environ, **QUIET_ENV, **extra}
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    if flwr_home is not None:
        env["FLWR_HOME"] = str(Path(flwr_home).expanduser().resolve())
    return env


# --- commands -------------------------------------------------------------------------------

def superlink_command(*, host: str = "0.0.0.0", port: int = DEFAULT_PORT, certificates: Certificates | None = None,
                      insecure: bool = False, node_auth: bool = False, database: str | None = None,
                      log_file: str | None = None) -> list[str]:
    """`flower-superlink` flags: TLS from `certificates` unless `insecure`; `node_auth` admits only
    SuperNodes whose public key was registered (requires TLS)."""
    command = [executable("flower-superlink"), "--host", host, "--port", str(port),
               "--disable-runtime-dependency-installation"]
    if insecure:
        if node_auth:
            raise UsageError("node authentication needs TLS; pass certificates instead of --insecure")
        command.append("--insecure")
    elif certificates is not None:
        command += ["--ssl-ca-certfile", str(certificates.ca), "--ssl-certfile", str(certificates.cert),
                    "--ssl-keyfile", str(certificates.key)]
    else:
        raise UsageError("the SuperLink needs TLS certificates (--ssl-ca-certfile, --ssl-certfile, "
                         "--ssl-keyfile), or --insecure for a local test")
    if node_auth:
        command.append("--enable-supernode-auth")
    if database:
        command += ["--database", database]
    if log_file:
        command += ["--log-file", log_file]
    return command


def node_config(partition_id: int, num_partitions: int, data_path: str | None = None) -> str:
    """The `--node-config` string: which thinwire client this SuperNode is, and optionally its data file."""
    if not 0 <= partition_id < num_partitions:
        raise UsageError(f"partition-id {partition_id} must lie in [0, {num_partitions})")
    value = f"partition-id={partition_id} num-partitions={num_partitions}"
    if data_path:
        value += f" data-path={json.dumps(str(Path(data_path).expanduser().resolve()))}"
    return value


def supernode_command(superlink: str, partition_id: int, num_partitions: int, *, data_path: str | None = None,
                      root_certificates: str | None = None, insecure: bool = False, auth_key: str | None = None,
                      port: int = DEFAULT_NODE_PORT, max_retries: int | None = None,
                      max_wait_time: float | None = None) -> list[str]:
    """`flower-supernode` flags: connect to `superlink` (HOST:PORT) as thinwire client `partition_id`.

    TLS is on unless `insecure`; `root_certificates` is the CA that signed the SuperLink's
    certificate (omit it for a publicly trusted one). `auth_key` is this node's private key
    (node authentication). `port` is the node's local Runtime API port for its ClientApps.
    """
    command = [executable("flower-supernode"), "--superlink", superlink,
               "--node-config", node_config(partition_id, num_partitions, data_path), "--port", str(port)]
    if insecure:
        if auth_key:
            raise UsageError("node authentication needs TLS; drop --insecure")
        command.append("--insecure")
    elif root_certificates:
        command += ["--root-certificates", str(root_certificates)]
    if auth_key:
        command += ["--auth-supernode-private-key", str(auth_key)]
    if max_retries is not None:
        command += ["--max-retries", str(max_retries)]
    if max_wait_time is not None:
        command += ["--max-wait-time", str(max_wait_time)]
    return command


# --- foreground (CLI) -----------------------------------------------------------------------

def _foreground(command: list[str], env: dict[str, str]) -> int:
    process = subprocess.Popen(command, env=env)
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        return 130


def serve_superlink(*, host: str = "0.0.0.0", port: int = DEFAULT_PORT, ssl_ca_certfile: str | None = None,
                    ssl_certfile: str | None = None, ssl_keyfile: str | None = None, insecure: bool = False,
                    node_auth: bool = False, database: str | None = None, flwr_home: str | None = None) -> int:
    """Run a SuperLink in the foreground until interrupted; returns its exit status."""
    files = (ssl_ca_certfile, ssl_certfile, ssl_keyfile)
    certificates = None
    if any(files) and not insecure:
        if not all(files):
            raise UsageError("TLS needs all three of --ssl-ca-certfile, --ssl-certfile and --ssl-keyfile")
        for name in files:
            if not Path(name).expanduser().is_file():
                raise UsageError(f"certificate file {name} does not exist")
        certificates = Certificates(*(Path(f).expanduser() for f in files))
    command = superlink_command(host=host, port=port, certificates=certificates, insecure=insecure,
                                node_auth=node_auth, database=database)
    return _foreground(command, flower_env(flwr_home))


def serve_supernode(superlink: str, partition_id: int, num_partitions: int, *, data_path: str | None = None,
                    root_certificates: str | None = None, insecure: bool = False, auth_key: str | None = None,
                    port: int = DEFAULT_NODE_PORT, flwr_home: str | None = None) -> int:
    """Run a SuperNode (one data owner) in the foreground until interrupted; returns its exit status."""
    for name in (data_path, root_certificates, auth_key):
        if name and not Path(name).expanduser().exists():
            raise UsageError(f"file {name} does not exist")
    command = supernode_command(superlink, partition_id, num_partitions, data_path=data_path,
                                root_certificates=root_certificates, insecure=insecure, auth_key=auth_key,
                                port=port)
    return _foreground(command, flower_env(flwr_home))


# --- background (tests, scripts) ------------------------------------------------------------

def _start(command: list[str], env: dict[str, str], log: Path | None, cwd: Path | None) -> subprocess.Popen:
    out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115 - lives with the process
    try:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                start_new_session=True)
    finally:
        if log is not None:
            out.close()


def start_superlink(*, port: int, host: str = "127.0.0.1", flwr_home: Path, log: Path | None = None,
                    cwd: Path | None = None, env: dict[str, str] | None = None, **options: Any) -> subprocess.Popen:
    """A SuperLink in the background (own process group); `options` as for `superlink_command`."""
    command = superlink_command(host=host, port=port, **options)
    return _start(command, flower_env(flwr_home, **(env or {})), log, cwd)


def start_supernode(superlink: str, partition_id: int, num_partitions: int, *, port: int, flwr_home: Path,
                    log: Path | None = None, cwd: Path | None = None, env: dict[str, str] | None = None,
                    **options: Any) -> subprocess.Popen:
    """A SuperNode in the background (own process group); `options` as for `supernode_command`."""
    command = supernode_command(superlink, partition_id, num_partitions, port=port, **options)
    return _start(command, flower_env(flwr_home, **(env or {})), log, cwd)


def stop(*processes: subprocess.Popen, timeout: float = 10.0) -> None:
    """End processes started here (`start_superlink`/`start_supernode`) and everything they spawned
    (each one's process group, addressed by its PID): SIGTERM to all, then SIGKILL what is left."""
    for process in processes:
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:  # children (SuperExec, ServerApp/ClientApp processes) may outlive the leader
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        process.wait()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float = 60.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process {process.pid} exited with status {process.returncode} before "
                               f"listening on {host}:{port}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:g} s")


# --- the flwr CLI ---------------------------------------------------------------------------

def write_connection(name: str, address: str, *, flwr_home: Path | str | None = None,
                     root_certificates: str | None = None, insecure: bool = False, default: bool = True) -> Path:
    """Add (or replace) `[superlink.<name>]` in `$FLWR_HOME/config.toml` for the `flwr` CLI."""
    home = Path(flwr_home).expanduser() if flwr_home else Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
    path = home / "config.toml"
    table: dict[str, Any] = tomllib.loads(path.read_text()) if path.is_file() else {}
    links = table.setdefault("superlink", {})
    entry: dict[str, Any] = {"address": address}
    if insecure:
        entry["insecure"] = True
    if root_certificates:
        entry["root-certificates"] = str(Path(root_certificates).expanduser().resolve())
    links[name] = entry
    if default or "default" not in links:
        links["default"] = name
    home.mkdir(parents=True, exist_ok=True)
    path.write_text(_dump_toml(table))
    return path


def _dump_toml(table: dict[str, Any], prefix: str = "") -> str:
    scalars = [f"{k} = {json.dumps(v)}" for k, v in table.items() if not isinstance(v, dict)]
    lines = ([f"[{prefix}]"] if prefix and scalars else []) + scalars
    for key, value in table.items():
        if isinstance(value, dict):
            lines += ["", _dump_toml(value, f"{prefix}.{key}" if prefix else key)]
    return "\n".join(lines).strip() + "\n"


def register_supernode(public_key: Path | str, connection: str, *, flwr_home: Path | str | None = None) -> str:
    """`flwr supernode register`: admit a SuperNode's public key (node auth); returns the CLI output."""
    result = subprocess.run([executable("flwr"), "supernode", "register", str(public_key), connection],
                            env=flower_env(flwr_home), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"flwr supernode register failed: {result.stdout}{result.stderr}")
    return result.stdout


def submit(app_dir: Path | str, connection: str, run_config: dict[str, Any], *, flwr_home: Path | str | None = None,
           stream: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess:
    """`flwr run APP_DIR CONNECTION --run-config FILE [--stream]` with `run_config` written as TOML
    (keys of `[tool.flwr.app.config]`: config, set, out); with `stream`, returns when the run ends."""
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write("".join(f"{k} = {json.dumps(v)}\n" for k, v in run_config.items()))
    command = [executable("flwr"), "run", str(app_dir), connection, "--run-config", f.name]
    if stream:
        command.append("--stream")
    try:
        return subprocess.run(command, env=flower_env(flwr_home), capture_output=True, text=True, timeout=timeout)
    finally:
        os.unlink(f.name)


# --- keys and certificates ------------------------------------------------------------------

def make_node_key(directory: Path | str, name: str = "supernode") -> tuple[Path, Path]:
    """An EC (NIST P-384) key pair in OpenSSH format, as `flower-supernode
    --auth-supernode-private-key` and `flwr supernode register` expect: (private, public) paths."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = directory / name, directory / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + b"\n")
    return private, public


def make_certificates(directory: Path | str, hosts: list[str] | tuple[str, ...] = ("localhost", "127.0.0.1"),
                      days: int = 365) -> Certificates:
    """A private CA (`ca.crt`) and a server certificate (`server.pem`, key `server.key`) valid for
    `hosts` (names or IPs that SuperNodes and `flwr` use to reach the SuperLink). localhost and
    127.0.0.1 are always added: the SuperLink's own SuperExec reaches it there."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    not_after = now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "thinwire federation CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(not_after)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*hosts, "localhost", "127.0.0.1"]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0] if hosts else "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = Certificates(directory / "ca.crt", directory / "server.pem", directory / "server.key")
    paths.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    paths.key.chmod(0o600)
    return paths
