"""One model worker process: load one model, answer generate requests, exit.

It runs in a child forked from a forkserver that already imported this module (and
with it llama_cpp and xgrammar), so a new worker costs a fork plus an mmap. It talks
to the broker over a private DEALER socket with one JSON frame per message:

    worker -> broker   {"type": "ready", "pid", "load_ms", "info"}
                       {"type": "failed", "error": {code, message, data}}
    broker -> worker   {"type": "generate", "id", "request": GenerationRequest, "stream": bool}
    worker -> broker   {"type": "delta", "id", "text"}  (streaming: settled text, as it grows)
                       {"type": "result", "id", "generation": Generation}
                       {"type": "error", "id", "error": {...}}
                       (an error with "exiting": true: the worker exits once its batch is done)
    broker -> worker   {"type": "cancel", "id"} (the caller gave up: its slot is freed)
    worker -> broker   {"type": "cancelled", "id"}
                       {"type": "info", "id"} / {"type": "shutdown"}

Several generate requests are in flight at once, up to the model's slots: they decode
together (models/batching.py) and their replies come back in the order they finish.
A crash in native code kills only this process; the broker sees the exit and fails
the in-flight requests with `worker_crashed`. The worker exits by itself if the
daemon that started it disappears.

What this module must not do: import the daemon, the pool or the log; it runs in a
child with nothing but its socket, its manifest and the store.
"""

from __future__ import annotations

import hashlib
import logging
import os
import resource
import time
import traceback
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from outpost.manifests.errors import InternalError, OutpostError
from outpost.manifests.schema import Manifest
from outpost.manifests.store import FileIdentity, ModelStore
from outpost.models import gguf_check
from outpost.models.backend import AdapterRef, GenerationRequest, LoadOptions
from outpost.models.batching import Batch
from outpost.models.decoder import Decoder
from outpost.models.errors import ModelLoadFailed
from outpost.models.llama import LlamaModel
from outpost.models.templates import ChatTemplate

log = logging.getLogger("outpost.worker")
PARENT_CHECK_MS = 1000


def serve_model(endpoint: str, manifest_toml: str, store_root: str, daemon_pid: int,
                options: LoadOptions) -> None:
    """Entry point of the worker process."""
    # No core dump: a crashed worker that writes one (hundreds of MiB, or a slow
    # core_pattern pipe) stays alive while it does, holding its request and its queue;
    # the daemon must see it gone at once and reload it.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 1000
    sock.connect(endpoint)
    try:
        _serve(sock, manifest_toml, ModelStore(Path(store_root)), daemon_pid, options)
    finally:
        sock.close()
        ctx.term()


def _serve(sock: zmq.Socket, manifest_toml: str, store: ModelStore, daemon_pid: int,
           options: LoadOptions) -> None:
    t0 = time.perf_counter()
    try:
        model = load(Manifest.from_toml(manifest_toml), store, options)
    except OutpostError as exc:
        sock.send_json({"type": "failed", "error": exc.to_wire()})
        return
    except Exception as exc:  # anything else is a bug, reported rather than hidden
        sock.send_json({"type": "failed", "error": InternalError(
            f"worker failed to start: {exc!r}", traceback=traceback.format_exc()).to_wire()})
        return
    sock.send_json({"type": "ready", "pid": os.getpid(),
                    "load_ms": (time.perf_counter() - t0) * 1e3, "info": model.info()})
    try:
        _loop(sock, model, daemon_pid)
    finally:
        model.close()


def _loop(sock: zmq.Socket, model: Decoder, daemon_pid: int) -> None:
    """Read what the broker sends between forward passes; run passes while any request
    is in the batch. Requests join as slots free up, in the order they came (the pool
    sends no more than the worker has slots, so the queue is short-lived)."""
    batch = Batch(model)
    queue: deque[dict[str, Any]] = deque()  # generate messages waiting for a slot
    ids: dict[int, Any] = {}  # id(sequence) -> the broker's message id
    exiting = False
    while True:
        busy = bool(batch.active)
        if sock.poll(0 if busy else PARENT_CHECK_MS):
            while sock.poll(0):
                msg = sock.recv_json()
                kind = msg.get("type")
                if kind == "shutdown":
                    return
                if kind == "info":
                    sock.send_json({"type": "result", "id": msg.get("id"), "info": model.info()})
                elif kind == "cancel":  # its caller gave up: free the slot at this pass
                    _cancel(batch, queue, ids, msg.get("id"))
                    sock.send_json({"type": "cancelled", "id": msg.get("id")})
                elif kind == "generate":
                    queue.append(msg)
        elif not busy and not _alive(daemon_pid):
            return
        while queue and not exiting:
            msg = queue[0]
            request = GenerationRequest.from_dict(msg["request"])
            if not batch.admits(request):
                break
            queue.popleft()
            try:
                seq = batch.join(request, _streamer(sock, msg) if msg.get("stream") else None)
            except Exception as exc:  # refused: this request alone
                reply = _failure(msg.get("id"), exc, model)
                # A compile that overran goes on in its thread and cannot be stopped: this
                # worker says so in its reply, finishes the batch, exits, and the next
                # request loads a new one.
                exiting = reply["error"].get("data", {}).get("keyword") == "compile_timeout"
                sock.send_json({**reply, "exiting": exiting})
                continue
            ids[id(seq)] = msg.get("id")
        for seq in batch.step():
            msg_id = ids.pop(id(seq))
            if seq.error is not None:
                sock.send_json(_failure(msg_id, seq.error, model))
            else:
                sock.send_json({"type": "result", "id": msg_id, "generation": seq.result.to_dict(),
                                "grammar_cache": model.grammars.stats(), **model.adapter_info()})
        if exiting and not batch.active:
            log.warning("a grammar compile overran its limit; the worker exits")
            # close() alone leaves the reply to zmq's I/O thread, which _exit would
            # kill: term() waits (up to the linger) until it has gone out.
            sock.close(linger=2000)
            sock.context.term()
            os._exit(0)


