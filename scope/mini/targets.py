"""Stage 2's attention targets and read-outs: where chosen LM heads must look, and what they must carry.

Without them the toy LM sits on a long plateau of answer priors: ``TARGET_HEADS`` tell chosen heads where to
look (the names of the question's objects, their image tokens, the relation words of a spatial question, the
correct option's value word), and logit-lens read-outs (``READOUTS``) make the heads carry what the answer
needs (an option's letter, the objects' positions). ``turn_targets`` finds them in one question/answer turn,
``Grounding`` collects them over a batch and ``aux_losses`` turns them into losses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import rotate_half  # RoPE as the Llama layers apply it

from scope.mini.scenes import RENDER_SIZE, Scene
from scope.mini.sequences import Seq
from scope.mini.tower import head_slice


class AttentionInputs:
    """Forward pre-hooks keeping the inputs of chosen LM attention layers, for the grounding loss."""

    def __init__(self, model, layers: list[int]):
        self.inputs: dict[int, tuple] = {}
        lm_layers = model.model.language_model.layers
        self.handles = [
            lm_layers[i].self_attn.register_forward_pre_hook(self._hook(i), with_kwargs=True) for i in layers
        ]

    def _hook(self, i):
        def hook(module, args, kwargs):
            self.inputs[i] = (module, kwargs["hidden_states"], kwargs["position_embeddings"])

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _head_logp(attn, h, cos, sin, qb: torch.Tensor, qp: torch.Tensor, head: int) -> torch.Tensor:
    """Log attention weights [n, L] of ``head`` from the queries (``qb``, ``qp``), from the layer's input."""
    hd = attn.head_dim
    q = head_slice(attn.q_proj, h[qb, qp], hd, head)  # [n, hd]
    k = head_slice(attn.k_proj, h, hd, head)  # [B, L, hd]
    c, s = cos.expand(h.shape[0], -1, -1), sin.expand(h.shape[0], -1, -1)  # [B, L, hd]: positions per row
    q = q * c[qb, qp] + rotate_half(q) * s[qb, qp]
    k = k * c + rotate_half(k) * s
    b, n_keys = k.shape[:2]
    # every query against every row's keys in one matmul, then each query's own row: gathering k[qb] instead
    # ([n, L, hd], hundreds of queries a batch) made a full-token stage-2 step 2.2 s instead of 1.7 s
    logits = (q @ k.reshape(b * n_keys, -1).T).view(len(qb), b, n_keys)[torch.arange(len(qb)), qb]
    logits = logits.float() * attn.scaling  # [n, L]
    causal = torch.arange(h.shape[1])[None, :] > qp[:, None]
    return torch.log_softmax(logits.masked_fill(causal, float("-inf")), dim=-1)


def grounding_loss(
    cap: AttentionInputs,
    qb: torch.Tensor,
    qp: torch.Tensor,
    target: torch.Tensor,
    layers: tuple[int, ...] | None = None,
    head: int = 0,
) -> torch.Tensor:
    """-log of the attention mass ``head`` of ``layers`` puts on the ``target`` keys, from chosen queries.

    ``qb``/``qp``: batch row and position of each query; ``target`` [n, L] marks the keys it should attend to
    (the image tokens of the objects an answer depends on, or words of the conversation). Recomputed from the
    captured layer input (RoPE included), so the LM keeps its fast SDPA kernel. This is attention supervision
    at training time only: it teaches the toy LM *where* to look, which it otherwise finds only after a long
    plateau.
    """
    losses = []
    for i, (attn, h, (cos, sin)) in cap.inputs.items():
        if layers is not None and i not in layers:
            continue
        logp = _head_logp(attn, h, cos, sin, qb, qp, head)
        losses.append(-torch.logsumexp(logp.masked_fill(~target, float("-inf")), dim=-1).mean())
    return torch.stack(losses).mean()


def head_output(
    cap: AttentionInputs, layer: int, head: int, qb: torch.Tensor, qp: torch.Tensor
) -> torch.Tensor:
    """What ``head`` of LM ``layer`` adds to the residual stream at the queries (``qb``, ``qp``): [n, D].

    Its attention-weighted values through its slice of ``o_proj``, recomputed from the captured layer input
    (equal to the head's share of the eager attention output).
    """
    attn, h, (cos, sin) = cap.inputs[layer]
    hd = attn.head_dim
    w = _head_logp(attn, h, cos, sin, qb, qp, head).exp()  # [n, L]
    v = head_slice(attn.v_proj, h, hd, head)  # [B, L, hd]
    b, n_keys = v.shape[:2]
    rows = F.one_hot(qb, b).to(w.dtype)[:, :, None] * w[:, None, :]  # [n, B, L]: weights in the query's row
    mixed = rows.reshape(len(qb), b * n_keys).to(v.dtype) @ v.reshape(b * n_keys, hd)
    return mixed @ _o_columns(attn, head)


