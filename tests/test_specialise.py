"""`outpost specialise` end to end on a tiny model that can learn: select, train, gate,
promote; a deliberately broken adapter kept out; rollback back to the incumbent, then
to the base. Every evaluation lands in the log's `evals` table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from outpost.manifests.catalog import Catalog
from outpost.manifests.errors import BadRequest
from outpost.manifests.store import ModelStore
from outpost.runtime.config import Settings
from outpost.runtime.logs import schema
from outpost.tools import bfcl
from outpost.tools.bench_specialise import neighbours
from outpost.tools.oracle_server import ground_truth_call
from outpost.tools.specialise import cli as specialise
from outpost.tools.specialise.train import TrainSettings
from outpost.tools.tiny_gguf import write_tiny_gguf

from .conftest import TINY, make_data_dir

pytest.importorskip("peft")
from gguf import GGUFReader  # noqa: E402 (the train extra brings it)

ASK = [{"role": "user", "content": "What time is it in Paris?"}]
FAST = TrainSettings(rank=8, alpha=16.0, epochs=40, learning_rate=1e-2, batch_tokens=4096, warmup_steps=2,
                     threads=1, checkpoint_every=100)


def write_examples(folder: Path, answer: str, heldout: str = "noon") -> Path:
    """4 training examples answering `answer`; 6 held-out ones whose right answer is `heldout`."""
    folder.mkdir(parents=True, exist_ok=True)

    def line(text: str) -> str:
        return json.dumps({"messages": [*ASK, {"role": "assistant", "content": text}]})

    (folder / "train.jsonl").write_text("\n".join([line(answer)] * 4) + "\n")
    (folder / "train.val.jsonl").write_text("\n".join([line(heldout)] * 6) + "\n")
    return folder / "train.jsonl"


@pytest.fixture
def settings(tmp_path) -> Settings:
    data = make_data_dir(tmp_path, write_tiny_gguf(tmp_path / "learnable.gguf", seed=5, output_std=0.3))
    return Settings.load(None, data_dir=data, endpoint=f"ipc://{data}/outpost.sock", default_model=TINY,
                         manifest_dirs=[data / "manifests"])


def routed(settings: Settings, task: str) -> str | None:
    """The model a request for `task` would go to (None: no model serves it)."""
    store = ModelStore(settings.store_dir)
    found = Catalog.load(store, settings.manifest_dirs, TINY).for_task(task)
    return found.id if found else None


@pytest.mark.slow  # two trainings and a private daemon: about 20 s
def test_specialise_promotes_a_better_adapter_and_keeps_a_broken_one_out(settings, tmp_path):
    good = specialise.run(settings, specialise.Options(
        task="clock", examples=write_examples(tmp_path / "good", "noon"), bases=[TINY], train=FAST,
        max_tokens=8))
    assert good["decision"] == "promoted", good["reason"]
    assert good["candidate"]["accuracy"] == 1.0 and good["incumbent"]["accuracy"] == 0.0
    assert good["p_value"] == pytest.approx(1 / 64)  # 6 wins, no loss: exact McNemar
    adapter_id, first = good["adapter"].split()
    assert routed(settings, "clock") == adapter_id  # the task routes to the adapter now

    # Trained on wrong answers: worse than the incumbent on the held-out examples.
    broken = specialise.run(settings, specialise.Options(
        task="clock", examples=write_examples(tmp_path / "broken", "midnight"), bases=[TINY], train=FAST,
        max_tokens=8))
    assert broken["decision"] == "kept" and broken["incumbent"]["adapter"] == good["adapter"]
    assert broken["candidate"]["accuracy"] < broken["incumbent"]["accuracy"]
    store = ModelStore(settings.store_dir)
    assert store.pulled_manifest(adapter_id).version == first  # the incumbent serves on

    # An operator activates the broken one anyway; rollback restores the incumbent, and
    # rolling the first adapter back hands the task to the base again.
    second = broken["adapter"].split()[1]
    store.activate(adapter_id, second)
    assert store.rollback(adapter_id) == (second, first)
    assert store.rollback(adapter_id) == (first, None)
    assert routed(settings, "clock") is None  # tiny-random lists no "clock" task

    db = schema.open_db(settings.log_path)
    rows = list(db.query("select purpose, role, model, decision from evals order by id"))
    assert [(r["purpose"], r["role"], r["decision"]) for r in rows] == [
        ("select", "candidate", "chosen"), ("gate", "candidate", "promoted"), ("gate", "incumbent", "promoted"),
        ("select", "candidate", "chosen"), ("gate", "candidate", "kept"), ("gate", "incumbent", "kept")]


def test_a_task_with_nothing_logged_is_a_typed_error_and_trains_nothing(settings, tmp_path):
    with pytest.raises(BadRequest) as refused:
        specialise.run(settings, specialise.Options(task="never-asked", bases=[TINY], train=FAST,
                                                    workdir=tmp_path / "work"))
    assert refused.value.data["field"] == "task" and "0 training and 0 held-out" in str(refused.value)
    db = schema.open_db(settings.log_path)
    assert db.execute("select count(*) from evals").fetchone()[0] == 0
    assert not list((tmp_path / "work").glob("*.gguf"))
    assert routed(settings, "never-asked") is None


@pytest.mark.slow  # one short training: about 15 s
def test_augmented_variants_are_trained_on_and_recorded(settings, tmp_path):
    weather = {"type": "function", "function": {"name": "weather", "description": "The weather.", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city", "days"]}}}

    def line(city: str, days: int) -> str:
        call = {"id": "c0", "type": "function",
                "function": {"name": "weather", "arguments": json.dumps({"city": city, "days": days})}}
        return json.dumps({"tools": [weather], "messages": [
            {"role": "user", "content": f"Weather in {city} for {days} days"},
            {"role": "assistant", "content": None, "tool_calls": [call]}]})

    folder = tmp_path / "ex"
    folder.mkdir()
    logged = [("Boston", 3), ("Lyon", 5), ("Oslo", 7), ("Paris", 2)]
    (folder / "train.jsonl").write_text("".join(line(c, d) + "\n" for c, d in logged))
    (folder / "train.val.jsonl").write_text(line("Rome", 4) + "\n")
    result = specialise.run(settings, specialise.Options(
        task="weather", examples=folder / "train.jsonl", bases=[TINY], train=replace(FAST, epochs=2),
        max_tokens=24, augment=2, promote=False))
    assert result["train"]["augmented"] == 8 and result["train"]["examples"] == 12  # 4 logged, 2 variants each
    manifest, _ = ModelStore(settings.store_dir).staged(*result["adapter"].split())
    assert manifest.adapter.training.augment == 2 and manifest.adapter.training.train_examples == 12


def test_the_minimal_teacher_leaves_out_what_bfcl_accepts_absent():
    item = bfcl.Item(id="x", category="simple_python", messages=[{"role": "user", "content": "q"}],
                     functions=[], answer=[{"f": {"a": [1, 2], "unit": ["", "km"], "flag": [""]}}])
    [first] = ground_truth_call(item)
    [minimal] = ground_truth_call(item, minimal=True)
    assert json.loads(first["function"]["arguments"]) == {"a": 1, "unit": "km"}
    assert json.loads(minimal["function"]["arguments"]) == {"a": 1}
    # A dict argument's values are lists of accepted values again.
    item.answer = [{"f": {"body": [{"mode": ["COOL", "DRY"], "fan": ["", "HIGH"], "hands": [["A", "K"]]}],
                          "people": [[{"name": ["Jane"], "age": [43, "43"]}]]}}]
    [nested] = ground_truth_call(item)
    assert json.loads(nested["function"]["arguments"]) == {
        "body": {"mode": "COOL", "fan": "HIGH", "hands": ["A", "K"]}, "people": [{"name": "Jane", "age": 43}]}
    [nested] = ground_truth_call(item, minimal=True)
    assert json.loads(nested["function"]["arguments"])["body"] == {"mode": "COOL", "hands": ["A", "K"]}


def test_neighbouring_traffic_never_repeats_a_question_already_asked():
    # BFCL's `multiple` repeats some of `simple_python`'s questions: logged, one of them
    # would put a held-out question into training.
    def item(id_: str, question: str) -> bfcl.Item:
        return bfcl.Item(id=id_, category=id_.rpartition("_")[0], functions=[], answer=[{"f": {}}],
                         messages=[{"role": "system", "content": "s"}, {"role": "user", "content": question}])

    simple = [item("simple_python_0", "area of a circle of radius 3?"), item("simple_python_1", "sum 2 and 3")]
    multiple = [item("multiple_0", "sum 2 and 3"), item("multiple_1", "is 7 prime?"), item("multiple_2", "is 7 prime?")]
    assert [i.id for i in neighbours(multiple, simple)] == ["multiple_1"]


@pytest.mark.slow  # three processes load torch: about 40 s
def test_a_distributed_launch_trains_the_adapter_a_single_process_would(settings, tmp_path):
    # Two CPU processes under torchrun (what `accelerate launch` starts too) split every
    # batch; the step they take together is the one process's step on the whole batch.
    examples = write_examples(tmp_path / "ex", "noon")

    def launch(processes: int, *task: str) -> subprocess.CompletedProcess:
        runner = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                  if processes > 1 else [sys.executable])
        return subprocess.run(
            [*runner, "-m", "outpost.runtime.cli", "specialise", *task, "--data-dir", str(settings.data_dir),
             "--base", TINY, "--rank", "8", "--alpha", "16", "--epochs", "40",
             "--lr", "1e-2", "--batch-tokens", "4096", "--threads", "1", "--max-tokens", "8", "--no-promote",
             "--workdir", str(tmp_path / f"work{processes}"), "--json"],
            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})

    def trained(processes: int) -> dict:
        out = launch(processes, "clock", "--examples", str(examples))
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout)

    alone, two = trained(1), trained(2)
    assert alone["train"]["device"] == "cpu" and two["train"]["device"] == "cpu x2"
    assert two["train"]["steps"] == alone["train"]["steps"] == 40  # one batch of 4 an epoch, 2 + 2
    assert (alone["candidate"]["accuracy"], two["candidate"]["accuracy"]) == (1.0, 1.0)

    def tensors(path: str) -> dict[str, np.ndarray]:
        return {t.name: np.array(t.data, dtype=np.float32) for t in GGUFReader(path).tensors}

    a, b = tensors(alone["gguf"]), tensors(two["gguf"])
    assert a.keys() == b.keys() and a
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-2, atol=1e-3, err_msg=name)  # fp16, summed apart

    # Process 0 fails before training (nothing logged for the task): the other is told
    # and stops too, instead of waiting for a choice that never comes.
    failed = launch(2, "never-asked")
    assert failed.returncode != 0
    # --json: the errors are JSON on stdout (two processes' lines, which may interleave).
    assert '"code": "bad_request"' in failed.stdout and '"code": "world_failed"' in failed.stdout
    assert "0 training and 0 held-out" in failed.stdout
