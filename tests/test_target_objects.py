"""Trust regions as objects: ``TRAM(base, model, target=...)``, the string shorthand, TRAMFisher."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import tram
from tests.helpers import cross_entropy_closure
from tram import targets


class Net(nn.Module):
    def __init__(self, seed: int = 0, dropout: float = 0.2) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(20, 8)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.drop(self.embed(tokens).mean(dim=1)))


def run(make: Any, steps: int = 4) -> tuple[list[float], list[Tensor], Any]:
    model = Net()
    optimizer = make(torch.optim.AdamW(model.parameters(), lr=0.05), model)
    generator = torch.Generator().manual_seed(3)
    for _ in range(steps):
        tokens = torch.randint(0, 20, (10, 6), generator=generator)
        labels = torch.randint(0, 3, (10,), generator=generator)

        def closure(tokens: Tensor = tokens, labels: Tensor = labels) -> Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(tokens), labels)
            loss.backward()
            return loss

        optimizer.step(closure)
    return list(optimizer.radius_history), [p.detach() for p in model.parameters()], optimizer


def assert_same(a: tuple, b: tuple) -> None:
    assert a[0] == b[0]
    for x, y in zip(a[1], b[1], strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize(
    ("shorthand", "target"),
    [
        (
            {"trust_region": "noise", "sigma": 0.3, "seed": 5},
            lambda: targets.NoisedInputs(sigma=0.3, seed=5),
        ),
        (
            {"trust_region": "noise", "noise": "uniform", "sigma": 0.3},
            lambda: targets.NoisedInputs(sigma=0.3, noise="uniform"),
        ),
        ({"trust_region": "pretrained"}, targets.Pretrained),
        (
            {"trust_region": "pretrained", "reference_dtype": torch.bfloat16},
            lambda: targets.Pretrained(dtype=torch.bfloat16),
        ),
        ({"trust_region": "previous"}, targets.Previous),
        ({"trust_region": "ema", "ema_decay": 0.8}, lambda: targets.EMA(decay=0.8)),
    ],
    ids=["noise", "uniform", "pretrained", "pretrained-bf16", "previous", "ema"],
)
def test_the_shorthand_equals_the_object(shorthand: dict, target: Any) -> None:
    by_name = run(lambda base, model: tram.TRAM(base, model, **shorthand))
    by_object = run(lambda base, model: tram.TRAM(base, model, target=target()))
    assert_same(by_name, by_object)
    assert by_name[0][-1] > 0
    assert by_object[2].trust_region == shorthand["trust_region"]


def test_the_target_name_is_a_shorthand_too() -> None:
    assert_same(
        run(lambda base, model: tram.TRAM(base, model, target="previous")),
        run(lambda base, model: tram.TRAM(base, model, trust_region="previous")),
    )


def test_options_that_change_the_target_change_the_run() -> None:
    """Guards against a shorthand option silently dropped on the way to the target."""
    base_run = run(lambda base, model: tram.TRAM(base, model, trust_region="ema", ema_decay=0.8))
    other = run(lambda base, model: tram.TRAM(base, model, trust_region="ema", ema_decay=0.6))
    assert base_run[0][1:] != other[0][1:]
    gaussian = run(lambda base, model: tram.TRAM(base, model, sigma=0.3))
    uniform = run(lambda base, model: tram.TRAM(base, model, sigma=0.3, noise="uniform"))
    assert gaussian[0] != uniform[0]


class Teacher(targets.Target):
    """A user's target: a fixed teacher network's output, d = KL(teacher ‖ model)."""

    name = "teacher"

    def __init__(self, teacher: nn.Module) -> None:
        self.teacher = teacher
        self.calls = 0

    def output(self, args: tuple, kwargs: dict) -> Tensor:
        self.calls += 1
        return self.teacher(*args, **kwargs)


def test_a_users_target_measures_its_own_divergence() -> None:
    teacher = Net(seed=9, dropout=0.0)
    model = Net(dropout=0.0)  # d is the plain KL of the two outputs
    target = Teacher(teacher)
    optimizer = tram.TRAM(torch.optim.SGD(model.parameters(), lr=0.1), model, target=target)
    tokens = torch.randint(0, 20, (10, 6))
    labels = torch.randint(0, 3, (10,))
    with torch.no_grad():
        expected = F.kl_div(
            F.log_softmax(model(tokens), -1),
            F.log_softmax(teacher(tokens), -1),
            log_target=True,
            reduction="batchmean",
        )

    optimizer.step(cross_entropy_closure(optimizer, model, tokens, labels))
    assert target.calls == 1
    assert optimizer.trust_region == "teacher"
    assert optimizer.radius_history[0] == pytest.approx(float(expected), rel=1e-5)


class _ScaledTeacher(targets.Target):
    """A user's target that keeps Target's default name, with state of its own."""

    def __init__(self, teacher: nn.Module, scale: float) -> None:
        self.teacher, self.scale = teacher, torch.tensor(scale)

    def output(self, args: tuple, kwargs: dict) -> Tensor:
        return self.teacher(*args, **kwargs) * self.scale

    def state_dict(self) -> dict:
        return {"scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.scale = state["scale"].clone()


class _ShiftedTeacher(_ScaledTeacher):
    def output(self, args: tuple, kwargs: dict) -> Tensor:
        return self.teacher(*args, **kwargs) + self.scale


def test_targets_that_keep_the_default_name_never_load_each_others_state() -> None:
    teacher = Net(seed=9, dropout=0.0)
    model = Net(dropout=0.0)
    saved = tram.TRAM(
        torch.optim.SGD(model.parameters(), lr=0.1), model, target=_ScaledTeacher(teacher, 0.7)
    ).state_dict()
    assert saved["param_groups"][0]["tram"]["target"] == "target:_ScaledTeacher"
    same = tram.TRAM(
        torch.optim.SGD(model.parameters(), lr=0.1), model, target=_ScaledTeacher(teacher, 0.3)
    )
    same.load_state_dict(saved)
    assert same.target.scale.item() == pytest.approx(0.7)
    other = tram.TRAM(
        torch.optim.SGD(model.parameters(), lr=0.1), model, target=_ShiftedTeacher(teacher, 0.3)
    )
    with pytest.raises(ValueError, match=r"target:_ScaledTeacher.*target:_ShiftedTeacher"):
        other.load_state_dict(saved)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"trust_region": "pretrained", "sigma": 0.3},
            TypeError,
            "unexpected option sigma of trust_region='pretrained'",
        ),
        ({"trust_region": "noise", "ema_decay": 0.8}, TypeError, "unexpected option ema_decay"),
        (  # the options it does take, in TRAM's spelling (not the target's decay and dtype)
            {"trust_region": "ema", "sigma": 0.3},
            TypeError,
            r"of trust_region='ema' \(it takes: ema_decay, reference_dtype\)",
        ),
        (
            {"trust_region": "fisher", "ema_decay": 0.8},
            TypeError,
            "unexpected option ema_decay of trust_region='fisher', which measures no divergence",
        ),
        (
            {"trust_region": "previous", "rho": 0.2},
            TypeError,
            "rho is an option of trust_region='fisher'",
        ),
        (
            {"target": targets.Pretrained(), "sigma": 0.3},
            TypeError,
            "configure it there, not with sigma",
        ),
        (
            {"target": targets.Pretrained(), "trust_region": "pretrained"},
            TypeError,
            "not with trust_region",
        ),
        ({"target": "noise", "trust_region": "ema"}, ValueError, "disagree"),
        ({"target": 3}, TypeError, "target must be a tram.targets.Target or a name, but got int"),
        ({"trust_region": "prior"}, ValueError, "Invalid trust_region: 'prior'"),
        ({"trust_region": "ema", "ema_decay": 1.5}, ValueError, r"Invalid ema_decay: 1\.5"),
        ({"target": targets.EMA(decay=0.9), "eta": -1.0}, ValueError, "Invalid eta"),
    ],
)
def test_bad_target_arguments_are_refused(kwargs: dict, error: type, match: str) -> None:
    model = Net()
    with pytest.raises(error, match=match):
        tram.TRAM(torch.optim.SGD(model.parameters(), lr=0.1), model, **kwargs)


@pytest.mark.parametrize("region", ["pretrained", "previous", "ema"])
def test_a_weight_target_whose_parameters_were_replaced_is_refused(region: str) -> None:
    """A head replaced after TRAM was built: its copy in the reference would stand in for the
    new head (same shape: silently the old head's values). Refused at the next first pass,
    naming the parameter; the weights stay at θ."""
    model = Net()
    optimizer = tram.TRAM(torch.optim.SGD(model.parameters(), lr=0.1), model, trust_region=region)
    closure = cross_entropy_closure(
        optimizer, model, torch.randint(0, 20, (10, 6)), torch.randint(0, 3, (10,))
    )
    optimizer.step(closure)
    model.head = nn.Linear(8, 3)
    optimizer.base_optimizer.param_groups[0]["params"][-2:] = list(model.head.parameters())
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"parameter 'head\.weight' is not the one its"):
        optimizer.step(closure)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))


def test_a_target_serves_one_optimizer() -> None:
    model = Net()
    target = targets.Pretrained()
    tram.TRAM(torch.optim.SGD(model.parameters(), lr=0.1), model, target=target)
    with pytest.raises(RuntimeError, match="already bound"):
        tram.TRAM(torch.optim.SGD(model.parameters(), lr=0.1), model, target=target)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("target", targets.Pretrained()),
        ("replay_dropout", False),
        ("divergence", tram.get_divergence("l2")),
        ("logits_fn", lambda output: output),
    ],
)
def test_what_d_is_measured_with_is_fixed_at_construction(name: str, value: Any) -> None:
    """The recorder that measures d holds these; a later assignment to the optimizer would
    change what it reports without changing what it measures, so it raises instead."""
    model = Net()
    optimizer = tram.TRAM(torch.optim.SGD(model.parameters(), lr=0.1), model, sigma=0.3)
    before = getattr(optimizer, name)
    with pytest.raises(AttributeError):
        setattr(optimizer, name, value)
    assert getattr(optimizer, name) is before


def test_bad_target_objects_are_refused() -> None:
    with pytest.raises(ValueError, match=r"Invalid sigma: -0\.1"):
        targets.NoisedInputs(sigma=-0.1)
    with pytest.raises(ValueError, match="Invalid noise: 'laplace'"):
        targets.NoisedInputs(noise="laplace")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Invalid decay: 1\.2"):
        targets.EMA(decay=1.2)


# ----------------------------------------------------------------------------- TRAM-Fisher
def test_fisher_shorthand_builds_tram_fisher_with_its_rho_and_eta() -> None:
    model = Net()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer = tram.TRAM(base, model, trust_region="fisher", sigma=0.3, rho=0.07, fisher_eta=0.2)
    assert isinstance(optimizer, tram.TRAMFisher)
    assert (base.param_groups[0]["rho"], base.param_groups[0]["eta"]) == (0.07, 0.2)
    assert optimizer.sigma == 0.3
    assert optimizer.trust_region == "fisher"
    assert optimizer.last_radius is None
    shorthand = run(
        lambda b, m: tram.TRAM(b, m, trust_region="fisher", sigma=0.3, rho=0.07, fisher_eta=0.2)
    )
    direct = run(lambda b, m: tram.TRAMFisher(b, m, sigma=0.3, rho=0.07, eta=0.2))
    assert_same(shorthand, direct)


def test_fisher_shorthand_refuses_the_divergence_options() -> None:
    model = Net()
    with pytest.raises(TypeError, match="unexpected option eta, max_radius"):
        tram.TRAM(
            torch.optim.SGD(model.parameters(), lr=0.1),
            model,
            trust_region="fisher",
            eta=0.01,
            max_radius=1.0,
        )


def test_tram_fisher_loads_a_checkpoint_of_the_shorthand_era() -> None:
    """Before TRAM-Fisher had its own class, its groups called its eta ``fisher_eta``."""
    model = Net()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer = tram.TRAMFisher(base, model, rho=0.07, eta=0.2)
    state = optimizer.state_dict()
    state["param_groups"] = [
        {**{k: v for k, v in g.items() if k != "eta"}, "eta": 0.0, "fisher_eta": 0.3}
        for g in state["param_groups"]
    ]
    with pytest.warns(UserWarning, match=r"eta=0.2 -> 0.3 \(param group 0\)"):
        optimizer.load_state_dict(state)
    assert base.param_groups[0]["eta"] == 0.3
    assert "fisher_eta" not in base.param_groups[0]


def test_tram_fisher_converts_a_shorthand_era_state_dict_a_load_pre_hook_returns() -> None:
    """Load pre-hooks run first, as torch runs them; the dict a hook returns (here: one in the
    shorthand era's names) is the one converted and loaded. Before, the conversion ran before
    the hooks, so this dict's ``fisher_eta`` was loaded as an unknown key and ``eta`` silently
    kept the constructor's value."""
    model = Net()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer = tram.TRAMFisher(base, model, rho=0.07, eta=0.2)
    state = optimizer.state_dict()

    def to_the_shorthand_era(opt: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        groups = [
            {**{k: v for k, v in g.items() if k != "eta"}, "fisher_eta": 0.3}
            for g in state_dict["param_groups"]
        ]
        return {**state_dict, "param_groups": groups}

    optimizer.register_load_state_dict_pre_hook(to_the_shorthand_era)
    with pytest.warns(UserWarning, match=r"eta=0.2 -> 0.3 \(param group 0\)"):
        optimizer.load_state_dict(state)
    assert base.param_groups[0]["eta"] == 0.3
    assert "fisher_eta" not in base.param_groups[0]


# ----------------------------------------------------------------------------- radius_every
class CountingNet(Net):
    def __init__(self) -> None:
        super().__init__(dropout=0.0)
        self.forwards = 0

    def forward(self, tokens: Tensor) -> Tensor:
        self.forwards += 1
        return super().forward(tokens)


def batches(steps: int) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(4)
    return [
        (
            torch.randint(0, 20, (10, 6), generator=generator),
            torch.randint(0, 3, (10,), generator=generator),
        )
        for _ in range(steps)
    ]


def closure_of(optimizer: Any, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Any:
    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(batch[0]), batch[1])
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("region", ["noise", "pretrained", "previous"])
def test_radius_every_reuses_the_last_d_and_skips_the_reference_forward(region: str) -> None:
    options = {"sigma": 0.3} if region == "noise" else {}
    model = CountingNet()
    optimizer = tram.TRAM(
        torch.optim.AdamW(model.parameters(), lr=0.05),
        model,
        trust_region=region,
        radius_every=3,
        **options,
    )
    used = []
    forwards = []
    for batch in batches(7):
        before = model.forwards
        optimizer.step(closure_of(optimizer, model, batch))
        used.append(optimizer.last_radius)
        forwards.append(model.forwards - before)
    assert forwards == [3, 2, 2, 3, 2, 2, 3]
    measured = optimizer.radius_history
    assert len(measured) == 3
    assert used == [measured[0]] * 3 + [measured[1]] * 3 + [measured[2]]

    # The steps are ASAM steps (eta = 0) whose radius is the d in use: the same weights.
    reference_model = CountingNet()
    asam = tram.ASAM(torch.optim.AdamW(reference_model.parameters(), lr=0.05), rho=0.0, eta=0.0)
    for batch, radius in zip(batches(7), used, strict=True):
        asam.param_groups[0]["rho"] = radius
        asam.step(closure_of(asam, reference_model, batch))
    for p, q in zip(model.parameters(), reference_model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_radius_every_with_ascent_every_measures_every_kth_ascent() -> None:
    model = CountingNet()
    optimizer = tram.TRAM(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model,
        trust_region="pretrained",
        ascent_every=2,
        radius_every=2,
    )
    forwards = []
    for batch in batches(9):
        before = model.forwards
        optimizer.step(closure_of(optimizer, model, batch))
        forwards.append(model.forwards - before)
    # ascents at steps 0, 2, 4, 6, 8; d measured at 0, 4, 8.
    assert forwards == [3, 1, 2, 1, 3, 1, 2, 1, 3]
    assert len(optimizer.radius_history) == 3


def noise_tram_measuring_every_third_step(model: nn.Module) -> tram.TRAM:
    return tram.TRAM(
        torch.optim.AdamW(model.parameters(), lr=0.05),
        model,
        trust_region="noise",
        sigma=0.3,
        radius_every=3,
    )


def test_radius_every_resumes_bit_exactly_between_measurements() -> None:
    build = noise_tram_measuring_every_third_step
    data = batches(6)
    straight_model = CountingNet()
    straight = build(straight_model)
    for batch in data:
        straight.step(closure_of(straight, straight_model, batch))

    first_model = CountingNet()
    first = build(first_model)
    for batch in data[:2]:  # stop after step 1: step 2 reuses the d of step 0
        first.step(closure_of(first, first_model, batch))
    checkpoint = {"model": first_model.state_dict(), "optimizer": first.state_dict()}
    assert checkpoint["optimizer"]["param_groups"][0]["tram"]["last_radius"] == first.last_radius

    model = CountingNet()
    resumed = build(model)
    model.load_state_dict(checkpoint["model"])
    resumed.load_state_dict(checkpoint["optimizer"])
    for batch in data[2:]:
        resumed.step(closure_of(resumed, model, batch))
    for p, q in zip(model.parameters(), straight_model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert resumed.radius_history == straight.radius_history[1:]


def test_a_reused_radius_of_one_rank_resumes_in_one_process() -> None:
    """A checkpoint whose reused d is the saving rank's own (``local_ascent=True`` in a group:
    ``last_radius_per_rank``) gives it back in one process, which has no other rank to measure
    for; in a group every rank measures afresh (``test_distributed``). A value that is not a
    bool is refused, naming the key, with the optimizer left as it was."""
    build = noise_tram_measuring_every_third_step
    data = batches(3)
    first_model = CountingNet()
    first = build(first_model)
    for batch in data[:2]:
        first.step(closure_of(first, first_model, batch))
    state = copy.deepcopy(first.state_dict())
    entry = state["param_groups"][0]["tram"]
    assert entry["last_radius_per_rank"] is False  # one process: nobody else's d
    entry["last_radius_per_rank"] = True  # as saved by rank 0 of a local ascent

    model = CountingNet()
    model.load_state_dict(first_model.state_dict())
    resumed = build(model)
    # A copy: torch's load keeps the state's tensors (the step counts among them), which the
    # resumed steps then advance, and the entry would no longer match the base state after.
    resumed.load_state_dict(copy.deepcopy(state))
    assert resumed.last_radius == first.last_radius
    resumed.step(closure_of(resumed, model, data[2]))
    assert resumed.radius_history == []  # reused, not measured
    assert resumed.state_dict()["param_groups"][0]["tram"]["last_radius_per_rank"] is True

    for bad in ("yes", 1, None, torch.tensor([True, False])):
        entry["last_radius_per_rank"] = bad
        fresh = build(CountingNet())
        with pytest.raises(ValueError, match=r"'last_radius_per_rank' must be True or False"):
            fresh.load_state_dict(state)
        assert fresh.last_radius is None
        assert fresh.steps == 0
    entry["last_radius_per_rank"] = torch.tensor(True)  # torch.distributed.checkpoint's form
    fresh = build(CountingNet())
    fresh.load_state_dict(state)
    assert fresh.last_radius == first.last_radius


@pytest.mark.parametrize("value", [0, -2, 1.5, True])
def test_bad_radius_every_is_refused(value: Any) -> None:
    model = Net()
    with pytest.raises(ValueError, match="Invalid radius_every"):
        tram.TRAM(torch.optim.SGD(model.parameters(), lr=0.1), model, radius_every=value)
