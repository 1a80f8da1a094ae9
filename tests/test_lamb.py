"""LAMB against steps worked out by hand (plain Python floats, the paper's Algorithm 2), and
the optimizer factory."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mlm_dist.optim import Lamb, build_optimizer


def lamb_reference(w: list[float], grads: list[list[float]], lr: float, beta1: float,
                   beta2: float, eps: float, wd: float) -> list[float]:
    """LAMB on one tensor, element by element in float64, written from the paper."""
    w = list(w)
    m = [0.0] * len(w)
    v = [0.0] * len(w)
    for t, g in enumerate(grads, start=1):
        m = [beta1 * mi + (1 - beta1) * gi for mi, gi in zip(m, g)]
        v = [beta2 * vi + (1 - beta2) * gi * gi for vi, gi in zip(v, g)]
        m_hat = [mi / (1 - beta1 ** t) for mi in m]
        v_hat = [vi / (1 - beta2 ** t) for vi in v]
        r = [mh / (math.sqrt(vh) + eps) + wd * wi for mh, vh, wi in zip(m_hat, v_hat, w)]
        w_norm = math.sqrt(sum(x * x for x in w))
        r_norm = math.sqrt(sum(x * x for x in r))
        ratio = w_norm / r_norm if w_norm > 0 and r_norm > 0 else 1.0
        w = [wi - lr * ratio * ri for wi, ri in zip(w, r)]
    return w


def test_first_step_by_hand():
    # w = (3, 4): |w| = 5. At t=1 bias correction makes m̂ = g and v̂ = g², so
    # r = g/(|g| + eps) + wd·w = (0.6/0.600001, -0.8/0.800001) + 0.01·(3, 4).
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    w.grad = torch.tensor([0.6, -0.8], dtype=torch.float64)
    Lamb([w], lr=0.1, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01).step()
    r = (0.6 / 0.600001 + 0.03, -0.8 / 0.800001 + 0.04)
    ratio = 5.0 / math.hypot(*r)
    expected = (3.0 - 0.1 * ratio * r[0], 4.0 - 0.1 * ratio * r[1])
    assert ratio == pytest.approx(5.0 / math.hypot(1.03, -0.96), rel=1e-5)
    torch.testing.assert_close(w.detach(), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_several_steps_match_the_paper(wd):
    w0 = [0.5, -1.25, 2.0, 0.0, 0.75]
    grads = [[0.1, -0.2, 0.3, 0.05, -0.4], [-0.3, 0.1, 0.2, 0.0, 0.5],
             [0.2, 0.2, -0.1, -0.05, 0.1], [0.0, -0.5, 0.4, 0.3, 0.2]]
    hp = dict(lr=0.05, beta1=0.9, beta2=0.999, eps=1e-6, wd=wd)
    w = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    opt = Lamb([w], lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"], weight_decay=wd)
    for g in grads:
        w.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    expected = lamb_reference(w0, grads, **hp)
    torch.testing.assert_close(w.detach(), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-10, atol=1e-12)


def test_zero_norm_guards():
    # A zero-initialised bias: |w| = 0, so the ratio is 1 and the step is plain Adam's,
    # lr·sign(g) at t=1 (up to eps).
    b = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    b.grad = torch.tensor([2.0, -0.5, 1e-3], dtype=torch.float64)
    # A tensor whose update is 0 (zero grad, no decay): |r| = 0, ratio 1, nothing moves.
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    w.grad = torch.zeros(2, dtype=torch.float64)
    opt = Lamb([{"params": [b, w], "weight_decay": 0.0}], lr=0.1, eps=1e-8)
    opt.step()
    torch.testing.assert_close(b.detach(), torch.tensor([-0.1, 0.1, -0.1], dtype=torch.float64),
                               rtol=1e-4, atol=0)
    torch.testing.assert_close(w.detach(), torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert torch.isfinite(b).all() and torch.isfinite(w).all()


def test_trust_ratio_is_per_tensor_and_groups_keep_their_decay():
    # Two tensors in two groups (decayed / not) step exactly as each would alone.
    torch.manual_seed(0)
    a0, c0 = torch.randn(4, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    ga, gc = torch.randn(4, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    a, c = torch.nn.Parameter(a0.clone()), torch.nn.Parameter(c0.clone())
    a.grad, c.grad = ga.clone(), gc.clone()
    Lamb([{"params": [a], "weight_decay": 0.1}, {"params": [c], "weight_decay": 0.0}],
         lr=0.01).step()
    expected_a = lamb_reference(a0.flatten().tolist(), [ga.flatten().tolist()], 0.01, 0.9, 0.999,
                                1e-6, 0.1)
    expected_c = lamb_reference(c0.tolist(), [gc.tolist()], 0.01, 0.9, 0.999, 1e-6, 0.0)
    torch.testing.assert_close(a.detach().flatten(), torch.tensor(expected_a, dtype=torch.float64))
    torch.testing.assert_close(c.detach(), torch.tensor(expected_c, dtype=torch.float64))


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(1)
    model = torch.nn.Linear(5, 3)
    twin = torch.nn.Linear(5, 3)
    twin.load_state_dict(model.state_dict())
    opt, twin_opt = Lamb(model.parameters(), lr=0.01), Lamb(twin.parameters(), lr=0.01)
    x = torch.randn(8, 5)
    for step in range(3):
        for m, o in ((model, opt), (twin, twin_opt)):
            o.zero_grad()
            m(x + step).pow(2).sum().backward()
            o.step()
        if step == 0:
            twin_opt = Lamb(twin.parameters(), lr=0.01)
            twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # as torch.load gives it
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_bf16_parameters_step_and_stay_finite():
    w = torch.nn.Parameter(torch.randn(16, 16).bfloat16())
    w.grad = torch.randn(16, 16).bfloat16()
    Lamb([w], lr=1e-2).step()
    assert w.dtype == torch.bfloat16 and torch.isfinite(w.float()).all()


def test_build_optimizer():
    model = torch.nn.Linear(4, 2)
    groups = [{"params": [model.weight], "weight_decay": 0.01},
              {"params": [model.bias], "weight_decay": 0.0}]
    adamw = build_optimizer(groups, name="adamw", lr=1e-3, betas=(0.9, 0.999), eps=1e-6,
                            weight_decay=0.01, device="cpu")
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["fused"]
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.01, 0.0]
    lamb = build_optimizer(groups, name="lamb", lr=1e-3, betas=(0.9, 0.999), eps=1e-6,
                           weight_decay=0.01)
    assert isinstance(lamb, Lamb) and [g["weight_decay"] for g in lamb.param_groups] == [0.01, 0.0]
    with pytest.raises(ValueError, match="optim.name"):
        build_optimizer(groups, name="sgd", lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0)


@pytest.mark.parametrize("name", ["adamw", "lamb"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_guarded_optimizer_skips_a_non_finite_step_on_the_device(name, bad):
    """A skipped step changes nothing (weights, moments, step counts), so skip-then-step
    equals the step alone; and it is decided without a host read: DeepSpeed's `overflow`
    stays False, the verdict is the 0-d `found_inf` the divergence guard counts."""
    def build(model, skip_non_finite):
        return build_optimizer([{"params": list(model.parameters())}], name=name, lr=1e-2,
                               betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                               skip_non_finite=skip_non_finite)

    def set_grads(model, bias_1):
        model.weight.grad = torch.full_like(model.weight, 0.5)
        model.bias.grad = torch.tensor([1.0, bias_1])

    torch.manual_seed(0)
    model, twin = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    twin.load_state_dict(model.state_dict())
    guarded, plain = build(model, True), build(twin, False)
    before = copy.deepcopy(model.state_dict())
    set_grads(model, bad)
    guarded.step()
    assert not guarded.overflow and guarded.found_inf.item() == 1.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for state in guarded.state.values():  # created, but as a fresh optimizer has it
        assert state["step"].item() == 0
        assert not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    for m, o in ((model, guarded), (twin, plain)):
        set_grads(m, 1.0)
        o.step()
    assert guarded.found_inf.item() == 0.0
    assert not torch.equal(before["weight"], model.weight)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
