"""Installing nested attention into a UNet, reversibly, and owning the per-call subject state."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn

from .errors import NestedAttentionError
from .layers import CrossAttentionLayer, cross_attention_layers
from .mechanisms import MECHANISMS, Mechanism, mechanism
from .one_path_processor import OnePathAttnProcessor
from .plan import OnePathPlan, StaticStore, build_plan, structure
from .processor import NestedAttnProcessor, nested_processor
from .state import BoundSubject, RowLayout, row_layout


class NestedAttentionController:
    """Owns the nested processors of one UNet and the subjects bound for the current call.

    Create it with `install(unet)`. Only cross-attention layers change. In place of diffusers' SDPA processor
    (`AttnProcessor2_0`, the default) the nested processor runs the whole batch in one pass (`one_path.py`);
    around any other processor (xformers, sliced, IP-Adapter, a custom one) it wraps the processor it replaced,
    which still serves every row that carries no subject word. `uninstall()` puts the very same processor
    objects back.

    Args:
        unet: a diffusers UNet with cross-attention layers.
        one_path: False wraps every processor, SDPA included (the two paths compute the same thing).
        static_buffers: keep every tensor the processors read of a binding in storage that the next binding of
            the same shapes refills in place, so that one captured CUDA graph of the UNet call (or
            `torch.compile(mode="reduce-overhead")`) serves every subject; inference only.
    """

    def __init__(self, unet: nn.Module, one_path: bool = True, static_buffers: bool = False):
        self.unet = unet
        self.one_path = one_path
        self.store: StaticStore | None = StaticStore() if static_buffers else None
        self.plan: OnePathPlan | None = None  # what the one-path processors read of the bound subjects
        self._static_plan: OnePathPlan | None = None  # the latest plan over the static buffers
        self.layers: dict[str, CrossAttentionLayer] = cross_attention_layers(unet)
        if not self.layers:
            raise NestedAttentionError(
                f"{type(unet).__name__} has no cross-attention layers; nested attention needs a text-conditioned "
                f"UNet such as diffusers' UNet2DConditionModel."
            )
        self.subjects: list[BoundSubject] = []
        self.mechanism: Mechanism = MECHANISMS["nested"]  # that of the bound subjects
        self._layouts: dict[tuple[int, torch.device], RowLayout | None] = {}
        self._vanilla_rows: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._originals: dict[str, object] = {}
        self.installed = False

    # ---- installation --------------------------------------------------------------------------------------

    def _module(self, path: str):
        return self.unet.get_submodule(path)

    def install(self) -> NestedAttentionController:
        for path in self.layers:
            module = self._module(path)
            if isinstance(module.processor, NestedAttnProcessor):
                raise NestedAttentionError(
                    f"Nested attention is already installed on this UNet (layer {path}); uninstall it first or "
                    f"reuse the existing NestedAttention object."
                )
        for path in self.layers:
            module = self._module(path)
            self._originals[path] = module.processor
            module.set_processor(self._processor(path, module.processor))
        self.installed = True
        return self

    def uninstall(self) -> None:
        """Restore every original processor object and forget the bound subjects."""
        for path, original in self._originals.items():
            module = self._module(path)
            if isinstance(module.processor, NestedAttnProcessor) and module.processor.controller is self:
                module.set_processor(original)
        self._originals.clear()
        self.clear()
        self.installed = False

    def replaced_layers(self) -> list[str]:
        """Layers whose nested processor was replaced after installation (e.g. by `set_attn_processor`)."""
        return [
            path for path in self.layers
            if not (isinstance(self._module(path).processor, NestedAttnProcessor)
                    and self._module(path).processor.controller is self)
        ]

    def reinstall(self) -> None:
        """Wrap whatever processors now sit in replaced layers (a new attention backend) and keep nesting."""
        for path in self.replaced_layers():
            module = self._module(path)
            self._originals[path] = module.processor
            module.set_processor(self._processor(path, module.processor))

    def _processor(self, path: str, original) -> NestedAttnProcessor:
        if self.one_path and type(original) is AttnProcessor2_0:
            return OnePathAttnProcessor(path, self, original)
        return nested_processor(path, self, original)

    def check_installed(self) -> None:
        if not self.installed:
            raise NestedAttentionError("Nested attention was uninstalled from this UNet; install it again first.")
        replaced = self.replaced_layers()
        if replaced:
            raise NestedAttentionError(
                f"{len(replaced)} of {len(self.layers)} nested attention processors were replaced after "
                f"installation (first: {replaced[0]}), e.g. by set_attn_processor, load_ip_adapter, attention "
                f"slicing or enabling xformers; call reinstall() to keep the new backend and nested attention "
                f"together."
            )

    # ---- per-call state ------------------------------------------------------------------------------------

    def bind(self, subjects: list[BoundSubject]) -> None:
        """Set the subjects for the next UNet calls (one generation, or one training step)."""
        missing = [p for s in subjects for p in self.layers if p not in s.nested]
        if missing:
            raise NestedAttentionError(f"A bound subject has no nested keys for layer {missing[0]}.")
        missing = [p for s in subjects if s.scale is not None for p in self.layers if p not in s.scale]
        if missing:
            raise NestedAttentionError(f"A bound subject has no strength for layer {missing[0]}.")
        rows = {s.token_mask.shape for s in subjects}
        if len(rows) > 1:
            raise NestedAttentionError(f"Bound subjects disagree on the batch layout: {sorted(rows)}.")
        overlap = torch.stack([s.token_mask.cpu() for s in subjects]).sum(0).gt(1) if subjects else None
        if overlap is not None and bool(overlap.any()):
            raise NestedAttentionError("Two subjects are bound to the same token; bind each to its own word.")
        kinds = sorted({s.mechanism for s in subjects})
        if len(kinds) > 1:
            raise NestedAttentionError(
                f"The bound subjects use different mechanisms ({', '.join(kinds)}); one call combines adapters of "
                f"one mechanism only, so generate with adapters of the same mechanism."
            )
        if self.store is not None and any(t.requires_grad for s in subjects for state in s.nested.values() for t in state):
            raise NestedAttentionError(
                "Static (CUDA-graph) buffers serve inference only, but a bound subject's tensors require grad; "
                "compute the subjects under torch.no_grad() or install without static buffers for training."
            )
        chosen = mechanism(kinds[0]) if kinds else MECHANISMS["nested"]
        for s in subjects:
            chosen.check_knobs(s.lam, s.scale)
        self.mechanism = chosen
        self.subjects = list(subjects)
        self.plan = None
        self._layouts.clear()
        self._vanilla_rows.clear()
        if subjects:  # the layouts of both batch shapes (with and without guidance) now, not inside the UNet's forward:
            # there, under torch.compile, their data-dependent shapes would break the graph at the first layer
            device = next(iter(subjects[0].nested.values()))[0].device
            cond_rows = subjects[0].token_mask.shape[0]
            try:
                for batch_size in (cond_rows, 2 * cond_rows):
                    layout = self.layout(batch_size, device)
                    if layout is not None and layout.rows is not None and layout.span is None:  # gathered rows
                        self.vanilla_rows(batch_size, device)
                self.plan = self._plan(device, cond_rows)
            except NotImplementedError:  # fake/meta tensors (FLOP counting): built lazily at the first layer instead
                self._layouts.clear()
                self._vanilla_rows.clear()

    def _plan(self, device: torch.device, cond_rows: int) -> OnePathPlan | None:
        """The one-path processors' plan of the bound subjects (None where those processors have no use for it)."""
        if self.mechanism.name != "nested" or not self.one_path:
            return None
        layouts = {size: self.layout(size, device) for size in (cond_rows, 2 * cond_rows)}
        if any(layout is None for layout in layouts.values()):  # no row carries a subject: vanilla everywhere
            return None
        if self.store is None:
            return build_plan(self.subjects, layouts, self.layers, self.layer_scales, None)
        allocations = self.store.allocations
        plan = build_plan(self.subjects, layouts, self.layers, self.layer_scales, self.store)
        previous = self._static_plan
        if previous is not None and self.store.allocations == allocations and structure(previous) == structure(plan):
            return previous  # the same objects over the same (refilled) buffers: what a captured graph reads
        self._static_plan = plan
        return plan

    def layer_scales(self, path: str) -> list[float] | None:
        """The strength of each bound subject at layer `path`, or None when every one is 1 there."""
        scales = [1.0 if s.scale is None else float(s.scale[path]) for s in self.subjects]
        return None if all(s == 1.0 for s in scales) else scales

    def clear(self) -> None:
        self.subjects = []
        self.plan = None
        self._layouts.clear()
        self._vanilla_rows.clear()

    @contextmanager
    def bound(self, subjects: list[BoundSubject]) -> Iterator[None]:
        """`with controller.bound(subjects): unet(...)`: the subjects apply inside the block only."""
        self.bind(subjects)
        try:
            yield
        finally:
            self.clear()

    def layout(self, batch_size: int, device: torch.device) -> RowLayout | None:
        """The subjects spread over a UNet batch on `device` (built once per call, batch size and device)."""
        if not self.subjects:
            return None
        key = (batch_size, device)
        if key not in self._layouts:
            self._layouts[key] = row_layout(self.subjects, batch_size, device)
        return self._layouts[key]

    def vanilla_rows(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """Rows of a partly bound batch that carry no subject (served by the original processors)."""
        key = (batch_size, device)
        if key not in self._vanilla_rows:
            rows = self.layout(batch_size, device).rows
            keep = torch.ones(batch_size, dtype=torch.bool, device=device)
            keep[rows] = False
            self._vanilla_rows[key] = torch.nonzero(keep).flatten()
        return self._vanilla_rows[key]


def install(unet: nn.Module, one_path: bool = True, static_buffers: bool = False) -> NestedAttentionController:
    """Put nested processors on every cross-attention layer of `unet` (reversible: `.uninstall()`); the options are
    `NestedAttentionController`'s."""
    return NestedAttentionController(unet, one_path=one_path, static_buffers=static_buffers).install()
