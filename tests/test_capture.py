"""Hook semantics against Hugging Face's own output_hidden_states, every block."""

import pytest
import torch

from actcache.capture import ResidualCapture
from actcache.hooks import parse_hooks
from actcache.models import decoder_layers


@pytest.fixture(scope="module")
def ids(tiny_loaded):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, tiny_loaded.model.config.vocab_size, (2, 40), generator=g)
    ids[:, 0] = tiny_loaded.tokenizer.bos_token_id
    return ids


@pytest.fixture(scope="module")
def hf_hidden(tiny_loaded, ids):
    with torch.inference_mode():
        return tiny_loaded.model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states


def test_resid_post_equals_hf_hidden_states_every_block(tiny_loaded, ids, hf_hidden):
    n = tiny_loaded.model.config.num_hidden_layers
    specs = parse_hooks([f"blocks.{L}.hook_resid_post" for L in range(n)], n)
    with ResidualCapture(tiny_loaded.model, specs) as cap:
        acts = cap.run(ids)
    for L in range(n - 1):
        torch.testing.assert_close(acts[f"blocks.{L}.hook_resid_post"], hf_hidden[L + 1], rtol=0, atol=0)
    # HF's last entry is final-normed; the hook must give the raw block output instead.
    last = acts[f"blocks.{n - 1}.hook_resid_post"]
    assert not torch.allclose(last, hf_hidden[n])
    torch.testing.assert_close(tiny_loaded.model.model.norm(last), hf_hidden[n], rtol=1e-5, atol=1e-5)


def test_resid_pre_equals_previous_block_output(tiny_loaded, ids, hf_hidden):
    n = tiny_loaded.model.config.num_hidden_layers
    specs = parse_hooks([f"blocks.{L}.hook_resid_pre" for L in range(n)], n)
    with ResidualCapture(tiny_loaded.model, specs) as cap:
        acts = cap.run(ids)
    for L in range(n):
        torch.testing.assert_close(acts[f"blocks.{L}.hook_resid_pre"], hf_hidden[L], rtol=0, atol=0)


def test_forward_stops_after_deepest_block(tiny_loaded, ids):
    model = tiny_loaded.model
    calls = {"later": 0, "norm": 0, "head": 0}
    layers = decoder_layers(model)
    handles = [layers[2].register_forward_hook(lambda *a: calls.__setitem__("later", calls["later"] + 1)),
               model.model.norm.register_forward_hook(lambda *a: calls.__setitem__("norm", calls["norm"] + 1)),
               model.lm_head.register_forward_hook(lambda *a: calls.__setitem__("head", calls["head"] + 1))]
    try:
        with ResidualCapture(model, parse_hooks("blocks.0.hook_resid_post,blocks.1.hook_resid_post")) as cap:
            acts = cap.run(ids)
    finally:
        for h in handles:
            h.remove()
    assert set(acts) == {"blocks.0.hook_resid_post", "blocks.1.hook_resid_post"}
    assert calls == {"later": 0, "norm": 0, "head": 0}


def test_hooks_removed_after_context(tiny_loaded, ids):
    with ResidualCapture(tiny_loaded.model, parse_hooks("blocks.0.hook_resid_post")):
        pass
    with torch.inference_mode():
        out = tiny_loaded.model(input_ids=ids, use_cache=False)
    assert out.logits.shape[:2] == ids.shape
