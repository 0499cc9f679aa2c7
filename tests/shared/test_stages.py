"""The stage plan of each kind of job: names, order, what each needs, epochs and resources."""

from typing import Any

from shared.jobs import JobRecord
from shared.specs import parse_job_spec
from shared.stages import plan_stages
from tests.specs import digits_spec

LAYER = {"units": 16, "activation": "sigmoid"}


def stacked(**changes: Any) -> dict[str, Any]:
    return {"kind": "stacked", "data": {"dataset": "digits"}, "layers": [LAYER, LAYER, LAYER],
            "training": {"epochs": 7}, "resources": {"workers": 2}, **changes}  # fmt: skip


def test_an_autoencoder_is_one_stage() -> None:
    (stage,) = plan_stages(parse_job_spec(digits_spec(epochs=9)))
    assert (stage.name, stage.needs, stage.epochs, stage.demand) == ("train", (), 9, {"CPU": 1})


def test_a_stack_is_a_chain_of_layers_then_the_finetune_beside_its_baseline() -> None:
    plan = plan_stages(parse_job_spec(stacked(finetune={"epochs": 3})))
    assert [(s.name, s.kind, s.needs, s.epochs) for s in plan] == [
        ("layer1", "layer", (), 7), ("layer2", "layer", ("layer1",), 7),
        ("layer3", "layer", ("layer2",), 7), ("finetune", "finetune", ("layer3",), 3),
        # from scratch, needing nothing: it trains beside the chain, for all of its epochs
        ("baseline", "scratch", (), 3 * 7 + 3),
    ]  # fmt: skip
    assert [s.layer for s in plan] == [0, 1, 2, None, None]
    assert all(s.demand == {"CPU": 2} for s in plan)


def test_a_stack_without_its_baseline_is_the_chain_alone() -> None:
    plan = plan_stages(parse_job_spec(stacked(baseline=False)))
    assert [s.name for s in plan] == ["layer1", "layer2", "layer3"]


def test_semisupervised_runs_the_baseline_beside_the_pretraining() -> None:
    spec = {
        "kind": "semisupervised", "data": {"dataset": "digits"}, "labeled_count": 50,
        "pretrain": {**stacked(), "resources": {"workers": 1, "gpus_per_worker": 0.5},
                     "data": None},
        "head": {"epochs": 11}, "resources": {"workers": 1, "cpus_per_worker": 2},
    }  # fmt: skip
    del spec["pretrain"]["data"]
    plan = {s.name: s for s in plan_stages(parse_job_spec(spec))}
    assert list(plan) == ["pretrain-layer1", "pretrain-layer2", "pretrain-layer3", "head",
                          "baseline"]  # fmt: skip
    assert plan["head"].needs == ("pretrain-layer3",) and plan["baseline"].needs == ()
    assert plan["pretrain-layer1"].demand == {"CPU": 1, "GPU": 0.5}
    assert plan["head"].demand == plan["baseline"].demand == {"CPU": 2}
    assert plan["head"].epochs == plan["baseline"].epochs == 11

    job = JobRecord.for_spec(parse_job_spec(spec))
    head = job.stage("head")
    assert head.epochs == 11 and head.resources == {"workers": 1, "CPU": 2}
    assert job.stage("pretrain-layer2").resources == {"workers": 1, "CPU": 1, "GPU": 0.5}
