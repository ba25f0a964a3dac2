"""A step-efficient forward pass for diffusers' ``Lumina2Transformer2DModel``.

It runs the same sub-modules as ``Lumina2Transformer2DModel.forward`` but does the work that does
not change between sampling steps once per generation instead of once per step: the caption
embedding and the context refiner (they do not see the timestep), the multimodal RoPE tables and
the joint-sequence layout. Conditional and unconditional rows are run in one batched call. An
optional TeaCache skips the main blocks when the timestep-modulated input barely changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import Lumina2Transformer2DModel


@dataclass
class DenoiserContext:
    """Step-invariant state for a batch of caption rows at one latent size."""

    cap_states: torch.Tensor  # (B, Lc, D) refined caption tokens
    cap_lens: list[int]
    img_freqs: torch.Tensor  # (B, Li, r) RoPE for image tokens
    joint_freqs: torch.Tensor  # (B, Lj, r) RoPE for the joint sequence
    joint_mask: torch.Tensor | None  # (B, Lj) or None when every row has the same length
    img_pos: torch.Tensor  # (B, Li) position of each image token in the joint sequence
    cap_select: torch.Tensor  # (B, Lj, 1) 1 where the joint token is a caption token
    cap_index: torch.Tensor  # (B, Lj) caption index for each joint position (clamped)
    img_index: torch.Tensor  # (B, Lj) image index for each joint position (clamped)
    height: int
    width: int

    @property
    def batch(self) -> int:
        return self.cap_states.shape[0]


@dataclass
class BranchCache:
    """TeaCache state of one CFG branch (the conditional or the unconditional rows)."""

    accumulated: float = 0.0
    prev_modulated: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    skipped: int = 0


BRANCHES = ("cond", "uncond")


@dataclass
class TeaCache:
    """TeaCache state: skip the main blocks while the accumulated rescaled change stays small.

    The indicator is the relative L1 change of the first main block's timestep-modulated input
    (``layers[0].norm1``), rescaled by a polynomial fitted per model (``coefficients``, highest
    power first) to predict the change of the blocks' output. As in the reference TeaCache4Lumina2,
    the polynomial is used as fitted (no clamping at 0) and the conditional and unconditional
    branches keep separate accumulators, inputs and residuals, so each decides for itself even
    though both run in one batched call; the first and last steps always run.
    """

    threshold: float
    coefficients: tuple[float, ...]
    num_steps: int
    step: int = 0
    branches: dict[str, BranchCache] = field(default_factory=lambda: {b: BranchCache() for b in BRANCHES})
    record: bool = False  # calibration: always compute and log (input change, output change)
    history: list[tuple[float, float]] = field(default_factory=list)
    last_rel: float | None = None
    prev_output: torch.Tensor | None = None

    @property
    def skipped(self) -> int:
        """Branch-steps served from the cache."""
        return sum(b.skipped for b in self.branches.values())

    def rescale(self, rel_l1: float) -> float:
        """Predicted output change for an input change: the fitted polynomial as it is."""
        return float(np.polyval(self.coefficients, rel_l1))

    def should_compute(self, branch: str, modulated: torch.Tensor) -> bool:
        """Decide for ``branch`` at this step and update its accumulator (once per branch and call)."""
        state = self.branches[branch]
        first_or_last = self.step == 0 or self.step >= self.num_steps - 1 or state.prev_modulated is None
        compute = True
        if not first_or_last and state.residual is not None:
            prev = self._fit(state.prev_modulated, modulated)
            rel = _rel_l1(modulated, prev)
            self.last_rel = rel
            state.accumulated += self.rescale(rel)
            compute = self.record or state.accumulated >= self.threshold
        if compute:
            state.accumulated = 0.0
        else:
            state.skipped += 1
        state.prev_modulated = modulated
        return compute

    def next_step(self) -> None:
        self.step += 1

    def observe_output(self, output: torch.Tensor) -> None:
        """Calibration: pair the last input change with the blocks' output change."""
        if self.prev_output is not None and self.last_rel is not None:
            self.history.append((self.last_rel, _rel_l1(output, self._fit(self.prev_output, output))))
        self.prev_output = output
        self.last_rel = None

    @staticmethod
    def _fit(cached: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Rows and positions of a cached tensor that match ``like`` (after CFG truncation the
        batch keeps only its leading, conditional rows, whose tokens sit at the front)."""
        return cached[: like.shape[0], : like.shape[1]]


def _rel_l1(new: torch.Tensor, old: torch.Tensor) -> float:
    return ((new - old).abs().mean() / old.abs().mean().clamp_min(1e-12)).item()


class Lumina2Denoiser:
    """Callable velocity model over a prepared :class:`DenoiserContext`."""

    def __init__(self, transformer: Lumina2Transformer2DModel):
        self.transformer = transformer
        self.patch = transformer.config.patch_size
        self.out_channels = transformer.out_channels
        self.forward_calls = 0
        self.forward_rows = 0

    # ----------------------------------------------------------------- preparation (once)
    @torch.no_grad()
    def prepare(
        self, cap_embeds: torch.Tensor, cap_mask: torch.Tensor, height: int, width: int
    ) -> DenoiserContext:
        """Refine captions and lay out the joint sequence for latents of ``height x width``."""
        tr = self.transformer
        dtype = next(tr.parameters()).dtype
        cap_mask = cap_mask.to(cap_embeds.device)
        dummy = torch.zeros(
            cap_embeds.shape[0], tr.config.in_channels, height, width, device=cap_embeds.device
        )
        _, cap_freqs, img_freqs, joint_freqs, cap_lens, seq_lens = tr.rope_embedder(dummy, cap_mask)

        cap_states = tr.time_caption_embed.caption_embedder(cap_embeds.to(dtype))
        for layer in tr.context_refiner:
            cap_states = layer(cap_states, cap_mask, cap_freqs)

        batch, n_img = len(cap_lens), img_freqs.shape[1]
        max_len = max(seq_lens)
        pos = torch.arange(max_len, device=cap_embeds.device).expand(batch, max_len)
        lens = torch.tensor(cap_lens, device=cap_embeds.device)[:, None]
        seq = torch.tensor(seq_lens, device=cap_embeds.device)[:, None]
        is_cap = pos < lens
        mask = pos < seq
        return DenoiserContext(
            cap_states=cap_states,
            cap_lens=list(cap_lens),
            img_freqs=img_freqs,
            joint_freqs=joint_freqs,
            joint_mask=None if len(set(seq_lens)) == 1 else mask,
            img_pos=lens + torch.arange(n_img, device=cap_embeds.device)[None, :],
            cap_select=is_cap[..., None].to(dtype),
            cap_index=pos.clamp(max=cap_states.shape[1] - 1),
            img_index=(pos - lens).clamp(min=0, max=n_img - 1) * mask,
            height=height,
            width=width,
        )

    def subset(self, ctx: DenoiserContext, rows: int) -> DenoiserContext:
        """The context of the first ``rows`` rows (the conditional half after CFG-Trunc)."""
        return self.rows(ctx, 0, rows)

    @staticmethod
    def rows(ctx: DenoiserContext, start: int, stop: int) -> DenoiserContext:
        """The context of rows ``start:stop``, its joint sequence cut to their longest one."""
        seq_lens = [c + ctx.img_freqs.shape[1] for c in ctx.cap_lens[start:stop]]
        max_len = max(seq_lens)
        mask = ctx.joint_mask[start:stop, :max_len] if ctx.joint_mask is not None else None
        return DenoiserContext(
            cap_states=ctx.cap_states[start:stop],
            cap_lens=ctx.cap_lens[start:stop],
            img_freqs=ctx.img_freqs[start:stop],
            joint_freqs=ctx.joint_freqs[start:stop, :max_len],
            joint_mask=None if len(set(seq_lens)) == 1 else mask,
            img_pos=ctx.img_pos[start:stop],
            cap_select=ctx.cap_select[start:stop, :max_len],
            cap_index=ctx.cap_index[start:stop, :max_len],
            img_index=ctx.img_index[start:stop, :max_len],
            height=ctx.height,
            width=ctx.width,
        )

    # ----------------------------------------------------------------------- per step
    @torch.no_grad()
    def __call__(
        self,
        x: torch.Tensor,
        t: float,
        ctx: DenoiserContext,
        cache: TeaCache | None = None,
        branches: int = 1,
    ) -> torch.Tensor:
        """Velocity ``v = x1 - x0`` for latents ``x`` (B, C, H, W) at model time ``t``; ``branches``
        = 2 when the rows are the conditional half followed by the unconditional one (TeaCache
        decides for each half)."""
        tr = self.transformer
        batch, _, height, width = x.shape
        self.forward_calls += 1
        self.forward_rows += batch
        p = self.patch
        dtype = ctx.cap_states.dtype
        timestep = torch.full((batch,), float(t), device=x.device, dtype=x.dtype)
        emb = tr.time_caption_embed
        temb = emb.timestep_embedder(emb.time_proj(timestep).to(dtype))

        img = x.to(dtype).view(batch, -1, height // p, p, width // p, p).permute(0, 2, 4, 3, 5, 1).flatten(3)
        img = tr.x_embedder(img.flatten(1, 2))
        for layer in tr.noise_refiner:
            img = layer(img, None, ctx.img_freqs, temb)

        dim = img.shape[-1]
        cap_part = ctx.cap_states.gather(1, ctx.cap_index[..., None].expand(-1, -1, dim))
        img_part = img.gather(1, ctx.img_index[..., None].expand(-1, -1, dim))
        hidden = cap_part * ctx.cap_select + img_part * (1 - ctx.cap_select)
        if ctx.joint_mask is not None:
            hidden = hidden * ctx.joint_mask[..., None].to(dtype)

        if cache is not None:
            hidden = self._cached_blocks(hidden, temb, ctx, cache, 1 if cache.record else branches)
        else:
            hidden = self._blocks(hidden, temb, ctx)

        out = tr.norm_out(hidden, temb)
        out = out.gather(1, ctx.img_pos[..., None].expand(-1, -1, out.shape[-1]))
        out = out.view(batch, height // p, width // p, p, p, self.out_channels)
        return out.permute(0, 5, 1, 3, 2, 4).reshape(batch, self.out_channels, height, width).to(x.dtype)

    def _blocks(self, hidden: torch.Tensor, temb: torch.Tensor, ctx: DenoiserContext) -> torch.Tensor:
        for layer in self.transformer.layers:
            hidden = layer(hidden, ctx.joint_mask, ctx.joint_freqs, temb)
        return hidden

    def _cached_blocks(
        self, hidden: torch.Tensor, temb: torch.Tensor, ctx: DenoiserContext, cache: TeaCache, branches: int
    ) -> torch.Tensor:
        """The main blocks under TeaCache: each branch's rows run or reuse their cached residual."""
        rows = hidden.shape[0] // branches
        modulated = self.transformer.layers[0].norm1(hidden, temb)[0]
        spans = [(BRANCHES[i], i * rows, (i + 1) * rows) for i in range(branches)]
        compute = {name: cache.should_compute(name, modulated[a:b]) for name, a, b in spans}
        cache.next_step()
        if all(compute.values()):  # the usual case: one batched call for every row
            out = self._blocks(hidden, temb, ctx)
            for name, a, b in spans:
                cache.branches[name].residual = out[a:b] - hidden[a:b]
            if cache.record:
                cache.observe_output(out)
            return out
        out = hidden.clone()
        for name, a, b in spans:
            state = cache.branches[name]
            if compute[name]:
                sub = self.rows(ctx, a, b)
                length = sub.cap_select.shape[1]
                start = hidden[a:b, :length]
                done = self._blocks(start, temb[a:b], sub)
                state.residual = done - start
                out[a:b, :length] = done
            else:  # positions past the cached length are padding: masked in attention, never read
                assert state.residual is not None
                cached = TeaCache._fit(state.residual, hidden[a:b])
                out[a:b, : cached.shape[1]] += cached
        return out
