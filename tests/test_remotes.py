"""Models down from network hubs: a real S3-compatible store (SeaweedFS) and a real
HTTPS mirror (nginx) on 127.0.0.1, with a loopback proxy between the device and the
server that cuts, stalls or fails connections. The client runs unpatched."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from botocore import handlers as boto_handlers

from outpost.manifests.errors import ModelNotPulled
from outpost.manifests.store import ModelStore
from outpost.sync.deadline import SyncDeadline
from outpost.sync.errors import SyncError
from outpost.sync.pull import ModelPuller
from outpost.sync.remotes import RemoteOptions, open_remote
from outpost.tools.faultproxy import Fault, FaultProxy, random_cut
from outpost.tools.fleet import FleetHub, provision
from outpost.tools.hubs import NginxMirror, SeaweedS3, nginx_binary

from .conftest import TINY, tiny_manifest_toml

BLOB = 3 << 20  # big enough that a cut lands inside the blob, not the metadata


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory):
    with SeaweedS3(tmp_path_factory.mktemp("seaweed")) as server:
        server.create_bucket("fleet")
        yield server


@pytest.fixture(scope="module")
def blob(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("blob") / "tiny.gguf"
    path.write_bytes(os.urandom(BLOB))
    return path


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, blob):
    root = tmp_path_factory.mktemp("fleet")
    hub = FleetHub.create(root / "hub", root / "keys")
    hub.add_model(tiny_manifest_toml(blob), {"tiny.gguf": blob})
    return hub


@pytest.fixture
def operator_credentials(monkeypatch):
    """The operator writes with keys (SeaweedFS without an identity config takes any);
    devices read anonymously."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "fleet")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fleet-secret")
    yield
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")


