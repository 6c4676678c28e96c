"""Typed request bodies: pydantic checks every field's type, range and length before a handler runs.

Limits keep a request from holding the server (a 10,000-item pin list, a megabyte label): everything a person
can build in the page fits well inside them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

NodeId = str  # graph node ids are checked against the graph by the handlers
MAX_PINS = 500


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Supernode(Strict):
    id: str = Field(min_length=1, max_length=64)
    name: str = Field(max_length=200)
    members: list[NodeId] = Field(max_length=MAX_PINS)


class ViewState(Strict):
    """Everything a person builds on a graph: saved next to it and restored on reload."""

    pinned: list[NodeId] = Field(default_factory=list, max_length=MAX_PINS)
    supernodes: list[Supernode] = Field(default_factory=list, max_length=200)
    layout: dict[str, tuple[float, float]] = Field(default_factory=dict, max_length=2 * MAX_PINS)
    node_threshold: float = Field(default=0.8, gt=0, le=1)
    edge_threshold: float = Field(default=0.98, gt=0, le=1)
    rejected: list[list[NodeId]] = Field(default_factory=list, max_length=500)
    labels: dict[str, str] = Field(default_factory=dict, max_length=10_000)  # "L:F" -> label, without a database
    clicked: str = Field(default="", max_length=200)
    link_type: Literal["input", "output", "either", "both"] = "both"


class LabelEdit(Strict):
    node: NodeId = Field(max_length=200)
    label: str = Field(max_length=500)


class Pinned(Strict):
    pinned: list[NodeId] = Field(max_length=MAX_PINS)
    exclude: list[list[NodeId]] = Field(default_factory=list, max_length=500)


class TraceRequest(Strict):
    prompt: str = Field(min_length=1, max_length=2000)
    name: str = Field(default="", max_length=60)
    max_features: int | None = Field(default=400, ge=1, le=20_000)
    node_threshold: float = Field(default=0.8, gt=0, le=1)
    edge_threshold: float = Field(default=0.98, gt=0, le=1)


class SteerItem(Strict):
    nodes: list[NodeId] = Field(min_length=1, max_length=MAX_PINS)
    op: Literal["scale", "set"] = "scale"
    value: float = Field(ge=-1000, le=1000)
    positions: Literal["node", "all"] = "node"


class SteerRequest(Strict):
    items: list[SteerItem] = Field(min_length=1, max_length=100)
    mode: Literal["constrained", "free"] = "constrained"
    n_tokens: int = Field(default=8, ge=0, le=64)
