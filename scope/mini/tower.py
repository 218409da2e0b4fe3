"""Stage 1: the vision tower, trained on exact scene annotations instead of CLIP's captions.

CLIP learns from captions; SynthBench has exact annotations, so the tower learns (a) a CLS objective -- which
colour/shape combinations are present and how many of each shape/colour -- from the CLS token of layer -2,
which concentrates that layer's CLS attention on the objects (the saliency SCOPE uses), and (b) dense per-patch
objectives on the layer -2 patch features (``TowerHeads``), so the features that reach the projector carry
what the questions ask about. ``train_tower`` runs it; the heads are discarded afterwards.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from scope.mini.labels import C_LIST, GRID, S_LIST, VAL_SEED_BASE, scene_batch, window_targets
from scope.mini.model import PATCH_SIZE
from scope.mini.scenes import DIGITS


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """[grid * grid, dim] fixed 2-D sine-cosine position embeddings (half the channels per axis), raster order."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    parts = []
    for axis in (rows.flatten(), cols.flatten()):
        ang = axis[:, None] * omega[None]
        parts += [ang.sin(), ang.cos()]
    return torch.cat(parts, dim=1).float()


def tower_hidden(
    tower, px: torch.Tensor, window: tuple[int, int, int] | None = None, keep: list | None = None
) -> torch.Tensor:
    """hidden_states[-2] of the CLIP tower (CLS first) without the last layer, which LLaVA never reads.

    ``window=(row, col, size)`` runs only a size x size window of the patch grid, with the position
    embeddings those patches have in the full grid: training on windows costs ~1/5 of full images (attention
    is quadratic) and teaches the same local features, which is what makes stage 1 affordable on a CPU.
    ``keep``: a list that receives each layer's input hidden states (for ``grouping_loss``).
    """
    emb = tower.embeddings
    if window is None:
        h = emb(px)
    else:
        r, c, w = window
        crop = px[:, :, r * PATCH_SIZE : (r + w) * PATCH_SIZE, c * PATCH_SIZE : (c + w) * PATCH_SIZE]
        patches = emb.patch_embedding(crop).flatten(2).transpose(1, 2)
        pos = emb.position_embedding.weight
        pos_patch = pos[1:].view(GRID, GRID, -1)[r : r + w, c : c + w].reshape(w * w, -1)
        cls = (emb.class_embedding + pos[0]).expand(len(px), 1, -1)
        h = torch.cat([cls, patches + pos_patch], dim=1)
    h = tower.pre_layrnorm(h)
    for layer in tower.encoder.layers[:-1]:
        if keep is not None:
            keep.append(h)
        h = layer(h, None)
        h = h[0] if isinstance(h, tuple) else h
    return h


