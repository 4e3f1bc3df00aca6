"""`outpost specialise` end to end on a tiny model that can learn: select, train, gate,
promote; a deliberately broken adapter kept out; rollback back to the incumbent, then
to the base. Every evaluation lands in the log's `evals` table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from outpost.manifests.catalog import Catalog
from outpost.manifests.errors import BadRequest
from outpost.manifests.store import ModelStore
from outpost.runtime.config import Settings
from outpost.runtime.logs import schema
from outpost.tools import bfcl
from outpost.tools.oracle_server import ground_truth_call
from outpost.tools.specialise import cli as specialise
from outpost.tools.specialise.train import TrainSettings
from outpost.tools.tiny_gguf import write_tiny_gguf

from .conftest import TINY, make_data_dir

pytest.importorskip("peft")

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


def test_the_minimal_teacher_leaves_out_what_bfcl_accepts_absent():
    item = bfcl.Item(id="x", category="simple_python", messages=[{"role": "user", "content": "q"}],
                     functions=[], answer=[{"f": {"a": [1, 2], "unit": ["", "km"], "flag": [""]}}])
    [first] = ground_truth_call(item)
    [minimal] = ground_truth_call(item, minimal=True)
    assert json.loads(first["function"]["arguments"]) == {"a": 1, "unit": "km"}
    assert json.loads(minimal["function"]["arguments"]) == {"a": 1}