@pytest.fixture(scope="module")
def s3_hub(seaweed, fleet):
    """The fleet's hub published to s3://fleet/hub (once for the module)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_ACCESS_KEY_ID", "fleet")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "fleet-secret")
    try:
        remote = open_remote("s3://fleet/hub", RemoteOptions(s3_endpoint=seaweed.endpoint))
        fleet.publish_to(remote)
    finally:
        mp.undo()
    return "s3://fleet/hub"


def device(tmp_path: Path, fleet: FleetHub, hub: str, options: RemoteOptions) -> tuple[ModelPuller, ModelStore]:
    provision(fleet.root_json, tmp_path / "trust")
    store = ModelStore(tmp_path / "models")
    puller = ModelPuller(hub, "stable", tmp_path / "trust", store, options)
    puller.transfer.sleep = lambda s: None  # blob retries at once (metadata's back off < 4 s)
    return puller, store


def assert_installed(store: ModelStore, blob: Path) -> None:
    manifest, _ = store.staged(TINY, "1")  # verified and staged; activation is test_activation.py's
    assert store.weights_path(manifest).read_bytes() == blob.read_bytes()


def test_publishing_twice_sends_only_the_timestamp(seaweed, fleet, s3_hub, operator_credentials):
    remote = open_remote(s3_hub, RemoteOptions(s3_endpoint=seaweed.endpoint))
    assert fleet.publish_to(remote) == 1
    assert "metadata/1.root.json" in remote.list("metadata/")


def test_an_exclusive_write_never_replaces_an_object(seaweed, operator_credentials):
    remote = open_remote("s3://fleet/scratch", RemoteOptions(s3_endpoint=seaweed.endpoint))
    assert remote.write("a/x", b"first", exclusive=True) is True
    assert remote.write("a/x", b"second", exclusive=True) is False
    assert b"".join(remote.read("a/x")) == b"first"
    assert b"".join(remote.read("a/x", 2)) == b"rst"
    assert remote.list("a/") == ["a/x"]


def test_a_device_pulls_from_s3_anonymously(tmp_path, seaweed, fleet, s3_hub, blob):
    puller, store = device(tmp_path, fleet, s3_hub, RemoteOptions(s3_endpoint=seaweed.endpoint))
    [pulled] = puller.pull()
    assert pulled.installed and pulled.transferred == BLOB
    assert_installed(store, blob)


def test_cuts_stalls_and_503s_on_the_way_to_s3_are_resumed(tmp_path, seaweed, fleet, s3_hub, blob):
    port = int(seaweed.endpoint.rsplit(":", 1)[1])
    faults = [Fault("status", status=503), Fault("cut", after=BLOB // 3),
              Fault("stall", after=BLOB // 2), Fault("status", status=500), Fault("cut", after=1000)]
    with FaultProxy(port, faults) as proxy:
        options = RemoteOptions(s3_endpoint=f"http://127.0.0.1:{proxy.port}", stall_timeout_s=1.0)
        puller, store = device(tmp_path, fleet, s3_hub, options)
        [pulled] = puller.pull()
    assert pulled.installed
    assert_installed(store, blob)
    assert puller.transfer.retried >= 2  # the blob's cuts (metadata fetches took the others)
    assert pulled.transferred < 1.2 * BLOB  # resumed, not restarted
    assert not list((store.tmp / "resume").glob("*.partial"))


def test_a_hub_that_stays_down_is_a_sync_error_and_keeps_what_arrived(tmp_path, seaweed, fleet, s3_hub):
    port = int(seaweed.endpoint.rsplit(":", 1)[1])
    # Every connection dies after 200 kB: the metadata gets through, the blob never does.
    with FaultProxy(port, default=Fault("cut", after=200_000)) as proxy:
        options = RemoteOptions(s3_endpoint=f"http://127.0.0.1:{proxy.port}", stall_timeout_s=1.0)
        puller, store = device(tmp_path, fleet, s3_hub, options)
        puller.transfer.retries = 2
        with pytest.raises(SyncError) as err:
            puller.pull()
    assert type(err.value) is SyncError and store.pulled_manifest(TINY) is None
    [partial] = (store.tmp / "resume").glob("*.partial")
    assert 0 < partial.stat().st_size < BLOB  # kept: the next pull resumes from there


@pytest.mark.parametrize("how", ["fin", "rst"])
def test_a_pull_whose_answers_drop_inside_100_continue_fails_in_time_and_the_next_completes(
        tmp_path, seaweed, fleet, s3_hub, blob, how):
    """Every GET is answered with part of an unasked `100 Continue` (legal: a client must
    take any 1xx) and dropped: the pull ends with sync_failed, its lock is free, and the
    next pull installs the model."""
    port = int(seaweed.endpoint.rsplit(":", 1)[1])
    with FaultProxy(port, default=Fault("interim", after=random.Random(how).randint(12, 24), how=how)) as proxy:
        options = RemoteOptions(s3_endpoint=f"http://127.0.0.1:{proxy.port}", stall_timeout_s=2, deadline_s=3)
        puller, store = device(tmp_path, fleet, s3_hub, options)
        with pytest.raises(SyncError) as err:
            puller.pull()
        assert err.value.code == "sync_failed" and proxy.fired["interim"] >= 1
        proxy.default = None
        [pulled] = puller.pull()
    assert pulled.installed
    assert_installed(store, blob)


def test_a_trickling_link_is_ended_by_the_deadline_and_the_next_pull_resumes(tmp_path, seaweed, fleet, s3_hub,
                                                                             blob):
    """A link slower than the floor rate, though never silent for a stall timeout,
    would hold a pull for as long as it likes; the deadline (5 s, plus the bytes that
    arrived at a floor of 1 MiB/s) ends it, naming the blob's read, and the next pull
    resumes from what arrived."""
    port = int(seaweed.endpoint.rsplit(":", 1)[1])
    with FaultProxy(port, rate=100_000) as proxy:  # the 3 MiB blob would take 31 s
        options = RemoteOptions(s3_endpoint=f"http://127.0.0.1:{proxy.port}", stall_timeout_s=30, deadline_s=5,
                                min_rate=1 << 20)
        puller, store = device(tmp_path, fleet, s3_hub, options)
        with pytest.raises(SyncDeadline) as err:
            puller.pull()
        assert err.value.code == "sync_failed"
        assert str(err.value).startswith("pull: read targets/blobs/") and "s3://fleet/hub took over" in str(err.value)
        [partial] = (store.tmp / "resume").glob("*.partial")
        kept = partial.stat().st_size
        proxy.rate = None
        [pulled] = puller.pull()
    assert pulled.installed and pulled.transferred == BLOB - kept and kept > 0
    assert_installed(store, blob)


@pytest.mark.parametrize("expect", [False, True], ids=["as-sent", "expect-100"])
@pytest.mark.parametrize("how", ["fin", "rst"])
def test_a_publish_dropped_inside_100_continue_ends_in_time_and_the_next_completes(
        tmp_path, seaweed, fleet, blob, operator_credentials, how, expect):
    """The operator's publish meets the drop on its first PUT (after its two listings on
    the same connection): it ends with sync_failed (with botocore's Expect put back, by
    the deadline), and the next publish sends the hub whole: a device pulls it."""
    port = int(seaweed.endpoint.rsplit(":", 1)[1])
    hub = f"s3://fleet/{tmp_path.name}"
    after = random.Random(f"{how}{expect}").randint(12, 24)
    with FaultProxy(port, [Fault("interim", after=after, how=how, exchange=2)]) as proxy:
        remote = open_remote(hub, RemoteOptions(s3_endpoint=f"http://127.0.0.1:{proxy.port}", stall_timeout_s=2,
                                                deadline_s=3, min_rate=10 << 20))  # 3.3 s for the blob
        if expect:
            remote.inner.client.meta.events.register("before-call.s3", boto_handlers.add_expect_header)
        with pytest.raises(SyncError) as err:
            fleet.publish_to(remote)
        assert err.value.code == "sync_failed" and proxy.fired["interim"] == 1
        if expect and how == "fin":
            assert isinstance(err.value, SyncDeadline) and str(err.value).startswith("publish: write ")
            assert err.value.data["deadline_s"] < 4
        sent = fleet.publish_to(remote)
    names = open_remote(hub, RemoteOptions(s3_endpoint=seaweed.endpoint)).list("")
    assert len(names) == sent and len(set(names)) == len(names)
    puller, store = device(tmp_path, fleet, hub, RemoteOptions(s3_endpoint=seaweed.endpoint))
    [pulled] = puller.pull()
    assert pulled.installed
    assert_installed(store, blob)


@pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed (.ci/run installs it)")
def test_a_device_pulls_from_an_https_mirror_through_a_cutting_link(tmp_path, fleet, blob):
    with NginxMirror(fleet.hub, tmp_path / "nginx") as mirror, FaultProxy(mirror.port) as proxy:
        proxy.plan(Fault("cut", after=BLOB // 4), Fault("stall", after=BLOB // 4), Fault("cut", after=BLOB // 4))
        options = RemoteOptions(ca_bundle=str(mirror.ca_bundle), stall_timeout_s=1.0)
        puller, store = device(tmp_path, fleet, f"https://127.0.0.1:{proxy.port}", options)
        [pulled] = puller.pull()
    assert pulled.installed and pulled.transferred < 1.2 * BLOB
    assert_installed(store, blob)
    ranges = [line for line in (tmp_path / "nginx" / "access.log").read_text().splitlines() if " 206 " in line]
    assert ranges  # the resumes were Range requests the server honoured


@pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed (.ci/run installs it)")
def test_an_https_mirror_with_an_unknown_certificate_is_refused(tmp_path, fleet):
    with NginxMirror(fleet.hub, tmp_path / "nginx") as mirror:
        puller, store = device(tmp_path, fleet, mirror.url, RemoteOptions(stall_timeout_s=1.0))
        with pytest.raises(SyncError) as err:
            puller.pull()
    assert "ca_bundle" in str(err.value) and store.pulled_manifest(TINY) is None


def test_a_mirror_is_read_only(tmp_path):
    remote = open_remote("https://127.0.0.1:9/hub")
    with pytest.raises(SyncError):
        remote.write("logs/x", b"", exclusive=True)


def test_two_test_hubs_run_at_once_and_neither_reports_outside(tmp_path, seaweed):
    """SeaweedFS's Iceberg and Lance catalogs listen on fixed ports (8181, 9101), so a
    second hub failed to start; they are off, as is its telemetry to an outside host."""
    with SeaweedS3(tmp_path / "second") as second:
        second.create_bucket("other")
        second.client().put_object(Bucket="other", Key="x", Body=b"both up")
        assert second.client().get_object(Bucket="other", Key="x")["Body"].read() == b"both up"
    assert "-master.telemetry=false" in seaweed.process.args
    assert {"-s3.port.iceberg=0", "-s3.port.lance=0"} <= set(seaweed.process.args)


def test_an_unknown_scheme_is_a_typed_error():
    with pytest.raises(SyncError):
        open_remote("ftp://example/hub")


PULLER = """
import sys
from outpost.runtime.cli import main
sys.exit(main(sys.argv[1:]))
"""


def store_is_sound(store: ModelStore) -> None:
    """No corrupt install: every blob in the store is the file its name says."""
    for path in store.blobs.glob("sha256-*"):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name[len("sha256-"):], path


@pytest.mark.slow
def test_a_hundred_interrupted_pulls_install_the_model_or_leave_the_previous_one(tmp_path, seaweed, fleet, blob):
    """The acceptance run. A 4 MiB model behind a 2 MB/s link; each of 100 pulls (the
    real CLI, a process of its own) meets a connection cut at a random byte, a SIGKILL
    at a random moment, both, or neither. After every run the device has either the new
    version, verified, or the previous one exactly as it was; each time a version lands
    the operator publishes the next, and the bytes the link carried for it are counted.
    Cuts fall anywhere: in an answer, in a request, inside an interim `100 Continue`
    the link adds to any of a connection's requests, by FIN or RST. The pulls stage (`--no-activate`): the payload is random bytes, which no smoke test
    would pass; activation has its own tests."""
    rng = random.Random(20261129)
    size = 4 << 20
    hub = f"s3://fleet/{tmp_path.name}"
    data = tmp_path / "device"
    provision(fleet.root_json, data / "sync")
    store = ModelStore(data / "models")
    port = int(seaweed.endpoint.rsplit(":", 1)[1])
    operator = pytest.MonkeyPatch()

    def publish(version: int) -> bytes:
        payload = os.urandom(size)
        path = tmp_path / f"v{version}.gguf"
        path.write_bytes(payload)
        fleet.add_model(tiny_manifest_toml(path).replace('version = "1"', f'version = "{version}"'),
                        {"tiny.gguf": path})
        operator.setenv("AWS_ACCESS_KEY_ID", "fleet")
        operator.setenv("AWS_SECRET_ACCESS_KEY", "fleet-secret")
        try:
            fleet.publish_to(open_remote(hub, RemoteOptions(s3_endpoint=seaweed.endpoint)))
        finally:
            operator.undo()
        path.unlink()
        return payload

    version, payload = 1, publish(1)
    previous: tuple[str, bytes] | None = None  # (version, bytes) installed before this cycle
    cycles: list[int] = []  # link bytes per landed version
    outcomes = {"installed": 0, "kept": 0}
    with FaultProxy(port, rate=2_000_000) as proxy:
        env = {**os.environ, "OUTPOST_SYNC__S3_ENDPOINT": f"http://127.0.0.1:{proxy.port}",
               "OUTPOST_SYNC__STALL_TIMEOUT_S": "5"}
        env = {k: v for k, v in env.items() if not k.startswith("AWS_")}  # devices read anonymously
        cycle_start = 0
        for run in range(100):
            cut, kill = rng.random() < 0.5, rng.random() < 0.5
            if cut:  # in an answer (the blob's, mostly), a request, or an interim answer
                proxy.plan(random_cut(rng, size, 400, exchanges=8))
            proc = subprocess.Popen([sys.executable, "-c", PULLER, "sync", "pull", "--hub", hub,
                                     "--no-activate", "--data-dir", str(data)], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if kill:
                try:
                    proc.wait(rng.uniform(0.5, 4.0))
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
            proc.wait(120)
            proxy.faults.clear()
            store_is_sound(store)
            try:
                manifest, _ = store.staged(TINY, str(version))
            except ModelNotPulled:
                manifest = None
            if manifest is not None:
                assert store.weights_path(manifest).read_bytes() == payload, f"run {run}"
                outcomes["installed"] += 1
                cycles.append(proxy.bytes_down - cycle_start)
                previous = (manifest.version, payload)
                version += 1
                payload = publish(version)
                cycle_start = proxy.bytes_down
            else:  # the previous state, intact
                outcomes["kept"] += 1
                if previous is not None:
                    staged, _ = store.staged(TINY, previous[0])
                    assert store.weights_path(staged).read_bytes() == previous[1], f"run {run}"
    ratio = sum(cycles) / (len(cycles) * size)
    print(f"100 pulls: {outcomes}, {len(cycles)} versions landed, link bytes per version "
          f"{ratio:.3f}x the blob (worst {max(cycles) / size:.3f}x); faults {dict(proxy.fired)}")
    assert outcomes["kept"] >= 10 and len(cycles) >= 10
    assert ratio < 1.2
