import pytest

from actcache.errors import ActcacheError
from actcache.hooks import HookSpec, deepest_block, parse_hooks


def test_parse_sorts_and_validates():
    specs = parse_hooks("blocks.3.hook_resid_post, blocks.1.hook_resid_pre", n_layers=4)
    assert specs == [HookSpec(1, "hook_resid_pre"), HookSpec(3, "hook_resid_post")]
    assert [s.name for s in specs] == ["blocks.1.hook_resid_pre", "blocks.3.hook_resid_post"]
    assert deepest_block(specs) == 3
    assert deepest_block(parse_hooks("blocks.2.hook_resid_pre")) == 1


@pytest.mark.parametrize("bad", ["blocks.x.hook_resid_post", "blocks.1.hook_mlp_out", "resid", ""])
def test_unknown_hook_names(bad):
    with pytest.raises(ActcacheError, match="hook"):
        parse_hooks(bad)


def test_layer_out_of_range_names_the_range():
    with pytest.raises(ActcacheError, match=r"out of range.*4 blocks.*0\.\.3"):
        parse_hooks("blocks.4.hook_resid_post", n_layers=4)


def test_duplicate_hook():
    with pytest.raises(ActcacheError, match="twice"):
        parse_hooks("blocks.1.hook_resid_post,blocks.1.hook_resid_post")
