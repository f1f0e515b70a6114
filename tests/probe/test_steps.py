"""The step rules (probe/steps.py) and the row builder (probe/rows.py) on hand-made numbers.

Every expected value below is worked out by hand from DESIGN "One step rule", not by calling the code:
g = [3, −4] has ‖g‖ = 5, so per unit lr the first-order gain ⟨g, scale·d⟩ is
    sgd         ‖g‖² = 25
    normalized  ‖g‖  = 5
    adam        Σ g²/(|g|+1e-8) = 9/3.00000001 + 16/4.00000001
Tensors are float64 so that adam's 1e-8 is visible (in float32, 3/(3+1e-8) rounds to 1).
"""

import math

import pytest
import torch

from teachdiag.probe.rows import MEASURED, make_row
from teachdiag.probe.signals import SIGNALS
from teachdiag.probe.steps import ADAM_EPS, OPTIMIZERS, RULES, apply_step, global_norm, rule

G = [3.0, -4.0]
ADAM_FIRST_ORDER = 9 / 3.00000001 + 16 / 4.00000001  # = 6.99999997...


def g64(values=G):
    return torch.tensor(values, dtype=torch.float64)


def test_the_three_rules_and_their_documented_defaults():
    assert OPTIMIZERS == ("sgd", "normalized", "adam")
    assert ADAM_EPS == 1e-8
    # README's --lr row: normalized 1e-3, sgd 1e-5, adam 1e-7
    assert {n: r.default_lr for n, r in RULES.items()} == {"sgd": 1e-5, "normalized": 1e-3, "adam": 1e-7}


def test_unknown_rule_is_a_value_error():
    with pytest.raises(ValueError, match="unknown step rule 'momentum'"):
        rule("momentum")


def test_global_norm_of_hand_made_tensors():
    assert global_norm([g64()]) == 5.0
    # spread over tensors of different shapes: 3 in one, −4 in a matrix → still 5
    assert global_norm([g64([3.0, 0.0]), g64([[0.0, -4.0], [0.0, 0.0]])]) == 5.0
    assert global_norm([g64([1.0, 2.0, 2.0]), g64([[4.0]])]) == pytest.approx(math.sqrt(25.0), rel=1e-15)
    assert global_norm([torch.zeros(3)]) == 0.0


@pytest.mark.parametrize("name,scale,first_order", [("sgd", 1.0, 25.0), ("normalized", 0.2, 5.0),
                                                     ("adam", 1.0, ADAM_FIRST_ORDER)])
def test_scale_and_first_order_for_g_3_minus_4(name, scale, first_order):
    r = rule(name)
    assert r.scale(5.0) == scale
    assert r.first_order([g64()], 5.0) == pytest.approx(first_order, rel=1e-15)
    lr = 1e-3  # what a probe reports as gain_first_order
    assert lr * r.first_order([g64()], 5.0) == pytest.approx(
        {"sgd": 0.025, "normalized": 0.005, "adam": ADAM_FIRST_ORDER * 1e-3}[name], rel=1e-15)


def test_first_order_sums_over_tensors():
    # g split over two tensors, [3] and [[−4]]: same answers as one tensor [3, −4]
    for name, want in (("sgd", 25.0), ("normalized", 5.0), ("adam", ADAM_FIRST_ORDER)):
        assert rule(name).first_order([g64([3.0]), g64([[-4.0]])], 5.0) == pytest.approx(want, rel=1e-15)


@pytest.mark.parametrize("name,d", [("sgd", [3.0, -4.0]), ("normalized", [3.0, -4.0]),
                                    ("adam", [3 / 3.00000001, -4 / 4.00000001])])
def test_direction(name, d):
    g = g64()
    directions, scale = rule(name).direction([g], 5.0)
    assert directions[0].tolist() == pytest.approx(d, rel=1e-15)
    assert scale == {"sgd": 1.0, "normalized": 0.2, "adam": 1.0}[name]


def test_adam_direction_overwrites_the_gradient_in_place():
    g = g64()
    directions, _ = rule("adam").direction([g], 5.0)
    assert directions[0] is g  # the same storage, no copy ...
    assert g.tolist() == pytest.approx([3 / 3.00000001, -4 / 4.00000001], rel=1e-15)  # ... now holding d