# Local attention at initialisation. A ViT has no locality prior, and on a CPU budget it does not find one:
# trained on per-patch shape labels alone (batch 16, lr 1e-3, 400 steps), the tower reached 0.51 from the
# sin-cos initialisation and 0.77 from this one (a 7-layer CNN: 0.90 after 300 steps). The initialisation
# writes a 2-D sin-cos position code into the last ``LOCAL_POS_CHANNELS`` channels, which the patch
# embedding, CLS embedding and every residual write leave at zero (they are free to learn), and sets the
# query/key weights of the heads in ``LOCAL_OFFSETS`` so that each patch attends to the patch at a fixed grid
# offset (a rotation of the query's position code by that offset): three layers of such heads act like a
# small convolution stack over neighbouring patches (as in Cordonnier et al. 2020, "On the relationship
# between self-attention and convolutional layers"). Head 0 of layers 0-1 is left to the grouping loss and
# head 0 of layer 2 free for the CLS token. Only weights are set: the checkpoint is a plain CLIP ViT.
LOCAL_POS_CHANNELS = 32
LOCAL_FREQS = np.geomspace(0.5, 3.0, LOCAL_POS_CHANNELS // 4)  # radians per patch; one clean peak in 24
LOCAL_OFFSETS = {  # layer -> {head: (row offset, column offset)}
    0: {1: (0, 1), 2: (1, 0), 3: (1, 1)},
    1: {1: (0, -1), 2: (-1, 0), 3: (-1, -1)},
    2: {1: (0, 2), 2: (2, 0), 3: (-2, -2)},
}


def local_position_code(grid: int = GRID) -> torch.Tensor:
    """[grid * grid, 4 * len(LOCAL_FREQS)] sin/cos of row then column at ``LOCAL_FREQS`` (raster order)."""
    freqs = torch.tensor(LOCAL_FREQS, dtype=torch.float64)
    rows = torch.arange(grid, dtype=torch.float64).repeat_interleave(grid)
    cols = torch.arange(grid, dtype=torch.float64).repeat(grid)
    parts = []
    for axis in (rows, cols):
        ang = axis[:, None] * freqs[None]
        parts += [ang.sin(), ang.cos()]
    return torch.cat(parts, dim=1).float()


def _shift(d: int) -> torch.Tensor:
    """Linear map taking one axis' (sin, cos) code at x to the code at x + d."""
    n = len(LOCAL_FREQS)
    m = torch.zeros(2 * n, 2 * n, dtype=torch.float64)
    for f, w in enumerate(LOCAL_FREQS):
        c, s = math.cos(w * d), math.sin(w * d)
        m[f, f], m[f, n + f] = c, s  # sin(x + d) = sin x cos d + cos x sin d
        m[n + f, n + f], m[n + f, f] = c, -s  # cos(x + d) = cos x cos d - sin x sin d
    return m


@torch.no_grad()
def local_attention_init(tower, beta: float = 2.0) -> None:
    """Initialise ``tower`` (a CLIP vision model) so the heads of ``LOCAL_OFFSETS`` attend to grid neighbours.

    ``beta`` scales the queries: at 2.0 each such head puts > 0.95 of its attention on its target patch at
    initialisation (checked in the tests). See the comment above ``LOCAL_POS_CHANNELS``.
    """
    width = tower.config.hidden_size
    head_dim = width // tower.config.num_attention_heads
    if width < 2 * LOCAL_POS_CHANNELS or head_dim < LOCAL_POS_CHANNELS:
        raise ValueError(
            f"local_attention_init needs hidden_size >= {2 * LOCAL_POS_CHANNELS} and head_dim >= "
            f"{LOCAL_POS_CHANNELS}; got hidden_size={width}, head_dim={head_dim} (use local=False)"
        )
    pc = slice(width - LOCAL_POS_CHANNELS, width)
    emb = tower.embeddings
    pos = emb.position_embedding.weight
    pos.zero_()
    pos[1:, pc] = local_position_code(int(round(math.sqrt(pos.shape[0] - 1)))).to(pos.dtype)
    emb.patch_embedding.weight[pc] = 0
    emb.class_embedding[pc] = 0
    for i, layer in enumerate(tower.encoder.layers):
        attn = layer.self_attn
        attn.out_proj.weight[pc] = 0  # residual writes keep the position code intact at initialisation
        layer.mlp.fc2.weight[pc] = 0
        for h, (dr, dc) in LOCAL_OFFSETS.get(i, {}).items():
            rows = slice(h * attn.head_dim, (h + 1) * attn.head_dim)
            for proj in (attn.q_proj, attn.k_proj):
                proj.weight[rows] = 0
                if proj.bias is not None:
                    proj.bias[rows] = 0
            code = slice(h * attn.head_dim, h * attn.head_dim + LOCAL_POS_CHANNELS)  # the head's first dims
            attn.q_proj.weight[code, pc] = beta * torch.block_diag(_shift(dr), _shift(dc)).float()
            attn.k_proj.weight[code, pc] = torch.eye(LOCAL_POS_CHANNELS)


def head_slice(proj: nn.Linear, x: torch.Tensor, head_dim: int, head: int = 0) -> torch.Tensor:
    """One head's slice of an attention projection, without computing the other heads."""
    rows = slice(head * head_dim, (head + 1) * head_dim)
    bias = proj.bias[rows] if proj.bias is not None else None
    return F.linear(x, proj.weight[rows], bias)


def grouping_loss(tower, inputs: list[torch.Tensor], owner: torch.Tensor, layers=(0, 1)) -> torch.Tensor:
    """-log of the attention mass head 0 of ``layers`` puts, from each object patch, on its own object.

    ``inputs`` are the layer inputs kept by ``tower_hidden`` (CLS first), ``owner`` [B, P] the patch owners
    (0 = background). Object shape is a property of the whole object (an MLP on one 8 px patch's pixels
    gets 0.52 on edge patches, prior 0.37), so the tower must group the patches of each object
    before it can name their shape. With this loss, sin-cos positions scaled by 0.1, lr 1e-3 and 3000 steps,
    the shape probe reached 0.61 (0.41 at 1200 steps without them); the loss's own share of that gain
    was not isolated.
    """
    obj = owner > 0
    if not obj.any():
        return inputs[0].new_zeros(())
    same = (owner[:, :, None] == owner[:, None, :]) & obj[:, :, None]  # [B, P, P]
    losses = []
    for i in layers:
        layer = tower.encoder.layers[i]
        attn = layer.self_attn
        x = layer.layer_norm1(inputs[i]).float()
        q, k = head_slice(attn.q_proj, x, attn.head_dim), head_slice(attn.k_proj, x, attn.head_dim)
        logp = torch.log_softmax((q @ k.transpose(1, 2)) * attn.scale, dim=-1)[:, 1:, 1:]  # patch -> patch
        hit = torch.logsumexp(logp.masked_fill(~same, float("-inf")), dim=-1)
        losses.append(-hit[obj].mean())
    return torch.stack(losses).mean()


class TowerHeads(nn.Module):
    """Auxiliary heads used only while training the tower (not part of the shipped checkpoint)."""

    def __init__(self, width: int, ink: float = 0.0):
        super().__init__()
        self.ink = ink
        self.norm_cls, self.norm_patch = nn.LayerNorm(width), nn.LayerNorm(width)
        self.presence = nn.Linear(width, len(C_LIST) * len(S_LIST))
        self.counts = nn.Linear(width, (len(S_LIST) + len(C_LIST)) * 8)
        sizes = [1 + len(C_LIST), 1 + len(S_LIST), 3, 1 + len(DIGITS), 1 + len(C_LIST) * len(S_LIST)]
        self.dense = nn.ModuleList(nn.Linear(width, k) for k in sizes + [GRID, GRID])

    DENSE_ROWS = (0, 1, 2, 3, 4, 6, 7)  # rows of ``patch_labels`` the dense heads predict (5 = owner is not)
    DENSE_NAMES = ("colour", "shape", "size", "glyph", "centre", "row", "col")
    # Grid row / column are ordinal: GRID thresholds "label > j" (BCE), so the label (0 = background, else
    # 1 + row) is the number of positive logits and the features carry position along one direction, which
    # makes comparing two objects' positions (spatial questions) a linear read-out for the LM.
    ORDINAL = ("row", "col")
    ORDINAL_WEIGHT = 4.0  # BCE is averaged over GRID thresholds; x4 puts it on the scale of the CE heads

    def _dense_loss(self, name: str, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Per-patch loss of one dense head: cross-entropy, or the ordinal BCE of ``ORDINAL`` heads."""
        if name not in self.ORDINAL:
            return F.cross_entropy(logits, label, reduction="none")
        steps = (label[:, None] > torch.arange(logits.shape[-1])).float()
        bce = F.binary_cross_entropy_with_logits(logits, steps, reduction="none")
        return self.ORDINAL_WEIGHT * bce.mean(-1)

    def _predict(self, name: str, logits: torch.Tensor) -> torch.Tensor:
        return (logits > 0).sum(-1) if name in self.ORDINAL else logits.argmax(-1)

    def loss(
        self, hidden: torch.Tensor, dense: torch.Tensor, cls: torch.Tensor | None, only: tuple[str, ...] = ()
    ) -> dict[str, torch.Tensor]:
        """CLS and dense losses; ``only`` = names of the dense heads to train alone (no CLS loss)."""
        h_patch = self.norm_patch(hidden[:, 1:])
        # Object patches are ~5% of a scene: a plain mean over patches is met by predicting "background"
        # everywhere, so each head also gets the mean loss over object patches alone.
        obj = dense[:, 5].flatten() > 0
        l_dense = 0.0
        for name, k, head in zip(self.DENSE_NAMES, self.DENSE_ROWS, self.dense):
            if only and name not in only:
                continue
            logits = head(h_patch).flatten(0, 1)
            ce = self._dense_loss(name, logits, dense[:, k].flatten())
            l_dense = l_dense + ce.mean() + (ce[obj].mean() if obj.any() else 0.0)
            if name == "glyph" and self.ink:
                # The digit is drawn on ~1% of a scene's patches, ~6% of object patches: in both means above
                # its signal is drowned by "no digit", and the digit probe stayed at its base rate through
                # the warm-up. This term is the mean loss over the patches that see the digit.
                ink = dense[:, 8].flatten()
                if (ink > 0).any():
                    l_dense = l_dense + self.ink * F.cross_entropy(logits[ink > 0], ink[ink > 0])
        if only:
            return {"dense": l_dense}
        h_cls = self.norm_cls(hidden[:, 0])
        n_pres = len(C_LIST) * len(S_LIST)
        l_pres = F.binary_cross_entropy_with_logits(self.presence(h_cls), cls[:, :n_pres])
        counts = self.counts(h_cls).view(len(h_cls), -1, 8)
        l_count = F.cross_entropy(counts.flatten(0, 1), cls[:, n_pres:].long().clamp(max=7).flatten())
        return {"cls": l_pres + l_count, "dense": l_dense}

    @torch.no_grad()
    def probe_accuracy(self, hidden: torch.Tensor, dense: torch.Tensor) -> dict[str, float]:
        """Per-patch accuracy of each (linear) dense head on object patches: what the features carry."""
        h_patch = self.norm_patch(hidden[:, 1:])
        obj = dense[:, 5] > 0
        out = {}
        for name, k, head in zip(self.DENSE_NAMES, self.DENSE_ROWS, self.dense):
            pred = self._predict(name, head(h_patch))
            sel = obj if name != "centre" else dense[:, 4] > 0
            out[f"probe_{name}"] = float((pred[sel] == dense[:, k][sel]).float().mean())
            if name == "glyph":  # on the patches that see a digit: can the features read it where it is?
                ink = dense[:, 8] > 0
                out["probe_ink"] = float((pred[ink] == dense[:, 8][ink]).float().mean())
        return out


def train_tower(
    model,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    log,
    window: int = 12,
    full_frac: float = 0.15,
    zoom: float = 0.0,
    probe_every: int = 300,
    group: float = 0.0,
    pos_scale: float = 0.1,
    local: bool = True,
    warmup: int = 500,
    ink: float = 0.0,
    pca: bool = False,
) -> None:
    """Stage 1: CLS + dense objectives; windows of ``window`` patches first, full images for the last steps.

    ``zoom``: share of images that are full-resolution crops (see ``scene_batch``); ``group`` > 0 adds
    ``grouping_loss`` with that weight. ``local``: start from ``local_attention_init``; otherwise from
    2-D sin-cos position embeddings scaled by ``pos_scale`` (``init_tower``).

    ``warmup``: steps on full images (batch / 2) with the shape and digit heads alone, before the main loop
    (which restarts the optimiser; ``warm_up_tower``). In the full multitask loss the shape probe stayed at
    0.41-0.47 after 300-450 steps, with or without the grouping loss, the zoomed crops, the CLS loss or a 3x
    shape weight; after 500 warm-up steps it was 0.73, and 0.80 after 300 further multitask steps. The digit
    probe did not move in the warm-up (0.41, the share of object patches without a digit).

    ``ink`` > 0 adds the glyph head's mean loss over the patches that see a digit (``patch_labels`` row 8)
    with that weight, and ``pca`` starts the patch embedding from whitened principal components of image
    patches (``pca_patch_init``). Without either, a linear probe of an object's mean layer -2 feature named
    its digit for 39% of held-out objects (chance 17%) -- MiniLLaVA's reading accuracy then, so the tower,
    not the LM, limited reading. In warm-up experiments whose digit target was the ink patches alone, the
    digit head read 14% of them after 400 steps; with the ink mean term 24% after 300 steps, and 43% with the
    term and the principal-component start. What the full stage 1 reached is in the model card's training
    notes.
    """
    tower = model.model.vision_tower
    init_tower(tower, local, pos_scale, pca)
    heads = TowerHeads(tower.config.hidden_size, ink)
    params = list(tower.parameters()) + list(heads.parameters())
    rng = np.random.default_rng(seed)
    tower.train()
    t0 = time.time()
    if warmup:
        warm_up_tower(tower, heads, params, warmup, batch, lr, rng, log, t0)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    bar = tqdm(range(steps), desc="stage 1: vision tower")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        full = step >= steps * (1 - full_frac) or window >= GRID
        n, win = (max(4, batch // 4), None) if full else (batch, window)
        losses = tower_losses(tower, heads, n, win, zoom, group, rng)
        _optimizer_step(opt, params, losses["cls"] + losses["dense"] + group * losses.get("group", 0.0))
        bar.set_postfix({k: f"{v.item():.3f}" for k, v in losses.items()})
        if step % 25 == 0 or step == steps - 1:
            log("tower", step, time.time() - t0, {k: v.item() for k, v in losses.items()})
        if (step + 1) % probe_every == 0 or step == steps - 1:
            probe = _probe(tower, heads)
            log("tower", step + 1, time.time() - t0, probe)
            tqdm.write(
                f"tower probes after {step + 1} steps (held-out scenes, object patches): "
                + " ".join(f"{k}={v:.3f}" for k, v in probe.items())
            )
    tower.eval()


def init_tower(tower, local: bool = True, pos_scale: float = 0.1, pca: bool = False) -> None:
    """The tower's starting point: ``local_attention_init``, or (``local=False``) 2-D sin-cos position
    embeddings (as MAE: position is readable from step 0) scaled by ``pos_scale``; with ``pca`` also
    ``pca_patch_init``. At full scale the sin-cos embeddings outweigh the patch content after the pre-layer
    norm (shape-only training at lr 1e-3: probe 0.45 after 300 steps at scale 0.1, 0.41-0.43 after 250 at 1).
    """
    if local:
        local_attention_init(tower)
    else:
        with torch.no_grad():
            pos = tower.embeddings.position_embedding.weight
            pos[1:] = pos_scale * sincos_2d(GRID, pos.shape[1]).to(pos.dtype)
            pos[0] = 0
    if pca:
        pca_patch_init(tower, local=local)


def warm_up_tower(tower, heads, params, steps: int, batch: int, lr: float, rng, log, t0: float) -> None:
    """``steps`` steps on full images (batch / 2) with the shape and digit heads alone, with their own optimiser."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    bar = tqdm(range(steps), desc="stage 1: warm-up (shape, digit)")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 50)
        _, px, dense, _ = scene_batch(rng.integers(0, VAL_SEED_BASE, size=max(4, batch // 2)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = tower_hidden(tower, px)
        loss = heads.loss(hidden.float(), dense, None, only=("shape", "glyph"))["dense"]
        _optimizer_step(opt, params, loss)
        bar.set_postfix(dense=f"{loss.item():.3f}")
        if step % 25 == 0:
            log("tower-warmup", step, time.time() - t0, {"dense": loss.item()})
    probe = _probe(tower, heads)
    log("tower-warmup", steps, time.time() - t0, probe)
    tqdm.write("tower probes after the warm-up: " + " ".join(f"{k}={v:.3f}" for k, v in probe.items()))


def tower_losses(tower, heads, n: int, window: int | None, zoom: float, group: float, rng) -> dict:
    """The losses of one main-loop batch of ``n`` fresh scenes: on a random ``window`` x ``window`` window of
    the patch grid, or on full images (``window=None``); ``"group"`` only when ``group`` > 0."""
    _, px, dense, cls = scene_batch(rng.integers(0, VAL_SEED_BASE, size=n), zoom, rng)
    win = None
    if window is not None:
        win = (int(rng.integers(0, GRID - window + 1)), int(rng.integers(0, GRID - window + 1)), window)
        dense, cls = window_targets(dense, win)
    kept: list = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = tower_hidden(tower, px, win, keep=kept if group else None)
    losses = heads.loss(hidden.float(), dense, cls)
    if group:
        losses["group"] = grouping_loss(tower, kept, dense[:, 5])
    return losses


def _optimizer_step(opt, params, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


@torch.no_grad()
def pca_patch_init(tower, n_scenes: int = 96, local: bool = True) -> None:
    """Set the patch embedding to whitened principal components of the (CLIP-normalised) 8x8 patches of
    ``n_scenes`` fixed scenes, rescaled to the output scale of its current weights.

    A random patch embedding mixes every pixel of a patch; the digit strokes are a few pixels wide, and
    from random weights the tower learnt them only slowly. Principal components are the edge and colour
    filters the data varies along, a standard data-dependent initialisation. With ``local`` the channels
    that ``local_attention_init`` reserves for the position code stay zero.
    """
    emb = tower.embeddings.patch_embedding
    _, px, _, _ = scene_batch(np.arange(VAL_SEED_BASE // 2, VAL_SEED_BASE // 2 + n_scenes))
    p = PATCH_SIZE
    patches = px.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * p * p).double()
    patches = patches - patches.mean(0)
    _, sv, v = torch.linalg.svd(patches, full_matrices=False)
    k = emb.out_channels - (LOCAL_POS_CHANNELS if local else 0)
    if k > v.shape[0]:
        raise ValueError(f"pca_patch_init: {k} channels but only {v.shape[0]} components per patch")
    w = emb.weight.view(emb.out_channels, -1)
    comp = v[:k] / (sv[:k, None] / math.sqrt(len(patches)))  # whitened: unit variance on the data
    comp = comp * (patches @ w[:k].double().T).std() / (patches @ comp.T).std()
    w[:k] = comp.to(w.dtype)


@torch.no_grad()
def _probe(tower, heads, n: int = 16) -> dict[str, float]:
    was_training = tower.training
    tower.eval()
    _, px, dense, _ = scene_batch(np.arange(VAL_SEED_BASE, VAL_SEED_BASE + n))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = tower_hidden(tower, px).float()
    tower.train(was_training)
    return heads.probe_accuracy(hidden, dense)


@torch.no_grad()
def cls_attention(tower, px: torch.Tensor) -> torch.Tensor:
    """CLS -> patch attention of vision layer -2, summed over heads: SCOPE's saliency, [B, 576]."""
    h = tower.pre_layrnorm(tower.embeddings(px))
    for layer in tower.encoder.layers[:-2]:
        h = layer(h, None)
        h = h[0] if isinstance(h, tuple) else h
    attn = tower.encoder.layers[-2].self_attn
    x = tower.encoder.layers[-2].layer_norm1(h)
    b, n, _ = x.shape
    q = attn.q_proj(x[:, :1]).view(b, 1, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, n, -1, attn.head_dim).transpose(1, 2)
    a = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)  # [B, heads, 1, N+1]
    return a.sum(1)[:, 0, 1:]


def top_share(saliency: torch.Tensor, frac: float = 0.1) -> float:
    """Mean share of the patch-attention mass held by the top ``frac`` of tokens."""
    k = max(1, int(round(frac * saliency.shape[-1])))
    s = saliency / saliency.sum(-1, keepdim=True)
    return float(s.topk(k, dim=-1).values.sum(-1).mean())
