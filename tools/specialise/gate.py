"""S6: promote an adapter only when held-out traffic says it is better.

Both candidates, the incumbent (the base, or the adapter promoted before) and the new
adapter, answer the same held-out examples with the same decoding and the same
grammar. The outcomes are paired, so the test is McNemar's, exact: of the examples
exactly one of them got right, `b` went to the candidate and `c` to the incumbent;
under "no better" each is the candidate's with probability 1/2, so the one-sided
p-value is P(X >= b) for X ~ Binomial(b + c, 1/2). The candidate is promoted when
p < alpha (0.05 by default), its calls are valid at least as often as the
incumbent's, and it decides between calling and answering (tool_choice auto) right at
least as often: a small held-out set needs a clear margin, which is the point, and an
adapter that calls where it should answer is not promoted on the strength of its calls.

What this module must not do: run models (evaluate.py) or touch the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb

ALPHA = 0.05


def mcnemar_p(b: int, c: int) -> float:
    """One-sided exact McNemar: P(X >= b), X ~ Binomial(b + c, 1/2); 1.0 with no discordant pair."""
    n = b + c
    if n == 0:
        return 1.0
    return sum(comb(n, k) for k in range(b, n + 1)) / 2 ** n


@dataclass(frozen=True)
class Verdict:
    promote: bool
    reason: str
    p_value: float
    wins: int  # held-out examples only the candidate got right (b)
    losses: int  # ... only the incumbent got right (c)
    candidate_accuracy: float
    incumbent_accuracy: float
    candidate_validity: float
    incumbent_validity: float
    alpha: float = ALPHA
    candidate_decisions: float = 1.0  # share of examples decided right (call or answer)
    incumbent_decisions: float = 1.0


Row = tuple[bool, bool] | tuple[bool, bool, bool]  # (right, valid[, decided right: True if absent])


def decide(candidate: list[Row], incumbent: list[Row], alpha: float = ALPHA) -> Verdict:
    """Each list: (correct, valid, decided right) per held-out example, in the same order."""
    if len(candidate) != len(incumbent):
        raise ValueError("the candidates must answer the same examples")
    n = len(candidate)
    wins = sum(1 for c, i in zip(candidate, incumbent) if c[0] and not i[0])
    losses = sum(1 for c, i in zip(candidate, incumbent) if i[0] and not c[0])
    p = mcnemar_p(wins, losses)

    def share(rows: list[Row], i: int) -> float:
        return sum(r[i] if i < len(r) else True for r in rows) / n if n else 0.0

    tally = f"{wins} win{'s' * (wins != 1)}, {losses} loss{'es' * (losses != 1)}"
    acc_c, acc_i = share(candidate, 0), share(incumbent, 0)
    val_c, val_i = share(candidate, 1), share(incumbent, 1)
    dec_c, dec_i = share(candidate, 2), share(incumbent, 2)
    if n == 0:
        promote, reason = False, "no held-out examples"
    elif val_c < val_i:
        promote, reason = False, f"fewer valid calls ({val_c:.1%} vs {val_i:.1%})"
    elif dec_c < dec_i:
        promote, reason = False, f"decides worse between calling and answering ({dec_c:.1%} vs {dec_i:.1%})"
    elif wins <= losses:
        promote, reason = False, f"not better ({tally})"
    elif p >= alpha:
        promote, reason = False, (f"better, but not clearly: {tally}, "
                                  f"p = {p:.3f} >= {alpha}")
    else:
        promote, reason = True, f"{tally}, exact McNemar p = {p:.2g} < {alpha}"
    return Verdict(promote=promote, reason=reason, p_value=p, wins=wins, losses=losses,
                   candidate_accuracy=acc_c, incumbent_accuracy=acc_i,
                   candidate_validity=val_c, incumbent_validity=val_i, alpha=alpha,
                   candidate_decisions=dec_c, incumbent_decisions=dec_i)
