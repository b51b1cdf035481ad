"""Module partitions: the layers split into groups of about equal factor bytes, fitted one group per pass over
the data, so that the covariances held at once are those of the largest group (fitting and planning agree)."""

from __future__ import annotations


def balanced_groups(shapes: dict[str, tuple[int, int]], count: int) -> list[list[str]]:
    """The layers of weight `shapes` (d_out, d_in) in at most `count` non-empty groups of about equal factor
    size `d_in² + d_out²`: the largest placed first, each into the lightest group (no group exceeds an equal
    share by more than the largest layer); each group keeps the order of `shapes`."""
    sizes = {name: d_out * d_out + d_in * d_in for name, (d_out, d_in) in shapes.items()}
    groups: list[list[str]] = [[] for _ in range(count)]
    loads = [0] * count
    for name in sorted(sizes, key=lambda name: -sizes[name]):
        lightest = loads.index(min(loads))
        groups[lightest].append(name)
        loads[lightest] += sizes[name]
    order = {name: position for position, name in enumerate(sizes)}
    return [sorted(group, key=order.__getitem__) for group in groups if group]
