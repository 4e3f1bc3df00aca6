"""Field sync against a real S3-compatible store (SeaweedFS on 127.0.0.1), in one run.

    python -m outpost.tools.bench_sync [--size-mib N] [--rounds R] [--rows N]

1. Pull throughput: `ModelPuller.pull` (TUF refresh, Range-resumable download into a
   partial file, signed hash check, the store's install with its own hash check) of a
   random N MiB model, against a plain download of the same blob object with the same
   client (boto3 `get_object`, streamed to a file) from the same server. R rounds each,
   alternating; the medians' ratio is the figure (target >= 0.9).
2. Resume: the link (a loopback proxy) is cut at 50% of the blob; the next pull
   resumes. Bytes the link carried in all, against a pull from scratch after the cut.
3. Push: a log of N realistic requests (tools/bench_log.py's rows) pushed in batches;
   rows per second, and bytes per row on the wire after zstd against the log's own.

Loopback measures Outpost's own costs, not a field link's: on a real link the
transfer dominates and the ratio tends to 1.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from outpost.manifests.store import ModelStore
from outpost.runtime.logs import schema
from outpost.runtime.logs.store import LogStore
from outpost.sync.pull import ModelPuller, blob_target
from outpost.sync.push import LogPusher
from outpost.sync.remotes import CHUNK, RemoteOptions, open_remote

from .bench_log import TOOLS, row
from .faultproxy import Fault, FaultProxy
from .fleet import FleetHub, provision
from .hubs import SeaweedS3

MANIFEST = """
id = "bench-model"
version = "1"
backend = "gguf"
chat_template = "chatml"
context_length = 2048
memory_estimate = "64MiB"

[[files]]
name = "bench.gguf"
size = {size}
sha256 = "{sha}"

[[files.sources]]
kind = "path"
path = "{path}"
"""


def _publish(work: Path, server: SeaweedS3, size: int) -> tuple[FleetHub, str, str]:
    import hashlib  # noqa: PLC0415

    blob = work / "bench.gguf"
    data = os.urandom(size)
    blob.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    hub = FleetHub.create(work / "hub", work / "keys")
    hub.add_model(MANIFEST.format(size=size, sha=sha, path=blob), {"bench.gguf": blob})
    hub.publish_to(open_remote("s3://bench/hub", RemoteOptions(s3_endpoint=server.endpoint)))
    return hub, sha, f"hub/targets/blobs/{sha}.{blob_target(sha).rsplit('/', 1)[1]}"


def _device(work: Path, hub: FleetHub, name: str, endpoint: str) -> ModelPuller:
    provision(hub.root_json, work / name / "trust")
    return ModelPuller("s3://bench/hub", "stable", work / name / "trust", ModelStore(work / name / "models"),
                       RemoteOptions(s3_endpoint=endpoint))


def pull_vs_plain(work: Path, server: SeaweedS3, hub: FleetHub, key: str, size: int,
                  rounds: int) -> dict[str, Any]:
    client = server.client()
    plain, ours = [], []
    for r in range(rounds):
        t = time.perf_counter()
        body = client.get_object(Bucket="bench", Key=key)["Body"]
        with open(work / f"plain-{r}", "wb") as f:
            for chunk in body.iter_chunks(CHUNK):  # the chunk size Outpost reads with
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        plain.append(time.perf_counter() - t)
        (work / f"plain-{r}").unlink()
        puller = _device(work, hub, f"dev-{r}", server.endpoint)
        t = time.perf_counter()
        [pulled] = puller.pull()
        ours.append(time.perf_counter() - t)
        assert pulled.installed
    mib = size / 2**20
    return {"plain_mib_s": round(mib / statistics.median(plain), 1),
            "outpost_mib_s": round(mib / statistics.median(ours), 1),
            "ratio": round(statistics.median(plain) / statistics.median(ours), 3),
            "rounds": rounds}


def resume_saving(work: Path, server: SeaweedS3, hub: FleetHub, size: int) -> dict[str, Any]:
    port = int(server.endpoint.rsplit(":", 1)[1])
    with FaultProxy(port) as proxy:
        puller = _device(work, hub, "dev-cut", f"http://127.0.0.1:{proxy.port}")
        puller.transfer.retries = 0
        proxy.plan(Fault("cut", after=size // 2))
        try:
            puller.pull()
        except Exception:  # noqa: BLE001 (the cut is the point)
            pass
        first = proxy.bytes_down
        [pulled] = puller.pull()
        total = proxy.bytes_down
    assert pulled.installed
    return {"cut_at": 0.5, "link_bytes_with_resume": total, "link_bytes_restarting": first + size,
            "saving": round(1 - total / (first + size), 3), "resumed_bytes": pulled.transferred,
            "overhead_vs_blob": round(total / size, 3)}


def push(work: Path, server: SeaweedS3, rows: int) -> dict[str, Any]:
    store = LogStore(work / "device" / "logs.db")

    async def fill() -> None:
        for i in range(rows):
            request, [attempt] = row(i)
            # The prompt as a chat template writes it (bench_log's is filler): the tools
            # block and the turn, as a device logs them again and again.
            prompt = (f"<|im_start|>system\nYou may call these tools:\n{json.dumps(TOOLS)}<|im_end|>\n"
                      f"<|im_start|>user\n{request.messages[0]['content']}<|im_end|>\n<|im_start|>assistant\n")
            await store.record(request, [dataclasses.replace(attempt, prompt=prompt)])
    asyncio.run(fill())
    store.close()
    db = schema.open_db(work / "device" / "logs.db")
    log_bytes = db.execute("select sum(length(messages) + coalesce(length(tool_calls), 0)) from requests"
                           ).fetchone()[0] + db.execute(
        "select sum(coalesce(length(output), 0) + coalesce(length(prompt), 0) + coalesce(length(tool_calls), 0)"
        " + coalesce(length(validation), 0)) from attempts").fetchone()[0]
    pusher = LogPusher(db, open_remote("s3://bench/logs", RemoteOptions(s3_endpoint=server.endpoint)),
                       "bench-device", work / "device" / "outbox", batch_rows=500)
    t = time.perf_counter()
    pushed = pusher.push()
    seconds = time.perf_counter() - t
    assert pushed.rows == rows
    return {"rows": rows, "batches": pushed.batches, "rows_per_s": round(rows / seconds),
            "wire_bytes_per_row": round(pushed.bytes / rows, 1),
            "log_text_bytes_per_row": round(log_bytes / rows, 1),
            "compression": round(log_bytes / pushed.bytes, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m outpost.tools.bench_sync",
                                 description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--size-mib", type=int, default=256,
                    help="the model blob (default 256: the issue's monthly 250 MB model)")
    ap.add_argument("--rounds", type=int, default=3, help="pulls and plain downloads each (default 3)")
    ap.add_argument("--rows", type=int, default=5000, help="log requests to push (default 5000)")
    ap.add_argument("--dir", type=Path, help="where to put the scratch files")
    args = ap.parse_args()
    size = args.size_mib << 20
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # SeaweedFS takes any, without
        os.environ.setdefault(key, "bench")
    with tempfile.TemporaryDirectory(prefix="outpost-bench-sync-", dir=args.dir) as tmp:
        work = Path(tmp)
        with SeaweedS3(work / "seaweed") as server:
            server.create_bucket("bench")
            hub, _, key = _publish(work, server, size)
            result = {"size_mib": args.size_mib,
                      "pull": pull_vs_plain(work, server, hub, key, size, args.rounds),
                      "resume": resume_saving(work, server, hub, size),
                      "push": push(work, server, args.rows), "cpus": os.cpu_count()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
