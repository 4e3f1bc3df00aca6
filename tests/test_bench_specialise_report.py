"""bench_specialise's report, from a saved result: what `--from-json` redraws."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from outpost.tools.bench_specialise_report import curve_svg, table, teacher

SVG = "{http://www.w3.org/2000/svg}"


def result(**extra) -> dict:
    point = {"adapter_bytes": 9797760, "n": 206, "valid": 1.0, "local_share": 0.63, "local_ast": 0.77,
             "p50_ms": 1931.3, "decode_tok_s": 77.6, "train_wall_s": 2500.0, "steps": 255}
    return {"teacher": "oracle (BFCL ground truth, first)", "oracle": "first", "cores": 2, "threads": 2,
            "train_questions": 194, "heldout_questions": 206, "cloud_usd_per_request": 6e-05,
            "base": {"n": 206, "ast": 0.398, "valid": 0.995, "local_share": 0.15, "p50_ms": 1535.8,
                     "decode_tok_s": 105.7},
            "curve": [{**point, "examples": 25, "adapter": "bfcl-simple-n25 a1", "ast": 0.45},
                      {**point, "examples": 151, "adapter": "bfcl-simple.smollm2-135m-instruct a1", "ast": 0.597}],
            "specialise": {"decision": "promoted", "reason": "12 wins, 1 loss, exact McNemar p = 0.0017 < 0.05"},
            "switching": {"one_adapter_p50_ms": 2990.0, "alternating_p50_ms": 4250.0, "switch_call_ms": 3.7},
            **extra}


def test_the_table_names_the_oracle_and_gives_every_row():
    text = table(result())
    assert "ORACLE TEACHER" in text.splitlines()[0]
    assert "39.8%" in text and "45.0%" in text and "59.7%" in text
    assert "gate: promoted (12 wins" in text
    assert "15.0% -> 63.0%" in text  # the full adapter's local share, not the first point's
    assert "the switch call 3.70 ms" in text


def test_a_real_teacher_is_named_as_such():
    run = result(teacher="cloud https://api.example/v1 (gpt-x)")
    assert teacher(run) == "teacher: cloud https://api.example/v1 (gpt-x)"
    assert "ORACLE" not in table(run)
    # A run saved before the `oracle` key named the oracle in the teacher's text only.
    old = result(teacher="oracle (BFCL ground truth, minimal)")
    del old["oracle"]
    assert teacher(old).endswith("minimal)")


def test_the_curve_is_an_svg_with_a_point_per_run_and_the_base():
    root = ET.fromstring(curve_svg(result()))
    assert root.tag == f"{SVG}svg"
    assert len(root.findall(f"{SVG}circle")) == 3  # the base at 0, then 25 and 151
    labels = [t.text for t in root.findall(f"{SVG}text")]
    assert "target 70%" in labels and "59.7%" in labels
    assert any("oracle teacher" in (t or "") for t in labels)


def test_from_json_redraws_a_saved_run_and_loads_nothing(tmp_path, capsys):
    from outpost.tools import bench_specialise  # noqa: PLC0415 (imports llama_cpp)

    saved = tmp_path / "run.json"
    saved.write_text(json.dumps(result()))
    assert bench_specialise.main(["--from-json", str(saved), "--svg", str(tmp_path / "curve.svg")]) == 0
    assert capsys.readouterr().out.strip() == table(result())
    assert ET.parse(tmp_path / "curve.svg").getroot().tag == f"{SVG}svg"


def test_a_real_teacher_needs_its_model_named(capsys):
    from outpost.tools import bench_specialise  # noqa: PLC0415

    with pytest.raises(SystemExit) as exited:
        bench_specialise.main(["--cloud-url", "http://127.0.0.1:9/v1"])
    assert exited.value.code == 2
    assert "--cloud-url needs --cloud-model" in capsys.readouterr().err


def test_the_base_row_and_the_curve_name_the_base_that_was_specialised():
    run = result(base_model="gemma-3-270m")
    assert table(run).splitlines()[2].startswith("gemma-3-270m ")
    labels = [t.text for t in ET.fromstring(curve_svg(run)).findall(f"{SVG}text")]
    assert "gemma-3-270m base 39.8%" in labels
    # A run saved before --base specialised SmolLM2.
    assert "smollm2-135m-instruct base 39.8%" in [t.text for t in ET.fromstring(curve_svg(result())).findall(f"{SVG}text")]
