"""The one-path processor: its arithmetic against the literal equation, its UNet against the wrapping processor,
and its static (CUDA-graph) buffers against eager binding."""

import zlib

import pytest
import torch

from conftest import make_adapter
from nested_attention import BoundSubject, install
from nested_attention.binding import word_positions
from nested_attention.layers import CrossAttentionLayer
from nested_attention.one_path import one_path_attention, text_terms
from nested_attention.plan import build_plan
from nested_attention.state import row_layout
from test_attention import naive_attention
from test_unet import unet_inputs

H, N, d, T, M = 2, 5, 8, 7, 4
LAYER = CrossAttentionLayer("layer", heads=H, inner_dim=H * d)
LAYOUTS = {  # cond rows, the rows that carry the subjects, guided batch or not
    "span": (3, [0, 1], True),
    "scattered": (3, [0, 2], True),
    "every row": (3, [0, 1, 2], False),
}


def bound_subjects(layout, num_subjects, lam_value, alpha, scale, gen):
    cond_rows, rows, _ = LAYOUTS[layout]
    subjects = []
    for k in range(num_subjects):
        mask = torch.zeros(cond_rows, T, dtype=torch.bool)
        for r in rows:
            mask[r, 3 * k: 3 * k + 1 + r % 2] = True  # one or two occurrences; subjects never share a token
        images = 1 + k  # the second subject has a photo per row
        lam = 1 + (lam_value - 1) * torch.linspace(0.5, 1.5, cond_rows)  # lambda differs per row
        subjects.append(BoundSubject(
            token_mask=mask, slots=torch.arange(cond_rows) % images,
            nested={"layer": (torch.randn(images, H, M, d, generator=gen), torch.randn(images, H, M, d, generator=gen))},
            bias=torch.log(torch.rand(images, M, generator=gen) + 0.1), lam=None if lam_value == 1 else lam,
            alpha=alpha[k] if isinstance(alpha, tuple) else alpha,
            scale=None if scale is None else {"layer": scale[k]},
        ))
    return subjects


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("lam_value", [1.0, 2.5])
@pytest.mark.parametrize("alpha", [None, 2.0, (3.0, None)])
@pytest.mark.parametrize("num_subjects", [1, 2])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_the_literal_equation(layout, lam_value, alpha, num_subjects, masked):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((layout, lam_value, alpha, num_subjects, masked)).encode()))
    scale = None if num_subjects == 1 else (0.6, 1.0)
    subjects = bound_subjects(layout, num_subjects, lam_value, alpha, scale, gen)
    cond_rows, _, guided = LAYOUTS[layout]
    batch = 2 * cond_rows if guided else cond_rows
    layouts = {size: row_layout(subjects, size, torch.device("cpu")) for size in (cond_rows, 2 * cond_rows)}
    plan = build_plan(subjects, layouts, {"layer": LAYER}, lambda path: None if scale is None else list(scale), None)
    query, key, value = torch.randn(batch, H, N, d, generator=gen), *torch.randn(2, batch, H, T, d, generator=gen)
    attn_mask = None
    if masked:  # an encoder attention mask: the last two tokens of the first row hidden
        attn_mask = torch.zeros(batch, 1, 1, T)
        attn_mask[0, ..., -2:] = -torch.inf

    outer = plan.outer[(batch, plan.strength_key["layer"])]
    ours = one_path_attention(query, text_terms(key, value, outer), plan.states["layer"], outer, plan.rows[batch],
                              attn_mask)

    unbound = batch - cond_rows  # the negative rows of a guided batch come first, with no subject
    def full(per_row, fill):  # (R, ...) of the conditional rows -> (B, ...)
        return torch.cat([fill.expand(unbound, *per_row.shape[1:]), per_row]) if unbound else per_row

    masks = torch.stack([full(s.token_mask, torch.zeros(1, T, dtype=torch.bool)) for s in subjects])
    lam = torch.stack([full(s.lam if s.lam is not None else torch.ones(cond_rows), torch.ones(1)) for s in subjects])
    nested_keys = [full(s.nested["layer"][0][s.slots], torch.zeros(1, H, M, d)) for s in subjects]
    nested_vals = [full(s.nested["layer"][1][s.slots], torch.zeros(1, H, M, d)) for s in subjects]
    biases = [full(s.bias[s.slots], torch.zeros(1, M)) for s in subjects]
    reference = naive_attention(query, key, value, nested_keys, nested_vals, biases, masks, lam, alpha,
                                scale, None if attn_mask is None else attn_mask[:, 0, 0])
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    vanilla = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask)
    carrying = masks.any(dim=(0, 2))
    torch.testing.assert_close(ours[~carrying], vanilla[~carrying], atol=1e-6, rtol=1e-6)
    assert (ours[carrying] - vanilla[carrying]).abs().max() > 1e-3  # the bound rows really change