def head_values(
    cap: AttentionInputs, layer: int, head: int, qb: torch.Tensor, kp: torch.Tensor
) -> torch.Tensor:
    """What ``head`` of LM ``layer`` would add from keys (``qb``, ``kp``) alone: their values through its
    slice of ``o_proj``, [n, D] (``head_output`` is the attention-weighted mean of these)."""
    attn, h, _ = cap.inputs[layer]
    v = head_slice(attn.v_proj, h[qb, kp], attn.head_dim, head)  # [n, hd]
    return v @ _o_columns(attn, head)


def _o_columns(attn, head: int) -> torch.Tensor:
    """The head's columns of ``o_proj``, transposed: [hd, D] (a head's value -> its share of the output)."""
    hd = attn.head_dim
    return attn.o_proj.weight[:, head * hd : (head + 1) * hd].T


def readout_loss(model, x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``lm_head(norm(x))`` against ``token``: a logit-lens target on a hidden vector."""
    logits = model.lm_head(model.model.language_model.norm(x)).float()
    return F.cross_entropy(logits, token)


# Attention targets of stage 2: kind -> (LM layers, head). Layer indices past the LM's depth mean its last
# layer. Two objects (spatial questions: "a" is named first) get separate heads, so their positions reach
# the answer unmixed; multiple choice adds the copy from the answer to the option's letter.
TARGET_HEADS = {
    "name_a": ((0,), 0),  # answer position -> colour/shape words naming object a in the question
    "name_b": ((0,), 1),  # ... naming object b (the same words as a when the question names one thing)
    "object_a": ((1, 2), 0),  # answer position -> image tokens of object a (all referenced objects if one)
    "object_b": ((1, 2), 1),  # ... of object b
    "letter": ((0,), 2),  # each option's value word -> its letter ("B . red": red -> B)
    "option": ((3,), 0),  # answer position -> the value word of the correct option
    "relation": ((0,), 3),  # answer position -> the relation words of a spatial question (left, right, ...)
    # opt-in (OPTIONAL_TARGETS), spatial questions only: answer position -> image tokens of object a / b, as
    # object_a / object_b, for heads whose values carry the object's position (the "where" read-outs)
    "where_a": ((1,), 2),
    "where_b": ((1,), 3),
}
# Read-out targets (logit lens through the tied output embedding), for multiple choice: the letter copy is
# a chain the toy LM never found by itself (with the option head on the right word, its letter logits stayed
# flat). "letter_read": an option's value word carries its letter into the layer the option head reads;
# "option_read": what that head adds at the answer position predicts the correct letter.
# For spatial questions: on an earlier checkpoint (74.6%, trained without these) no head output at the answer held
# either object's position (ridge R^2 <= 0.01), although the normed inputs of LM layers 0-2 do (R^2
# 0.66-0.78 on each object's mean token). So two heads ("where_a", "where_b") look at the two objects, and
# "where_patch": what they would carry from each object token alone predicts its object's (row, column)
# through one linear probe trained alongside and discarded; "where_read": what they add at the answer
# predicts the same through the same probe (so their difference is the offset); "relation_read": what they
# and the relation head add at the answer predicts the answer word through the logit lens (it is linear in
# the positions' difference). Fine-tuning that checkpoint with the probes alone left spatial at chance.
# "glyph_read", for reading questions: what the object heads (object_a, all its layers) add at the answer
# predicts the digit through the logit lens, as "option_read" does for the letter.
READOUTS = ("letter_read", "option_read")
# Switched by ``--where`` (on by default; the model card's training notes give the runs with and without).
OPTIONAL_TARGETS = ("where_a", "where_b")
OPTIONAL_READOUTS = ("where_read", "relation_read", "glyph_read")
# What --where adds (glyph_read is left out: with it, reading went from 39% to 36%).
WHERE_READOUTS = ("where_read", "relation_read")
DEFAULT_TARGETS = tuple(k for k in TARGET_HEADS if k not in OPTIONAL_TARGETS)


def object_position(scene: Scene, ref: int) -> tuple[float, float]:
    """(row, column) of object ``ref``'s centre, scaled to [-2, 2] (quarters of the image from its middle)."""
    o = scene.objects[ref]
    return 4 * o.y / RENDER_SIZE - 2, 4 * o.x / RENDER_SIZE - 2


def turn_targets(
    seq: Seq, ids: list[int], qa: dict, qpos: int, owners: torch.Tensor | None = None, img_start: int = 3
) -> list[tuple[str, int, torch.Tensor]]:
    """Attention targets of one question/answer turn: ``(kind, query position, key positions)`` per target.

    In ``Seq``'s layout the question words sit right before ``ASSISTANT :`` (``qpos`` is the colon). Names
    are the colour and shape words of the question proper (before the first "?", so options do not count);
    ``owners`` (1 + object index per kept image token, 0 = background) gives the object targets from
    ``qa["refs"]``; without it there are none.
    """
    n_words = len(seq.words(qa["question"]))
    span = list(range(qpos - 1 - n_words, qpos - 1))
    qmark = next((k for k, p in enumerate(span) if ids[p] == seq.qmark), len(span))
    names = [p for p in span[: qmark + 1] if ids[p] in seq.names]
    out: list[tuple[str, int, torch.Tensor]] = []
    pair = qa["family"] == "spatial" and len(names) >= 2 and len(qa["refs"]) == 2
    name_a, name_b = (names[: len(names) // 2], names[len(names) // 2 :]) if pair else (names, names)
    for kind, keys in (("name_a", name_a), ("name_b", name_b)):
        if keys:
            out.append((kind, qpos, torch.tensor(keys, dtype=torch.long)))
    if owners is not None and qa["refs"]:
        groups = [qa["refs"][:1], qa["refs"][1:]] if pair else [qa["refs"], qa["refs"]]
        kinds = (("object_a", "where_a"), ("object_b", "where_b")) if pair else (("object_a",), ("object_b",))
        for names_, refs in zip(kinds, groups):
            hit = torch.isin(owners.long(), torch.tensor(refs, dtype=torch.long) + 1)
            if hit.any():
                out += [(kind, qpos, hit.nonzero()[:, 0] + img_start) for kind in names_]
    if pair:
        relations = [p for p in span[: qmark + 1] if ids[p] in seq.relations]
        if relations:
            out.append(("relation", qpos, torch.tensor(relations, dtype=torch.long)))
    if qa["family"] == "choice":
        for p in span[qmark + 1 : -2]:
            if ids[p] in seq.letters and ids[p + 1] == seq.dot:
                out.append(("letter", p + 2, torch.tensor([p], dtype=torch.long)))
                if ids[p] == seq.v[qa["answer"]]:
                    out.append(("option", qpos, torch.tensor([p + 2], dtype=torch.long)))
    return out


@dataclass
class BatchTargets:
    """The auxiliary targets found in one stage-2 batch (rows are batch rows, positions token positions)."""

    found: dict[str, list[tuple[int, int, torch.Tensor]]]  # kind -> [(row, query position, key positions)]
    where: list = field(default_factory=list)  # (row, answer position, (row, col) of a, of b, answer token)
    patch_where: list = field(
        default_factory=list
    )  # (row, object token positions, their objects' (row, col))
    glyphs: list = field(default_factory=list)  # (row, answer position, answer token) of reading questions


class Grounding:
    """The heads that ``targets`` and ``readouts`` train, hooks capturing their layers' inputs, and (for the
    "where" read-outs) a linear probe trained alongside and not saved; ``remove()`` takes the hooks off."""

    def __init__(self, model, targets: tuple[str, ...], readouts: tuple[str, ...]):
        n_layers = len(model.model.language_model.layers)
        self.heads = {  # kind -> (LM layers, head); layers past the LM's depth mean its last layer
            k: (tuple(sorted({min(i, n_layers - 1) for i in TARGET_HEADS[k][0]})), TARGET_HEADS[k][1])
            for k in targets
        }
        self.readouts = readouts
        self.cap = AttentionInputs(model, sorted({i for layers, _ in self.heads.values() for i in layers}))
        self.where_probe = None
        if "where_read" in readouts and {"where_a", "where_b"} <= set(self.heads):
            self.where_probe = nn.Linear(model.config.text_config.hidden_size, 2)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.where_probe.parameters()) if self.where_probe is not None else []

    def remove(self) -> None:
        self.cap.remove()

    def new_batch(self) -> BatchTargets:
        return BatchTargets(found={k: [] for k in self.heads})

    def collect(self, out: BatchTargets, seq: Seq, b: int, scene: Scene, qas, ids, qpos, owners, img_start):
        """Add the targets of batch row ``b`` (its conversation ``ids`` about ``scene``) to ``out``."""
        if self.where_probe is not None:
            obj = owners.long()
            table = torch.tensor([object_position(scene, j) for j in range(len(scene.objects))])
            out.patch_where.append((b, (obj > 0).nonzero()[:, 0] + img_start, table[obj[obj > 0] - 1]))
        for qa, qp in zip(qas, qpos):
            for kind, q, keys in turn_targets(seq, ids, qa, qp, owners, img_start):
                if kind in out.found:
                    out.found[kind].append((b, q, keys))
            if "glyph_read" in self.readouts and qa["family"] == "reading" and "object_a" in self.heads:
                out.glyphs.append((b, qp, seq.v[qa["answer"]]))
            if self.where_probe is not None and qa["family"] == "spatial" and len(qa["refs"]) == 2:
                pos = (object_position(scene, j) for j in qa["refs"])
                out.where.append((b, qp, *pos, seq.v[qa["answer"]]))


def aux_losses(model, g: Grounding, targets: BatchTargets, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The grounding and read-out losses of a batch whose forward pass ``g`` has just captured, by kind."""
    parts = attention_losses(model, g, targets.found, ids)
    if targets.glyphs:  # what the object heads bring to the answer names the digit written on the object
        qb, qp, token = (torch.tensor([x[k] for x in targets.glyphs]) for k in (0, 1, 2))
        layers, head = g.heads["object_a"]
        brought = sum(head_output(g.cap, layer, head, qb, qp) for layer in layers)
        parts["glyph_read"] = readout_loss(model, brought, token)
    if targets.where:
        parts |= where_losses(model, g, targets.where)
    if targets.patch_where:
        parts["where_patch"] = patch_where_loss(g, targets.patch_where)
    return parts


def attention_losses(model, g: Grounding, found: dict, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """``grounding_loss`` of every kind found, each followed by the read-out that rides on it (multiple
    choice: ``letter_read`` on the letter head's targets, ``option_read`` on the option head's)."""
    parts = {}
    for kind, hits in found.items():
        if not hits:
            continue
        target = torch.zeros(len(hits), ids.shape[1], dtype=torch.bool)
        for n, (_, _, keys) in enumerate(hits):
            target[n, keys] = True
        qb, qp = torch.tensor([h[0] for h in hits]), torch.tensor([h[1] for h in hits])
        parts[kind] = grounding_loss(g.cap, qb, qp, target, *g.heads[kind])
        key = torch.stack([k[0] for *_, k in hits])  # letter: the letter; option: the value word
        if kind == "letter" and "letter_read" in g.readouts and "option" in g.heads:
            h = g.cap.inputs[g.heads["option"][0][0]][1]  # input of the option head's layer
            parts["letter_read"] = readout_loss(model, h[qb, qp], ids[qb, key])
        if kind == "option" and "option_read" in g.readouts:
            layer, head = g.heads[kind][0][0], g.heads[kind][1]
            letter = ids[qb, key - 2]  # "B . red": the letter sits 2 before the value word
            parts["option_read"] = readout_loss(model, head_output(g.cap, layer, head, qb, qp), letter)
    return parts


def where_losses(model, g: Grounding, where: list) -> dict[str, torch.Tensor]:
    """What the two "where" heads add at the answer of a spatial question: each object's (row, column)
    through the probe (``where_read``) and, with the relation head's output, the answer (``relation_read``)."""
    heads = g.heads
    qb, qp = (torch.tensor([w[k] for w in where]) for k in (0, 1))
    out_a, out_b = (head_output(g.cap, heads[k][0][0], heads[k][1], qb, qp) for k in ("where_a", "where_b"))
    target = {k: torch.tensor([w[k] for w in where], dtype=torch.float32) for k in (2, 3)}
    parts = {
        "where_read": torch.stack(
            [F.mse_loss(g.where_probe(out.float()), target[k]) for k, out in ((2, out_a), (3, out_b))]
        ).mean()
    }
    if "relation_read" in g.readouts and "relation" in heads:
        # the relation head brings the asked pair of words; the answer is linear in the positions'
        # difference, so the two "where" heads' outputs can pick it through the logit lens
        rel = head_output(g.cap, heads["relation"][0][0], heads["relation"][1], qb, qp)
        answer = torch.tensor([w[4] for w in where])
        parts["relation_read"] = readout_loss(model, out_a + out_b + rel, answer)
    return parts


def patch_where_loss(g: Grounding, patch_where: list) -> torch.Tensor:
    """Every object token's value in the "where" heads already says, through the probe, where its object is."""
    qb = torch.cat([torch.full((len(p),), b) for b, p, _ in patch_where])
    kp, target = torch.cat([p for _, p, _ in patch_where]), torch.cat([t for *_, t in patch_where])
    return torch.stack(
        [
            F.mse_loss(
                g.where_probe(head_values(g.cap, g.heads[k][0][0], g.heads[k][1], qb, kp).float()), target
            )
            for k in ("where_a", "where_b")
        ]
    ).mean()
