"""fc2.references: every holder of a replaced o_proj points at the new module afterwards.

The holders mirror the engines': vLLM's MLA wrapper registers the same o_proj as its own submodule
(and DeepSeek's ``MLAModules`` dataclass keeps one); vllm-ascend's MLA / SFA impls are plain
objects held by the attention layer with ``self.o_proj``; FlashComm1 puts linears in the
compilation config's ``static_forward_context`` dict; a bound method, a tuple, a namedtuple and a
cycle are there too. Without the rewrite the old linear would keep running.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import torch
from torch import nn

from fc2.references import MAX_OBJECT_DEPTH, find_references, retarget


@dataclass
class Modules:  # like vLLM's MLAModules
    o_proj: nn.Module
    kv_b_proj: nn.Module


class Impl:  # like vllm-ascend's AscendMLAImpl: a plain object, kept by the attention layer
    def __init__(self, o_proj):
        self.o_proj = o_proj
        self.project = o_proj.forward  # a bound method of the old module
        self.pair = (o_proj, 3)
        self.named = collections.namedtuple("Pair", "proj n")(o_proj, 1)
        self.owner = None


class Wrapper(nn.Module):  # like MultiHeadLatentAttentionWrapper
    def __init__(self, modules: Modules):
        super().__init__()
        self.o_proj = modules.o_proj
        self.impl = Impl(modules.o_proj)
        self.impl.owner = self  # a cycle

    def forward(self, x):
        return self.impl.project(x)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.o_proj = nn.Linear(4, 4)
        self.kv_b_proj = nn.Linear(4, 4)
        self.modules_ = Modules(self.o_proj, self.kv_b_proj)
        self.mla_attn = Wrapper(self.modules_)


def test_retarget_reaches_every_holder_and_find_sees_none_left():
    model = nn.ModuleDict({"layer": Attention()})
    attention = model["layer"]
    old = attention.o_proj
    new = nn.Linear(4, 4)
    forward_context = {"model.layer.o_proj": old, "model.layer.attn": attention.mla_attn}
    roots = [("model", model), ("static_forward_context", forward_context)]
    assert len(find_references(roots, [old])) >= 8  # the holders exist before the rewrite

    rewritten = retarget(roots, {old: new})

    assert attention.o_proj is new and attention.mla_attn.o_proj is new and attention.modules_.o_proj is new
    impl = attention.mla_attn.impl
    assert impl.o_proj is new and impl.pair[0] is new and impl.pair[1] == 3
    assert impl.named.proj is new and type(impl.named).__name__ == "Pair"
    assert impl.project.__self__ is new
    assert forward_context["model.layer.o_proj"] is new
    assert attention.kv_b_proj is not new and impl.owner is attention.mla_attn
    assert find_references(roots, [old]) == {}
    assert len(rewritten) >= 7
    x = torch.randn(2, 4)
    assert torch.equal(attention.mla_attn(x), new(x))


def test_find_reports_a_holder_it_cannot_rewrite():
    old, new = nn.Linear(2, 2), nn.Linear(2, 2)
    holder = nn.Module()
    holder.keep = frozenset({(old, 1)})  # a tuple inside a frozenset: no holder can be rebuilt
    roots = [("model", holder)]
    retarget(roots, {old: new})
    assert list(find_references(roots, [old])) == ["model.keep[0][0]"]


def test_depth_is_bounded_below_each_module():
    old, new = nn.Linear(2, 2), nn.Linear(2, 2)
    holder = nn.Module()
    deep = chain = {}
    for _ in range(MAX_OBJECT_DEPTH + 2):
        chain["next"] = {}
        chain = chain["next"]
    chain["o_proj"] = old
    holder.deep = deep
    retarget([("model", holder)], {old: new})
    assert chain["o_proj"] is old  # beyond the bound: not walked (and not found either)
    assert find_references([("model", holder)], [old]) == {}
