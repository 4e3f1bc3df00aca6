"""bench_specialise's report: the table and the learning-curve plot of a run's result
(the dict `--json` prints), apart from the run so `--from-json` redraws a saved one
without loading a model."""

from __future__ import annotations

from typing import Any


def curve_svg(result: dict[str, Any], width: int = 560, height: int = 300) -> str:
    """The learning curve as a small self-contained SVG (no plotting library on a device):
    held-out AST accuracy against logged examples, the base as a dashed line at 0."""
    left, right, top, bottom = 56, 20, 36, 44
    points = [(0, result["base"]["ast"])] + [(c["examples"], c["ast"]) for c in result["curve"]]
    x_max = max(x for x, _ in points) or 1

    def x_of(x: float) -> float:
        return left + (width - left - right) * x / x_max

    def y_of(y: float) -> float:
        return top + (height - top - bottom) * (1 - y)

    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'font-family="sans-serif" font-size="12">'),
           f'<rect width="{width}" height="{height}" fill="white"/>',
           (f'<text x="{left}" y="20" font-size="13">BFCL simple_python, held-out half '
            f'({result["heldout_questions"]} questions), {teacher(result).partition(" (")[0]}</text>')]
    for tick in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        y = y_of(tick)
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">{tick:.0%}</text>')
    target = y_of(0.7)
    out.append(f'<line x1="{left}" x2="{width - right}" y1="{target:.1f}" y2="{target:.1f}" '
               f'stroke="#c33" stroke-dasharray="6 4"/>')
    out.append(f'<text x="{width - right}" y="{target - 5:.1f}" text-anchor="end" fill="#c33">target 70%</text>')
    base_y = y_of(result["base"]["ast"])
    out.append(f'<line x1="{left}" x2="{width - right}" y1="{base_y:.1f}" y2="{base_y:.1f}" '
               f'stroke="#888" stroke-dasharray="2 3"/>')
    out.append(f'<text x="{width - right}" y="{base_y + 15:.1f}" text-anchor="end" fill="#666">'
               f'{base_model(result)} base {result["base"]["ast"]:.1%}</text>')
    path = " ".join(f"{x_of(x):.1f},{y_of(y):.1f}" for x, y in points)
    out.append(f'<polyline points="{path}" fill="none" stroke="#1f6fb4" stroke-width="2"/>')
    for x, y in points:
        out.append(f'<circle cx="{x_of(x):.1f}" cy="{y_of(y):.1f}" r="4" fill="#1f6fb4"/>')
        out.append(f'<text x="{x_of(x):.1f}" y="{y_of(y) - 9:.1f}" text-anchor="middle">{y:.1%}</text>')
        out.append(f'<text x="{x_of(x):.1f}" y="{height - bottom + 16}" text-anchor="middle">{x}</text>')
    out.append(f'<text x="{(left + width - right) / 2:.0f}" y="{height - 8}" text-anchor="middle">'
               f'logged examples the adapter was trained on (0 = the base)</text>')
    out.append('</svg>')
    return "\n".join(out) + "\n"


def teacher(result: dict[str, Any], loud: bool = False) -> str:
    """Who wrote the targets, as every table must say (`loud`: in capitals, where an
    oracle's right-by-construction targets could be mistaken for a real teacher's)."""
    if result.get("teacher", "").startswith("cloud"):
        return f"teacher: {result['teacher']}"
    # Runs saved before the `oracle` key said which oracle in the teacher's text only.
    oracle = result.get("oracle") or result.get("teacher", "").partition(", ")[2].rstrip(")") or "first"
    return f"{'ORACLE TEACHER' if loud else 'oracle teacher'} (BFCL's ground truth as the cloud, {oracle})"


def base_model(result: dict[str, Any]) -> str:
    """The base that was specialised (a run saved before `--base` specialised SmolLM2)."""
    return result.get("base_model", "smollm2-135m-instruct")


def table(result: dict[str, Any]) -> str:
    b = result["base"]
    also = result.get("also_logged") or []
    logged = f" (simple_python's training half and the questions of {', '.join(also)})" if also else ""
    lines = [(f"BFCL simple_python, {teacher(result, loud=True)}; "
              f"{result['train_questions']} questions logged in shadow mode{logged}, {result['heldout_questions']} "
              f"held out; {result['threads']} threads on {result['cores']} cores"),
             (f"{'model':<24} {'train ex':>8} {'AST':>6} {'valid':>6} {'local@t':>8} {'p50 ms':>7} "
              f"{'tok/s':>6} {'train s':>8} {'MiB':>5}"),
             (f"{base_model(result)[:24]:<24} {'-':>8} {b['ast']:>6.1%} {b['valid']:>6.1%} {b['local_share']:>8.1%} "
              f"{b['p50_ms']:>7.0f} {b['decode_tok_s'] or 0:>6.1f}")]
    for c in result["curve"]:
        lines.append(f"{c['adapter'].split()[0][:24]:<24} {c['examples']:>8} {c['ast']:>6.1%} {c['valid']:>6.1%} "
                     f"{c['local_share']:>8.1%} {c['p50_ms']:>7.0f} {c['decode_tok_s'] or 0:>6.1f} "
                     f"{c['train_wall_s']:>8.0f} {c['adapter_bytes'] / 2**20:>5.1f}")
    spec = result.get("specialise") or {}
    if spec:
        lines.append(f"gate: {spec['decision']} ({spec['reason']})")
    full = max(result["curve"], key=lambda c: c["examples"])
    if result.get("cloud_usd_per_request") is not None:
        saved = (full["local_share"] - b["local_share"]) * 1000 * result["cloud_usd_per_request"]
        lines.append(f"kept local at the threshold: {b['local_share']:.1%} -> {full['local_share']:.1%}; "
                     f"cloud cost saved ${saved:.4f} per 1,000 requests")
    sw = result.get("switching")
    if sw:
        lines.append(f"switching: one adapter p50 {sw['one_adapter_p50_ms']:.0f} ms, two alternating "
                     f"{sw['alternating_p50_ms']:.0f} ms; the switch call {sw['switch_call_ms']:.2f} ms")
    return "\n".join(lines)