def _cancel(batch: Batch, queue: deque[dict[str, Any]], ids: dict[int, Any], msg_id: Any) -> None:
    for msg in list(queue):
        if msg.get("id") == msg_id:
            queue.remove(msg)
    for seq in list(batch.active.values()):
        if ids.get(id(seq)) == msg_id:
            batch.cancel(seq)
            del ids[id(seq)]


def _streamer(sock: zmq.Socket, msg: dict[str, Any]) -> Callable[[str], None]:
    def on_text(text: str) -> None:
        sock.send_json({"type": "delta", "id": msg.get("id"), "text": text})
    return on_text


def _failure(msg_id: Any, exc: BaseException, model: Decoder) -> dict[str, Any]:
    if isinstance(exc, OutpostError):
        return {"type": "error", "id": msg_id, "error": exc.to_wire(), **model.adapter_info()}
    log.error("generation failed", exc_info=exc)
    return {"type": "error", "id": msg_id, "error": InternalError(f"generation failed: {exc!r}").to_wire()}


# What an ONNX model's vocabulary is read from (models/hf_tokenizer.py).
VOCABULARY_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def load(manifest: Manifest, store: ModelStore, options: LoadOptions) -> Decoder:
    """The manifest's model on its backend. Every file is verified before native code
    parses it: a corrupt model is refused, not run."""
    vocab = store.cache / f"vocab-{manifest.weights.sha256}.bin"
    if manifest.backend == "onnx":
        # Its vocabulary (pieces and stop ids) comes from the tokenizer files, not the
        # graph: keyed by them, so a revision that changes only those is not served stale.
        shas = [f.sha256 for f in manifest.files if f.name in VOCABULARY_FILES]
        vocab = store.cache / f"vocab-{hashlib.sha256(''.join(shas).encode()).hexdigest()}.bin"
        try:
            from outpost.models.onnx import OnnxModel  # noqa: PLC0415 (the `onnx` extra)
        except ImportError as exc:
            raise ModelLoadFailed(f"{manifest.id} is an ONNX model: install the `onnx` extra "
                                  f"(pip install 'outpost[onnx]'): {exc}", model=manifest.id) from exc
        return OnnxModel(manifest, store.folder(manifest), n_threads=options.n_threads,
                         providers=list(options.providers), vocab_cache=vocab,
                         grammar_timeout_s=options.grammar_timeout_s)
    weights = _checked(store, manifest.weights, manifest)

    def adapter_path(ref: AdapterRef) -> Path:
        return _checked(store, ref, None)

    # A task adapter's file is checked (size, sha256, structure) before llama.cpp reads it.
    return LlamaModel(manifest, weights, vocab_cache=vocab, adapter_path=adapter_path,
                      n_threads=options.n_threads, n_batch=options.n_batch, n_gpu_layers=options.n_gpu_layers,
                      n_slots=options.n_parallel,
                      grammar_timeout_s=options.grammar_timeout_s)


def _checked(store: ModelStore, file: FileIdentity, manifest: Manifest | None) -> Path:
    """A GGUF file's path once its bytes match the manifest and its structure passes
    Outpost's own reader (models/gguf_check.py), and the chat template it carries (when
    the manifest uses it) parses within the sandbox: llama.cpp never parses a file that
    did not. Checked once per file and manifest, and remembered by sha256."""
    path = store.ensure_verified(file)
    template = manifest is not None and manifest.chat_template == "gguf"
    stamp = store.cache / f"gguf-ok-{gguf_check.CHECKER}-{file.sha256}-{int(template)}"
    if not stamp.exists():
        head = gguf_check.check_model(path, name=file.name)
        source = head.metadata.get("tokenizer.chat_template")
        if template and isinstance(source, str):
            ChatTemplate.checked(source, f"{file.name}'s chat template")
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.touch()
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
