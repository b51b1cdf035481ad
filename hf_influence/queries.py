"""The conditioning of a batch of queries: the class labels or prompts that go with the query images.

A conditional pipeline's query is its image *and* its condition (a class, a prompt): the same image
under another class has other scores. `QueryConditions` checks what a person gave against the task's
conditioning (none, class labels or prompts), uses a single value for every query, and gives it in
both forms the library needs: the keyword arguments of the pipeline's own `__call__` (to generate the
queries) and those of `Attributor.attribute` (to score them). The CLI and the Space both build one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .validation import check_integer

# conditioning kind → (what such a pipeline is, what its user is asked for)
CONDITIONINGS = {
    None: ("unconditional", ""),
    "labels": ("class-conditional", "choose a class label"),
    "prompts": ("text-conditional", "write a prompt"),
}


@dataclass(frozen=True)
class QueryConditions:
    """The checked conditioning of `count` queries of one pipeline.

    Attributes:
        count: the number of queries.
        labels: one class id per query for a class-conditional pipeline (DiT), else None.
        prompts: one prompt per query for a text-to-image pipeline (Stable Diffusion), else None.
    """

    count: int
    labels: list[int] | None = None
    prompts: list[str] | None = None

    @classmethod
    def for_task(
        cls,
        task: Any,
        count: int,
        labels: Any = None,
        prompts: Any = None,
        options: Mapping[str, str] | None = None,
    ) -> QueryConditions:
        """Check `labels` (class ids, or the pipeline's class names) or `prompts` against `task.conditioning`
        and give each of the `count` queries its own: one value given is used for every query.

        `options` names where a person gives each kind (e.g. `{"labels": "--label"}` on the command line, `{}` in
        a form), so that an error says what to change; without it (None) the errors name the Python arguments.
        A ValueError says what is missing or wrong.
        """
        if count < 1:
            raise ValueError(f"There must be at least one query, got {count}.")
        kind = None if task.conditioning is None else task.conditioning.kind
        described, ask = CONDITIONINGS[kind]
        given = {"labels": _as_list(labels), "prompts": _as_list(prompts)}
        for other, values in given.items():
            if values is not None and other != kind:
                state = "unconditional" if kind is None else f"conditioned on {kind}"
                named = _named(options or {}, other)
                raise ValueError(f"{other}= was given{named}, but this pipeline is {state}: it takes no {other}.")
        if kind is None:
            return cls(count)
        values = given[kind]
        if not values:
            each = f", one for all {count} queries or one per query" if count > 1 else ""
            hint = f" (it is conditioned on {kind}: pass {kind}=[...])" if options is None else ""
            raise ValueError(f"This pipeline is {described}: {ask}{_named(options or {}, kind)}{each}{hint}.")
        if len(values) not in (1, count):
            raise ValueError(
                f"{len(values)} {kind} were given for {count} queries{_named(options, kind)}: "
                "give one for all of them, or one per query."
            )
        values = values * count if len(values) == 1 else values
        if kind == "labels":
            return cls(count, labels=[_class_id(task.conditioning, value) for value in values])
        if not all(isinstance(value, str) and value.strip() for value in values):
            raise ValueError(f"This pipeline is {described}: {ask}{_named(options, kind)} (empty prompts say nothing).")
        return cls(count, prompts=values)

    def pipeline_kwargs(self, guidance_scale: float | None = None) -> dict[str, Any]:
        """The keyword arguments of the pipeline's `__call__` that sample these queries: `class_labels=`,
        `prompt=` or `batch_size=`, with `guidance_scale` when given (conditional pipelines only)."""
        if self.labels is not None:
            inputs: dict[str, Any] = {"class_labels": list(self.labels)}
        elif self.prompts is not None:
            inputs = {"prompt": list(self.prompts)}
        elif guidance_scale is not None:
            raise ValueError(
                f"guidance_scale={guidance_scale} was given, but this pipeline is unconditional: "
                "classifier-free guidance needs a class or a prompt."
            )
        else:
            return {"batch_size": self.count}
        if guidance_scale is not None:
            inputs["guidance_scale"] = guidance_scale
        return inputs

    def attribute_kwargs(self) -> dict[str, list]:
        """The keyword arguments of `Attributor.attribute` for these queries: `labels=`, `prompts=` or none."""
        if self.labels is not None:
            return {"labels": list(self.labels)}
        if self.prompts is not None:
            return {"prompts": list(self.prompts)}
        return {}


def _as_list(values: Any) -> list | None:
    """None, one value, or a sequence of values, as None or a list."""
    if values is None:
        return None
    return list(values) if isinstance(values, Sequence) and not isinstance(values, str) else [values]


def _named(options: Mapping[str, str], kind: str) -> str:
    return f" ({options[kind]})" if kind in options else ""


def _class_id(conditioning: Any, value: Any) -> int:
    """A class name (the pipeline's id2label, e.g. a DiT's) or a class id — typed ("7", 7.0) or not — as the id
    that both the pipeline's `class_labels=` and the task take."""
    typed_number = isinstance(value, str) and value not in conditioning.names and value.strip().isdigit()
    if typed_number or (isinstance(value, float) and value.is_integer()):
        value = check_integer("Class label", value, 0, conditioning.num_classes - 1)
    return conditioning.class_id(value)