def person_subject(pipe, adapter, controller, prompts, rows, seed, lam=None):
    mask = torch.zeros(len(prompts), 77, dtype=torch.bool)
    for row in rows:
        mask[row, word_positions([pipe.tokenizer], prompts[row], "person")] = True
    tokens = torch.randn(1, adapter.config.num_queries, adapter.config.qformer_hidden_size,
                         generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        nested = adapter.nested_keys_values(tokens, controller.layers)
    return BoundSubject(token_mask=mask, slots=torch.zeros(len(prompts), dtype=torch.long), nested=nested,
                        lam=None if lam is None else torch.full((len(prompts),), lam), alpha=adapter.config.alpha)


def guided(inputs):
    double = lambda x: torch.cat([x] * 2) if torch.is_tensor(x) else {k: double(v) for k, v in x.items()}  # noqa: E731
    return double(inputs[0]), inputs[1], double(inputs[2]), double(inputs[3])


@pytest.mark.parametrize("lam", [None, 2.0])
def test_unet_equals_the_wrapping_processor(pipe, lam):
    """Guided batch, rows 0 and 2 of 3 bound (scattered), an encoder attention mask: the same UNet output."""
    prompts = ["a photo of a person at the beach", "a dog in the snow", "a person in a park"]
    latents, t, embeds, extra = guided(unet_inputs(pipe, prompts))
    mask = torch.ones(6, 77)
    mask[:, 60:] = 0  # padding tokens hidden
    outputs = {}
    for one_path in (True, False):
        controller = install(pipe.unet, one_path=one_path)
        try:
            adapter = make_adapter(pipe.unet)
            subject = person_subject(pipe, adapter, controller, prompts, [0, 2], seed=3, lam=lam)
            with torch.no_grad(), controller.bound([subject]):
                outputs[one_path] = [pipe.unet(latents, t, encoder_hidden_states=embeds, encoder_attention_mask=mask,
                                               **extra).sample for _ in range(2)]  # the second reuses the text's terms
        finally:
            controller.uninstall()
    for ours, wrapped in zip(outputs[True], outputs[False]):
        torch.testing.assert_close(ours, wrapped, atol=2e-5 * wrapped.abs().max().item(), rtol=0)
    with torch.no_grad():
        plain = pipe.unet(latents, t, encoder_hidden_states=embeds, encoder_attention_mask=mask, **extra).sample
    assert (outputs[True][0][[3, 5]] - plain[[3, 5]]).abs().max() > 1e-4


def test_training_gradients_equal_the_wrapping_processors(pipe):
    """What training sees: the adapter's gradients through a guided batch (rows 0 and 2 bound, an encoder mask) are
    the wrapping processor's. Tolerance 1e-4 of the largest gradient: the two paths sum the same terms in another
    order (fp32), which moves a gradient by about 1e-6 of its scale; a wrong term moves it by far more."""
    prompts = ["a photo of a person at the beach", "a dog in the snow", "a person in a park"]
    latents, t, embeds, extra = guided(unet_inputs(pipe, prompts))
    mask = torch.ones(6, 77)
    mask[:, 60:] = 0
    weights = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    grads = {}
    trainable = [p for p in pipe.unet.parameters() if p.requires_grad]
    pipe.unet.requires_grad_(False)  # frozen, as in training; the shared fixture is restored below
    for one_path in (True, False):
        controller = install(pipe.unet, one_path=one_path)
        try:
            torch.manual_seed(0)
            adapter = make_adapter(pipe.unet)
            subject = person_subject(pipe, adapter, controller, prompts, [0, 2], seed=3)
            tokens = torch.randn(1, adapter.config.num_queries, adapter.config.qformer_hidden_size,
                                 generator=torch.Generator().manual_seed(3))
            subject.nested = adapter.nested_keys_values(tokens, controller.layers)  # with autograd this time
            with controller.bound([subject]):
                out = pipe.unet(latents, t, encoder_hidden_states=embeds, encoder_attention_mask=mask, **extra).sample
            (out * weights).sum().backward()
            grads[one_path] = {n: p.grad.clone() for n, p in adapter.layers.named_parameters()}
        finally:
            controller.uninstall()
    for p in trainable:
        p.requires_grad_(True)
    assert all(p.grad is None for p in pipe.unet.parameters())
    assert grads[True].keys() == grads[False].keys()
    scale = max(g.abs().max().item() for g in grads[False].values())
    assert scale > 0
    for name, wrapped in grads[False].items():
        torch.testing.assert_close(grads[True][name], wrapped, atol=1e-4 * scale, rtol=0, msg=name)


def test_static_buffers_serve_two_subjects_in_turn_as_eager_binding_does(sd_pipe):
    """Bound one after the other, two subjects land in the same storage (what a captured CUDA graph replays) and
    give what eager binding gives."""
    unet = sd_pipe.unet
    prompts = ["a photo of a person at the beach"]
    latents, t, embeds, extra = guided(unet_inputs(sd_pipe, prompts))
    run = lambda: unet(latents, t, encoder_hidden_states=embeds, **extra).sample  # noqa: E731
    adapter = make_adapter(unet)
    outputs, addresses, plans = {}, [], []
    for static in (False, True):
        controller = install(unet, static_buffers=static)
        try:
            for seed in (1, 2):
                subject = person_subject(sd_pipe, adapter, controller, prompts, [0], seed=seed)
                with torch.no_grad(), controller.bound([subject]):
                    outputs[static, seed] = run()
                    if static:
                        plan = controller.plan
                        plans.append(plan)
                        tensors = [t for state in plan.states.values() for s in state
                                   for t in (s.nested_key, s.nested_value)]
                        tensors += [t for o in plan.outer.values() for t in (o.keep, o.norm_columns)]
                        addresses.append([t.data_ptr() for t in tensors])
            if static:
                allocations = controller.store.allocations
        finally:
            controller.uninstall()
    assert addresses[0] == addresses[1] and allocations == len(controller.store.buffers)  # none reallocated
    assert plans[0] is plans[1]  # and the same objects around them
    for seed in (1, 2):
        torch.testing.assert_close(outputs[True, seed], outputs[False, seed], atol=1e-6, rtol=1e-6)
    assert (outputs[True, 1] - outputs[True, 2]).abs().max() > 1e-4  # the second subject really replaced the first


def test_cuda_graphs_on_a_cpu_unet_is_refused_in_one_sentence(sd_pipe):
    from nested_attention import NestedAttention, NestedAttentionError

    with pytest.raises(NestedAttentionError, match=r"^cuda_graphs=True needs the UNet on a CUDA device \(it is on cpu\)"):
        NestedAttention(sd_pipe, cuda_graphs=True)
    assert not any(type(p).__name__.startswith("Nested") for p in sd_pipe.unet.attn_processors.values())


def test_static_buffers_refuse_subjects_that_carry_gradients(sd_pipe):
    from nested_attention import NestedAttentionError

    controller = install(sd_pipe.unet, static_buffers=True)
    try:
        adapter = make_adapter(sd_pipe.unet)
        subject = person_subject(sd_pipe, adapter, controller, ["a photo of a person"], [0], seed=1)
        subject.nested = {path: tuple(t.requires_grad_() for t in pair) for path, pair in subject.nested.items()}
        with pytest.raises(NestedAttentionError, match=r"^Static \(CUDA-graph\) buffers serve inference only"):
            controller.bind([subject])
        assert controller.subjects == [] and controller.plan is None  # nothing was bound
    finally:
        controller.uninstall()


@pytest.mark.slow
def test_compiled_unet_reads_each_new_subject_from_the_static_buffers(sd_pipe):
    """`cuda_graphs=True`'s compile on the CPU (no graphs there, the same tracing): one graph serves two subjects
    bound in turn, with no recompilation, and gives what eager binding gives."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    unet = sd_pipe.unet
    prompts = ["a photo of a person at the beach"]
    latents, t, embeds, extra = guided(unet_inputs(sd_pipe, prompts))
    run = lambda: unet(latents, t, encoder_hidden_states=embeds, **extra).sample  # noqa: E731
    adapter = make_adapter(unet)
    outputs = {}
    for static in (False, True):
        controller = install(unet, static_buffers=static)
        if static:
            torch._dynamo.reset()
            counters.clear()
            unet.compile(mode="reduce-overhead")
        try:
            for seed in (1, 2):
                with torch.no_grad(), controller.bound([person_subject(sd_pipe, adapter, controller, prompts, [0], seed)]):
                    outputs[static, seed] = run()
        finally:
            unet._compiled_call_impl = None
            controller.uninstall()
            torch._dynamo.reset()
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]
    for seed in (1, 2):
        torch.testing.assert_close(outputs[True, seed], outputs[False, seed], atol=1e-5, rtol=1e-5)
    assert (outputs[True, 1] - outputs[True, 2]).abs().max() > 1e-4
