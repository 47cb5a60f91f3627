"""Linear and uncertainty balancers."""
import pytest
import torch

from mtlsparse.balancers import BalanceContext, Linear, Uncertainty


def losses(a: float, b: float) -> dict[str, torch.Tensor]:
    return {"a": torch.tensor(a), "b": torch.tensor(b)}


def test_linear_is_preference_weighted_sum_plus_k0_penalty():
    bal = Linear(["a", "b"], k0=0.5, k=[0.2, 0.8])
    out = bal(losses(1.0, 2.0), torch.tensor(4.0), BalanceContext())
    assert float(out) == pytest.approx(0.2 * 1 + 0.8 * 2 + 0.5 * 4)
    assert bal.uses_penalty


def test_linear_default_k_is_uniform_and_ignores_penalty_when_k0_zero():
    bal = Linear(["a", "b", "c"])
    assert not bal.uses_penalty
    out = bal({"a": torch.tensor(3.0), "b": torch.tensor(6.0), "c": torch.tensor(0.0)}, torch.tensor(100.0),
              BalanceContext())
    assert float(out) == pytest.approx(3.0)


@pytest.mark.parametrize("k, msg", [([1.0], "k has 1 entries but the dataset has 2 tasks"),
                                    ([0.5, -0.1], "non-negative")])
def test_bad_k_is_a_clear_error(k, msg):
    with pytest.raises(ValueError, match=msg):
        Linear(["a", "b"], k=k)


def test_uncertainty_log_variances_get_gradients_and_move_towards_log_loss():
    """Kendall's optimum for fixed L_t is s_t = log L_t: the larger loss gets the larger s (smaller weight)."""
    bal = Uncertainty(["a", "b"])
    opt = torch.optim.SGD(bal.parameters(), lr=0.1)
    fixed = losses(4.0, 0.25)
    bal(fixed, None, BalanceContext()).backward()
    assert torch.all(bal.log_vars.grad != 0)
    for _ in range(300):
        opt.step()
        opt.zero_grad()
        bal(fixed, None, BalanceContext()).backward()
    torch.testing.assert_close(bal.log_vars.detach(), torch.log(torch.tensor([4.0, 0.25])), atol=1e-3, rtol=0)
    w = bal.state_summary()
    assert w["w/a"] < w["w/b"]


def test_uncertainty_parameters_are_in_the_module_optimizer():
    """The LightningModule's optimizer must see the log-variances (the reference never optimised them)."""
    from mtlsparse.models import HPS
    from mtlsparse.module import MultiTaskModule
    from mtlsparse.sparsity import Dense
    from mtlsparse.tasks import Task

    model = HPS({"a": Task("a"), "b": Task("b")}, in_shape=(1, 16, 16), kernel_size=3)
    bal = Uncertainty(["a", "b"])
    module = MultiTaskModule(model, bal, Dense(), optimizer=lambda p: torch.optim.Adam(p, lr=0.1))
    opt = module.configure_optimizers()
    assert any(p is bal.log_vars for g in opt.param_groups for p in g["params"])


GRADIENT_BALANCERS = ["mgda", "gradnorm", "pcgrad", "upgrad", "cagrad", "imtl_g"]


@pytest.mark.parametrize("balancer", GRADIENT_BALANCERS)
@pytest.mark.parametrize("mode", ["params", "representation"])
def test_gradient_balancers_on_a_model_without_shared_parameters_fail_at_setup(tiny_cfg, tmp_path, balancer, mode):
    """model=stl shares nothing: one line naming the balancer, the model and the fix, before any step runs."""
    from mtlsparse.errors import ConfigError
    from mtlsparse.train import run

    with pytest.raises(ConfigError) as caught:
        run(tiny_cfg("model=stl", f"balancer={balancer}", f"balancer.mode={mode}"), tmp_path)
    message = str(caught.value)
    assert type(caught.value) is ConfigError and "\n" not in message  # the CLI prints exactly this, exit code 2
    assert f"balancer={balancer}" in message and "(STL) has none" in message and "use balancer=linear" in message
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing trained


@pytest.mark.parametrize("balancer", ["linear", "uncertainty", "dwa", "famo", "rlw"])
def test_loss_weighting_balancers_still_train_model_stl(tiny_cfg, tmp_path, balancer):
    from mtlsparse.train import run

    assert 0 <= run(tiny_cfg("model=stl", f"balancer={balancer}"), tmp_path)["test/mean_acc"] <= 1
