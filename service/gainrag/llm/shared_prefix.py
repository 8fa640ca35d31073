"""Teacher forcing with shared prompt prefixes: each distinct prefix is computed once.

GainRAG's gain signal scores every (question, passage) pair of a training set with the reader:
the prompt is ``[chat template head][passage][question][answers]``, and the passage comes before
the question. Over a shard of questions the same retrieved passage is seen by several questions
(the job groups questions so that it is), and every prompt starts with the same template head.
So the prompts form a prefix tree of depth two:

    root (the tokens every sequence shares)
    -> node (a passage prefix shared by >= 2 sequences)
       -> leaf (what is left of one sequence: its question, then its replies packed)

:class:`SharedPrefixScorer` runs the root once, each node once on top of the root's key/value
cache, and each leaf on top of its node's (or the root's) cache, so the passage tokens of a
passage seen by n questions cost one forward pass instead of n. Leaves are batched by length with
a token budget; a batch's parents are right-padded to one length and masked. The LM head is
applied only at reply positions, and each sequence's reply logits are handed to a callback as
soon as its batch is done (a shard's full-vocabulary logits would not fit in memory).

Equivalence with scoring each sequence alone holds token for token: every leaf position sees the
same keys at the same positions as in the unshared sequence (the tests compare it with the
packed scorer of :mod:`gainrag.llm.scoring` in float32).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

from gainrag.llm.packed import PackedReplies

# Per layer (keys, values), each (kv_heads, length, head_dim): one node's cache, no batch dim.
KV = tuple[tuple[torch.Tensor, torch.Tensor], ...]
# Called with (sequence index, that sequence's reply logits, each (len(reply), vocab) float32).
ReplySink = Callable[[int, list[torch.Tensor]], None]


@dataclass(frozen=True)
class ScoringPlan:
    """How sequences share prefixes: the root length, nodes, and each sequence's node."""

    root: int  # tokens every sequence shares
    nodes: list[tuple[int, int]]  # (a member sequence, node length in tokens incl. the root)
    node_of: list[int | None]  # per sequence: its node, or None (directly on the root)

    def tokens(self, seqs: Sequence[PackedReplies]) -> int:
        """Tokens the plan runs through the model (unshared: ``sum(map(len, seqs))``)."""
        own = sum(n - self.root for _, n in self.nodes)
        leaves = sum(
            len(s) - (self.root if k is None else self.nodes[k][1])
            for s, k in zip(seqs, self.node_of, strict=True)
        )
        return self.root + own + leaves


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def plan_prefixes(
    seqs: Sequence[PackedReplies], groups: Sequence[Hashable | None], *, min_shared: int = 16
) -> ScoringPlan:
    """Plan a prefix tree for ``seqs``.

    ``groups`` names, per sequence, what may be shared with others (e.g. the passage id; None for
    nothing but the root). Within a group the shared prefix is the groups' longest common token
    prefix, so sharing never depends on how a template tokenises: it is read off the token ids.
    A node is made only for >= 2 sequences sharing >= ``min_shared`` tokens beyond the root.
    Every sequence keeps at least one prompt token of its own (the position that predicts its
    first reply token).
    """
    if not seqs:
        return ScoringPlan(0, [], [])
    if any(not s.prompt for s in seqs):
        raise ValueError("every sequence needs a prompt token (it predicts the first reply token)")
    root = min(len(s.prompt) - 1 for s in seqs)
    first = seqs[0].prompt
    for s in seqs[1:]:
        root = min(root, common_prefix(first, s.prompt))
    members: dict[Hashable, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        if g is not None:
            members[g].append(i)
    nodes: list[tuple[int, int]] = []
    node_of: list[int | None] = [None] * len(seqs)
    for idx in members.values():
        if len(idx) < 2:
            continue
        lead = seqs[idx[0]].prompt
        n = min(len(seqs[i].prompt) - 1 for i in idx)
        for i in idx[1:]:
            n = min(n, common_prefix(lead, seqs[i].prompt))
        if n - root < min_shared:
            continue
        for i in idx:
            node_of[i] = len(nodes)
        nodes.append((idx[0], n))
    return ScoringPlan(root, nodes, node_of)


def _batches(
    lengths: Sequence[int], order: Sequence[int], budget: int, max_rows: int
) -> list[list[int]]:
    """Consecutive runs of ``order`` whose padded size (rows x longest) stays within budget."""
    out: list[list[int]] = []
    cur: list[int] = []
    width = 0
    for i in order:
        w = max(width, lengths[i])
        if cur and (w * (len(cur) + 1) > budget or len(cur) >= max_rows):
            out.append(cur)
            cur, w = [], lengths[i]
        cur.append(i)
        width = w
    if cur:
        out.append(cur)
    return out


class SharedPrefixScorer:
    """Reply logits of many sequences at once, each distinct shared prefix computed once.

    ``model`` is a HF causal LM (decoder + output embeddings) whose attention accepts a custom 4D
    mask with a key/value cache (transformers' Llama/Qwen2 family). ``token_budget`` bounds a
    batch's rows x padded width (the activations of one forward pass).
    """

    def __init__(
        self, model: torch.nn.Module, *, token_budget: int = 2048, max_rows: int = 64
    ) -> None:
        self._model = model
        self.token_budget = token_budget
        self.max_rows = max_rows

    @property
    def dtype(self) -> torch.dtype:
        """The model's weight dtype (the additive mask's dtype)."""
        return next(self._model.parameters()).dtype

    @torch.inference_mode()
    def score(
        self,
        seqs: Sequence[PackedReplies],
        groups: Sequence[Hashable | None],
        sink: ReplySink,
        *,
        plan: ScoringPlan | None = None,
    ) -> ScoringPlan:
        """Hand every sequence's reply logits to ``sink``; returns the plan it ran.

        Sequences with no group run first, in one pass over the root (so a caller can put the
        baselines that every other result needs there); then each batch of nodes, followed by
        the leaves that hang from them, so only one batch of node caches is alive at a time.
        """
        if len(groups) != len(seqs):
            raise ValueError("one group per sequence")
        if not seqs:
            return plan or ScoringPlan(0, [], [])
        plan = plan or plan_prefixes(seqs, groups)
        if any(g is None and k is not None for g, k in zip(groups, plan.node_of, strict=True)):
            # the sequences with no group run first, on the root: callers rely on that order
            raise ValueError("a sequence without a group cannot hang from a node")
        root_ids = list(seqs[0].prompt[: plan.root])
        root = self._run_nodes([None], [root_ids])[0] if root_ids else None
        on_root = [i for i, k in enumerate(plan.node_of) if k is None]
        baselines_first = sorted(on_root, key=lambda i: (groups[i] is not None, len(seqs[i])))
        self._run_leaves(seqs, baselines_first, [(root, plan.root)] * len(seqs), sink)
        if not plan.nodes:
            return plan
        node_len = [n for _, n in plan.nodes]
        node_ids = [list(seqs[i].prompt[plan.root : n]) for i, n in plan.nodes]
        leaves_of: dict[int, list[int]] = defaultdict(list)
        for i, k in enumerate(plan.node_of):
            if k is not None:
                leaves_of[k].append(i)
        order = sorted(range(len(plan.nodes)), key=lambda k: node_len[k])
        for batch in _batches([len(x) for x in node_ids], order, self.token_budget, self.max_rows):
            kvs = self._run_nodes([root] * len(batch), [node_ids[k] for k in batch])
            parents: dict[int, tuple[KV | None, int]] = {}
            for k, kv in zip(batch, kvs, strict=True):
                for i in leaves_of[k]:
                    parents[i] = (kv, node_len[k])
            todo = sorted(parents, key=lambda i: len(seqs[i]) - parents[i][1])
            self._run_leaves(seqs, todo, parents, sink)
        return plan

    # -- forward passes -------------------------------------------------------------------

    def _forward(
        self,
        parents: Sequence[KV | None],
        ids: Sequence[list[int]],
        allowed_own: Sequence[torch.Tensor],
        positions: Sequence[torch.Tensor],
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], int]:
        """One batch: row b runs ``ids[b]`` on top of ``parents[b]`` (its cache).

        ``allowed_own[b]`` is the (n, n) mask among the row's own tokens and ``positions[b]``
        their offsets from the parent's end. Returns the hidden states (B, W, H), each layer's
        full (keys, values) (B, kvh, P + W, hd), and P (the padded parent length).
        """
        dev, dt = next(self._model.parameters()).device, self.dtype
        plen = [0 if p is None else p[0][0].shape[1] for p in parents]
        big_p, width, rows = max(plen), max(len(x) for x in ids), len(ids)
        inp = torch.zeros((rows, width), dtype=torch.long)
        pos = torch.zeros((rows, width), dtype=torch.long)
        allowed = torch.zeros((rows, width, big_p + width), dtype=torch.bool)
        for b, x in enumerate(ids):
            n = len(x)
            inp[b, :n] = torch.as_tensor(x)
            pos[b, :n] = positions[b] + plen[b]
            allowed[b, :n, : plen[b]] = True
            allowed[b, :n, big_p : big_p + n] = allowed_own[b]
            pad = torch.arange(n, width)
            allowed[b, pad, big_p + pad] = True  # padding attends to itself (never NaN)
        mask = torch.zeros((rows, 1, width, big_p + width), dtype=dt)
        mask.masked_fill_(~allowed[:, None], torch.finfo(dt).min)
        cache = None
        if big_p:
            from transformers import DynamicCache

            layers = []
            ref = next(p for p in parents if p is not None)
            for layer, (k_ref, v_ref) in enumerate(ref):
                k = k_ref.new_zeros((rows, k_ref.shape[0], big_p, k_ref.shape[2]))
                v = v_ref.new_zeros((rows, v_ref.shape[0], big_p, v_ref.shape[2]))
                for b, p in enumerate(parents):
                    if p is not None:
                        k[b, :, : plen[b]] = p[layer][0]
                        v[b, :, : plen[b]] = p[layer][1]
                layers.append((k, v))
            cache = DynamicCache(ddp_cache_data=layers)
        decoder = self._model.get_decoder()  # type: ignore[operator]
        out = decoder(
            input_ids=inp.to(dev),
            position_ids=pos.to(dev),
            attention_mask=mask.to(dev),
            past_key_values=cache if cache is not None else _empty_cache(),
            use_cache=True,
        )
        kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        return out[0], kv, big_p

    def _run_nodes(self, parents: Sequence[KV | None], ids: Sequence[list[int]]) -> list[KV]:
        """Caches of prompt segments (no replies) on top of their parents: parent + own."""
        own = [torch.ones(len(x), len(x), dtype=torch.bool).tril() for x in ids]
        offsets = [torch.arange(len(x)) for x in ids]
        _, kv, big_p = self._forward(parents, ids, own, offsets)
        out: list[KV] = []
        for b, p in enumerate(parents):
            n = len(ids[b])
            out.append(
                tuple(
                    (
                        torch.cat([p[li][0], k[b, :, big_p : big_p + n]], 1)
                        if p is not None
                        else k[b, :, big_p : big_p + n].clone(),
                        torch.cat([p[li][1], v[b, :, big_p : big_p + n]], 1)
                        if p is not None
                        else v[b, :, big_p : big_p + n].clone(),
                    )
                    for li, (k, v) in enumerate(kv)
                )
            )
        return out

    def _run_leaves(
        self,
        seqs: Sequence[PackedReplies],
        todo: Sequence[int],
        parents: dict[int, tuple[KV | None, int]] | Sequence[tuple[KV | None, int]],
        sink: ReplySink,
    ) -> None:
        """Each sequence's rest (prompt tail + packed replies) on its parent; logits to sink."""
        if not todo:
            return
        head = self._model.get_output_embeddings()  # type: ignore[operator]
        lengths = {i: len(seqs[i]) - parents[i][1] for i in todo}
        budget_len = [lengths.get(i, 0) for i in range(len(seqs))]
        for batch in _batches(budget_len, todo, self.token_budget, self.max_rows):
            ids, own, offsets, tails = [], [], [], []
            for i in batch:
                s, cut = seqs[i], parents[i][1]
                tail = list(s.prompt[cut:])
                ids.append(tail + [t for r in s.replies for t in r])
                a, o = _leaf_mask(len(tail), [len(r) for r in s.replies])
                own.append(a)
                offsets.append(o)
                tails.append(len(tail))
            hidden, _, _ = self._forward([parents[i][0] for i in batch], ids, own, offsets)
            for b, i in enumerate(batch):
                at, rows = tails[b], []
                for r in seqs[i].replies:
                    # reply token t is predicted by the prompt's last position (t = 0) or by
                    # the reply's own token t-1
                    rows.extend([tails[b] - 1, *range(at, at + len(r) - 1)])
                    at += len(r)
                logits = head(hidden[b, rows]).float()
                sink(i, list(logits.split([len(r) for r in seqs[i].replies])))


def _empty_cache() -> object:
    """A fresh key/value cache, so a pass with no parent still returns its keys and values."""
    from transformers import DynamicCache

    return DynamicCache()


def _leaf_mask(tail: int, replies: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask and position offsets of a prompt tail followed by packed replies: each reply sees
    the tail and itself (causally), never another reply, and its positions follow the tail."""
    n = tail + sum(replies)
    allowed = torch.zeros((n, n), dtype=torch.bool)
    allowed[:tail, :tail] = torch.ones(tail, tail, dtype=torch.bool).tril()
    pos = torch.zeros(n, dtype=torch.long)
    pos[:tail] = torch.arange(tail)
    at = tail
    for m in replies:
        allowed[at : at + m, :tail] = True
        allowed[at : at + m, at : at + m] = torch.ones(m, m, dtype=torch.bool).tril()
        pos[at : at + m] = torch.arange(tail, tail + m)
        at += m
    return allowed, pos