@pytest.mark.parametrize("name", ["sgd", "normalized"])
def test_d_equals_g_rules_leave_the_gradient_alone(name):
    g = g64()
    directions, _ = rule(name).direction([g], 5.0)
    assert directions[0] is g and g.tolist() == G


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_zero_gradient_means_no_step(name):
    r = rule(name)
    g = torch.zeros(2, dtype=torch.float64)
    directions, scale = r.direction([g], 0.0)
    assert float(scale * directions[0].abs().sum()) == 0.0  # normalized: scale 0, not 1/0
    assert r.first_order([torch.zeros(2, dtype=torch.float64)], 0.0) == 0.0
    assert rule("normalized").scale(0.0) == 0.0


def test_inner_and_batched_first_order():
    g = g64([[3.0, -4.0], [1.0, 0.0]])  # two positions' gradients
    # Σ g·d(g) per row: sgd/normalized 25 and 1; adam (9/3.00000001 + 16/4.00000001) and 1/1.00000001
    assert rule("sgd").inner(g, batch_dims=1).tolist() == [25.0, 1.0]
    assert rule("adam").inner(g, batch_dims=1).tolist() == pytest.approx([ADAM_FIRST_ORDER, 1 / 1.00000001],
                                                                          rel=1e-15)
    assert g.tolist() == [[3.0, -4.0], [1.0, 0.0]]  # inner never modifies g
    norms = torch.tensor([5.0, 1.0], dtype=torch.float64)
    assert rule("sgd").first_order_from(norms).tolist() == [25.0, 1.0]
    assert rule("normalized").first_order_from(norms).tolist() == [5.0, 1.0]
    with pytest.raises(ValueError, match="adam"):
        rule("adam").first_order_from(norms)  # adam needs Σ g·d(g), not only ‖g‖


def test_apply_step_by_hand():
    p = torch.nn.Parameter(g64([1.0, 2.0]))
    apply_step([p], [g64()], lr=0.1, scale=0.2)  # θ − 0.1·0.2·[3, −4] = [1 − 0.06, 2 + 0.08]
    assert p.tolist() == pytest.approx([0.94, 2.08], rel=1e-15)


# ---------------------------------------------------------------- rows.py

def before(**over):
    """Signals at θ0: exactly representable numbers so gains and ratios are exact."""
    b = dict.fromkeys(SIGNALS, 0.125)
    b.update(fkl=0.5, rkl=1.0)
    b.update(over)
    return b


def same(a: dict, b: dict) -> bool:
    """Dict equality with NaN == NaN."""
    return a.keys() == b.keys() and all(
        (isinstance(a[k], float) and math.isnan(a[k]) and math.isnan(b[k])) or a[k] == b[k] for k in a)


def test_make_row_by_hand():
    row = make_row(before(), fkl_after=0.25, rkl_after=0.75, grad_norm=5.0, gain_first_order=0.3, finite=True)
    want = before() | {"fkl_after": 0.25, "rkl_after": 0.75, "gain_fkl": 0.25, "gain_rkl": 0.25,
                       "rel_gain_fkl": 0.5, "rel_gain_rkl": 0.25, "grad_norm": 5.0, "gain_first_order": 0.3,
                       "finite": 1}
    assert same(row, want)
    assert set(MEASURED) <= set(row)


def test_make_row_relative_gain_is_nan_where_before_is_zero():
    row = make_row(before(fkl=0.0), fkl_after=0.0, rkl_after=1.5, grad_norm=0.0, gain_first_order=0.0,
                   finite=True)
    want = before(fkl=0.0) | {"fkl_after": 0.0, "rkl_after": 1.5, "gain_fkl": 0.0, "gain_rkl": -0.5,
                              "rel_gain_fkl": math.nan, "rel_gain_rkl": -0.5, "grad_norm": 0.0,
                              "gain_first_order": 0.0, "finite": 1}
    assert same(row, want)  # a zero KL before is finite: only the ratio is undefined


@pytest.mark.parametrize("case,finite", [
    ({"finite": True}, 1),
    ({"finite": False}, 0),  # the caller's logits check failed
    ({"grad_norm": math.nan}, 0),
    ({"grad_norm": math.inf}, 0),
    ({"before": before(union_fkl=math.nan)}, 0),  # any signal before the step
    ({"before": before(student_logprob=-math.inf)}, 0),
    ({"fkl_after": math.nan, "rkl_after": math.nan}, 1),  # linear mode: no step, flag kept
])
def test_make_row_finite_flag(case, finite):
    kw = {"before": before(), "fkl_after": 0.25, "rkl_after": 0.75, "grad_norm": 5.0, "gain_first_order": 0.3,
          "finite": True} | case
    row = make_row(**kw)
    assert row["finite"] == finite
    if math.isnan(kw["fkl_after"]):
        assert all(math.isnan(row[c]) for c in MEASURED)
