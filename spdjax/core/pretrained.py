"""Published models from disk: a Hugging Face Flax checkpoint directory as a target.

:func:`from_pretrained` reads a directory written by ``save_pretrained`` (``config.json`` and
``flax_model.msgpack``), builds the Flax model that the config names and wraps its call as
``fn(params, inputs) -> output``, which :func:`spdjax.core.tracing.from_jax` turns into a target.
The wrapper supplies what each kind of model needs besides its main input (attention masks,
position and token-type ids: the defaults of the model's own ``__call__``), runs it
deterministically (no dropout) and returns one array (``b`` batch, ``s`` sequence):

``GPT2LMHeadModel``, ``LlamaForCausalLM``
    ``input_ids`` [b, s] (and optionally ``attention_mask``, ``position_ids``) -> ``logits``
    [b, s, vocab].
``BertForMaskedLM``; ``BertModel``
    ``input_ids`` [b, s] (optionally ``attention_mask``, ``token_type_ids``, ``position_ids``)
    -> masked-LM ``logits`` [b, s, vocab]; the base model's ``last_hidden_state`` [b, s, d].
``T5ForConditionalGeneration``
    ``input_ids`` [b, s] and ``decoder_input_ids`` [b, t] (optionally ``attention_mask``,
    ``decoder_attention_mask``) -> ``logits`` [b, t, vocab].
``ViTForImageClassification``; ``ViTModel``
    ``pixel_values`` [b, channels, height, width] -> ``logits`` [b, labels]; the base model's
    ``last_hidden_state`` [b, 1 + patches, d].

``inputs`` is the main array alone, a tuple of the inputs in the order above (T5:
``(input_ids, decoder_input_ids)``), or a dict keyed by their names; inputs left out take the
model's defaults (masks of ones, positions ``0..s-1``, token type 0). Pixel values are channels
first, as Hugging Face's image processors give them (the model transposes them itself).

transformers is an optional dependency (``pip install "spdjax[hf]"``); it is imported only
when a model is loaded, so spdjax imports without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import threading
import types
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from spdjax.core.target import Target
from spdjax.core.tracing import from_jax

_TEXT = ("input_ids", "attention_mask", "position_ids")
_BERT = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
_T5 = ("input_ids", "decoder_input_ids", "attention_mask", "decoder_attention_mask")
_IMAGE = ("pixel_values",)


@dataclasses.dataclass(frozen=True)
class _Kind:
    """How to call one architecture: its input names (the first ``required`` must be given),
    the output field returned, a default example input built from the config, options for the
    model class, and a context its code must run in."""

    inputs: tuple[str, ...]
    output: str
    example: Callable[[Any], Any]
    required: int = 1
    model_options: tuple[tuple[str, Any], ...] = ()
    shim: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def _example_ids(config) -> jax.Array:
    """One sequence of 8 tokens (fewer if the model has fewer positions): tracing needs shapes."""
    n_pos = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 8)
    return jnp.zeros((1, min(8, n_pos)), jnp.int32)


def _example_pair(config) -> tuple[jax.Array, jax.Array]:
    return _example_ids(config), _example_ids(config)


def _example_image(config) -> jax.Array:
    return jnp.zeros((1, config.num_channels, config.image_size, config.image_size), jnp.float32)


class _NumpyWithOldClip(types.ModuleType):
    """``jax.numpy`` as Hugging Face's Flax T5 expects it: ``clip`` also takes ``a_min`` /
    ``a_max``, everything else is ``jax.numpy`` itself."""

    def __getattr__(self, name):
        return getattr(jnp, name)

    @staticmethod
    def clip(arr, min=None, max=None, *, a_min=None, a_max=None):
        return jnp.clip(arr, min=a_min if min is None else min, max=a_max if max is None else max)


_t5_shim_lock = threading.Lock()
_t5_shim_users = 0


@contextlib.contextmanager
def _t5_clip_compat():
    """Flax T5's relative-position buckets call ``jnp.clip(x, a_max=...)``. JAX renamed clip's
    ``a_min``/``a_max`` to ``min``/``max``, and the JAX installed here (0.10.2) no longer accepts
    the old names (``TypeError: clip() got an unexpected keyword argument 'a_max'``), while
    transformers' Flax models are deprecated (gone in transformers 5). So only the name ``jnp``
    in the T5 modelling module is swapped, and only while a model is built or traced (counted,
    so that nested or concurrent uses keep it until the last one ends): no other code sees a
    changed ``jax.numpy``."""
    global _t5_shim_users
    from transformers.models.t5 import modeling_flax_t5 as t5

    with _t5_shim_lock:
        if _t5_shim_users == 0:
            t5.jnp = _NumpyWithOldClip("jax.numpy")
        _t5_shim_users += 1
    try:
        yield
    finally:
        with _t5_shim_lock:
            _t5_shim_users -= 1
            if _t5_shim_users == 0:
                t5.jnp = jnp


_CAUSAL_LM = _Kind(_TEXT, "logits", _example_ids)
# A base model's pooler feeds only ``pooler_output``: without it the hidden states are the whole
# function (no dead site), and a masked-LM checkpoint, which has no pooler, loads as a base model.
_NO_POOLER = (("add_pooling_layer", False),)
_T5_KIND = _Kind(_T5, "logits", _example_pair, required=2, shim=_t5_clip_compat)

# architecture (config.json's "architectures", without the "Flax" prefix) -> how to call it
ARCHITECTURES: dict[str, _Kind] = {
    "GPT2LMHeadModel": _CAUSAL_LM,
    "LlamaForCausalLM": _CAUSAL_LM,
    "BertForMaskedLM": _Kind(_BERT, "logits", _example_ids),
    "BertModel": _Kind(_BERT, "last_hidden_state", _example_ids, model_options=_NO_POOLER),
    "T5ForConditionalGeneration": _T5_KIND,
    "ViTForImageClassification": _Kind(_IMAGE, "logits", _example_image),
    "ViTModel": _Kind(_IMAGE, "last_hidden_state", _example_image, model_options=_NO_POOLER),
}
# a config.json without "architectures": its model_type's usual architecture
_BY_MODEL_TYPE = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                  "bert": "BertForMaskedLM", "t5": "T5ForConditionalGeneration",
                  "vit": "ViTModel"}

_FLAX_WEIGHTS = ("flax_model.msgpack", "flax_model.msgpack.index.json", "model.safetensors")
_TORCH_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json",
                  "model.safetensors.index.json")


def _architecture(config: dict, override: str | None, path: pathlib.Path) -> str:
    """The supported architecture named by ``override`` or ``config``, or a ValueError."""
    if override is not None:
        names, origin = [override.removeprefix("Flax")], "architecture="
    elif config.get("architectures"):
        names, origin = [a.removeprefix("Flax") for a in config["architectures"]], \
            f"{path / 'config.json'}'s \"architectures\""
    elif config.get("model_type") in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[config["model_type"]]
    else:
        names, origin = [], f"{path / 'config.json'} (model_type {config.get('model_type')!r})"
    for name in names:
        if name in ARCHITECTURES:
            return name
    raise ValueError(
        f"{origin} names {names or 'no architecture'}; from_pretrained supports "
        f"{sorted(ARCHITECTURES)} (pass architecture=... to choose one of them). For another "
        f"model, write fn(params, inputs) -> output around it and use spdjax.from_jax(fn, "
        f"params, example_input).")


def _check_weights(path: pathlib.Path, from_pt: bool, name: str) -> None:
    if any((path / f).is_file() for f in _FLAX_WEIGHTS):
        return
    torch_files = [f for f in _TORCH_WEIGHTS if (path / f).is_file()]
    if torch_files and not from_pt:
        raise FileNotFoundError(
            f"{path} holds PyTorch weights only ({', '.join(torch_files)}), no "
            f"flax_model.msgpack. Convert them once where torch is installed "
            f"(transformers.Flax{name}.from_pretrained(path, from_pt=True)"
            f".save_pretrained(new_path)), or install torch and pass from_pt=True here.")
    if not torch_files:
        raise FileNotFoundError(
            f"{path} has no model weights: expected one of {list(_FLAX_WEIGHTS)} (as written by "
            f"a Flax model's save_pretrained) or PyTorch weights with from_pt=True.")


def _call_arguments(kind: _Kind, architecture: str, inputs) -> dict:
    """``inputs`` (an array, a tuple in ``kind.inputs`` order, or a dict) as call arguments."""
    if isinstance(inputs, dict):
        unknown = sorted(set(inputs) - set(kind.inputs))
        if unknown:
            raise ValueError(f"{architecture} takes inputs {list(kind.inputs)}; got {unknown}.")
        args = dict(inputs)
    elif isinstance(inputs, (tuple, list)):
        if len(inputs) > len(kind.inputs):
            raise ValueError(f"{architecture} takes at most {len(kind.inputs)} inputs "
                             f"{list(kind.inputs)}; got a sequence of {len(inputs)}.")
        args = dict(zip(kind.inputs, inputs))
    else:
        args = {kind.inputs[0]: inputs}
    missing = [n for n in kind.inputs[:kind.required] if n not in args]
    if missing:
        raise ValueError(
            f"{architecture} needs {list(kind.inputs[:kind.required])}, as a tuple in that order "
            f"or a dict; missing {missing}.")
    return args


def _plain(tree):
    """Nested plain dicts of arrays on the default device, not committed to one: transformers
    loads uninitialised models' weights onto the host CPU, where a jitted step with its batch on
    an accelerator would reject them."""
    if hasattr(tree, "items"):
        return {k: _plain(v) for k, v in tree.items()}
    return jnp.asarray(np.asarray(tree))


def _flat_keys(tree, prefix=()) -> set[tuple]:
    if hasattr(tree, "items"):
        return set().union(*(_flat_keys(v, prefix + (k,)) for k, v in tree.items()))
    return {prefix}


def from_pretrained(path: str | pathlib.Path, example_input: Any = None, *,
                    architecture: str | None = None,
                    **load_options) -> tuple[Target, dict]:
    """Loads a Hugging Face Flax model saved by ``save_pretrained`` as a target.

    ``path``: the directory (``config.json`` plus Flax weights). ``example_input``: one batch in
    the form the module docstring describes (default: a batch of one built from the config:
    8 tokens, or one image at the configured size); it is traced once to find the sites.
    ``architecture``: one of those the module docstring lists (the keys of ``ARCHITECTURES``),
    used instead of the config's: e.g. ``"BertModel"`` for the hidden states of a
    ``BertForMaskedLM`` checkpoint (a base model is built without its pooler, which feeds only
    ``pooler_output``; a checkpoint's pooler weights are then left unused).
    ``load_options`` go to the model class's ``from_pretrained`` (e.g. ``from_pt=True`` to read
    PyTorch weights, which needs torch).

    Returns ``(target, target_params)``: ``target(params, inputs)`` is the model's output (module
    docstring), sites named by parameter path (``transformer/h/0/attn/c_attn``).
    """
    path = pathlib.Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"from_pretrained: {str(path)!r} is not a directory; expected "
                                f"one written by a Hugging Face model's save_pretrained.")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"from_pretrained: {path} has no config.json; expected a "
                                f"directory written by a Hugging Face model's save_pretrained.")
    if "_do_init" in load_options:
        raise ValueError("from_pretrained loads the checkpoint's weights without initialising "
                         "the model; do not pass _do_init.")
    name = _architecture(json.loads(config_file.read_text()), architecture, path)
    _check_weights(path, load_options.get("from_pt", False), name)
    try:
        # optional dependency: imported here so that spdjax imports without transformers
        import transformers
    except ImportError as e:
        raise ImportError("from_pretrained needs transformers with its Flax models: "
                          "pip install \"spdjax[hf]\" (transformers<5).") from e
    kind = ARCHITECTURES[name]
    with kind.shim():  # the constructor traces the model once for its parameter shapes
        model, params = getattr(transformers, "Flax" + name).from_pretrained(
            path, _do_init=False, local_files_only=True, **dict(kind.model_options),
            **load_options)
    params = _plain(params)
    missing = model.required_params - _flat_keys(params)
    if missing:
        raise ValueError(
            f"{path} lacks weights that {name} needs: {sorted('/'.join(k) for k in missing)}. "
            f"Is it a checkpoint of another architecture? Pass architecture=... (one of "
            f"{sorted(ARCHITECTURES)}).")

    def fn(p, inputs):
        args = _call_arguments(kind, name, inputs)
        with kind.shim():
            out = model(**args, params=p, train=False, output_attentions=False,
                        output_hidden_states=False, return_dict=True)
        return out[kind.output]

    if example_input is None:
        example_input = kind.example(model.config)
    return from_jax(fn, params, example_input)
