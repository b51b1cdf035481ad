"""QueryConditions: a query's class or prompt checked against the task's conditioning, one value used
for every query, and given both to the pipeline's `__call__` and to `Attributor.attribute`."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from hf_influence.conditioning import Captions, ClassLabels
from hf_influence.queries import QueryConditions

UNCONDITIONAL = SimpleNamespace(conditioning=None)
LABELS = SimpleNamespace(conditioning=ClassLabels("label", 10, names={"three": 3}))
PROMPTS = SimpleNamespace(conditioning=SimpleNamespace(kind=Captions.kind))  # only the kind is read
CLI_OPTIONS = {"labels": "--label", "prompts": "--prompt"}


def test_one_value_is_used_for_every_query():
    labels = QueryConditions.for_task(LABELS, 3, labels=7)
    assert labels.labels == [7, 7, 7] and labels.prompts is None
    assert labels.pipeline_kwargs(guidance_scale=1.5) == {"class_labels": [7, 7, 7], "guidance_scale": 1.5}
    assert labels.attribute_kwargs() == {"labels": [7, 7, 7]}
    assert QueryConditions.for_task(LABELS, 2, labels=["three", "8"]).labels == [3, 8]  # names and typed ids

    prompts = QueryConditions.for_task(PROMPTS, 2, prompts="a seven")
    assert prompts.pipeline_kwargs() == {"prompt": ["a seven", "a seven"]}
    assert prompts.attribute_kwargs() == {"prompts": ["a seven", "a seven"]}
    assert QueryConditions.for_task(PROMPTS, 2, prompts=["a", "b"]).prompts == ["a", "b"]

    unconditional = QueryConditions.for_task(UNCONDITIONAL, 4)
    assert unconditional.pipeline_kwargs() == {"batch_size": 4}
    assert unconditional.attribute_kwargs() == {}


@pytest.mark.parametrize(
    ("task", "given", "message"),
    [
        (UNCONDITIONAL, {"labels": [1]}, r"labels= was given \(--label\), but this pipeline is unconditional"),
        (
            LABELS,
            {"prompts": ["a seven"]},
            r"prompts= was given \(--prompt\), but this pipeline is conditioned on labels",
        ),
        (LABELS, {}, r"class-conditional: choose a class label \(--label\), one for all 2 queries or one per query"),
        (LABELS, {"labels": [1, 2, 3]}, r"3 labels were given for 2 queries \(--label\)"),
        (LABELS, {"labels": [1, 10]}, "Class label must be a whole number between 0 and 9, got 10"),
        (LABELS, {"labels": ["seven"]}, "Unknown class name 'seven'"),
        (PROMPTS, {"prompts": ["a seven", "  "]}, r"text-conditional: write a prompt \(--prompt\)"),
    ],
)
def test_refusals_say_what_to_change(task, given, message):
    with pytest.raises(ValueError, match=message):
        QueryConditions.for_task(task, 2, options=CLI_OPTIONS, **given)


def test_refusals_without_options_and_guidance_without_a_condition():
    with pytest.raises(ValueError, match=r"class-conditional: choose a class label\.$"):  # the Space's wording
        QueryConditions.for_task(LABELS, 1, options={})
    with pytest.raises(ValueError, match="at least one query"):
        QueryConditions.for_task(UNCONDITIONAL, 0)
    with pytest.raises(ValueError, match=r"guidance_scale=2\.0 was given, but this pipeline is unconditional"):
        QueryConditions.for_task(UNCONDITIONAL, 1).pipeline_kwargs(guidance_scale=2.0)
