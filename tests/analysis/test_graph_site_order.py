"""The rows of an attribution graph's drawing (spdjax.analysis.graphs.site_order): the sites in
the order the model calls them, on a 2-layer transformer with MLPs whose decomposition lists
every attention projection before the MLPs."""

import jax
import jax.numpy as jnp
import spdjax
from spdjax.analysis import graphs
from spdjax.families.lm import model as lm_model

CFG = lm_model.LMConfig("bytes", 256, 6, 8, 2, 2, d_mlp=16)


def test_sites_are_ordered_as_the_model_calls_them():
    target = lm_model.target(CFG)
    tp = lm_model.init_params(jax.random.key(0), CFG)
    d = spdjax.decompose(target, {"blocks_*/attn/*": 2, "blocks_*/mlp_*": 2})
    listed = list(d.site_names)
    assert listed.index("blocks_1/attn/q") < listed.index("blocks_0/mlp_in")  # what it fixes
    ids = jnp.zeros((1, 5), jnp.int32)
    order = graphs.site_order(d, tp, ids)
    _, called = target.forward(tp, ids, {})
    assert order == [n for n in called if n in listed] and sorted(order) == sorted(listed)
    for layer0 in ("blocks_0/mlp_in", "blocks_0/mlp_out"):
        assert order.index(layer0) < order.index("blocks_1/attn/q")
    assert order.index("blocks_0/attn/out") < order.index("blocks_0/mlp_in")
    assert order.index("blocks_1/mlp_in") < order.index("blocks_1/mlp_out") == len(order) - 1

