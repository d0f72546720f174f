"""Hugging Face Llama-layout checkpoints (Llama, Mistral, Qwen2) <-> our parameters: layouts and I/O.

The config mapping of each family is in families.py.

Layouts. A Hugging Face Linear weight is [out, in]; ours are [in..., out...] with heads split out,
and per-layer tensors are stacked on a leading `layers` axis (the scanned Block):

  model.embed_tokens.weight             [V, D]       embed.table                  [V, D]
  model.layers.{l}.self_attn.q_proj     [N*K, D]     blocks.attention.query       [L, D, N, K]
  model.layers.{l}.self_attn.k_proj     [G*K, D]     blocks.attention.key         [L, D, G, K]
  model.layers.{l}.self_attn.v_proj     [G*K, D]     blocks.attention.value       [L, D, G, K]
  model.layers.{l}.self_attn.o_proj     [D, N*K]     blocks.attention.out         [L, N, K, D]
  model.layers.{l}.mlp.gate_proj/up     [F, D]       blocks.mlp.gate / up         [L, D, F]
  model.layers.{l}.mlp.down_proj        [D, F]       blocks.mlp.down              [L, F, D]
  model.layers.{l}.input_layernorm      [D]          blocks.attention_norm.scale  [L, D]
  model.layers.{l}.post_attention_ln    [D]          blocks.mlp_norm.scale        [L, D]
  model.norm.weight                     [D]          final_norm.scale             [D]
  lm_head.weight (untied only)          [V, D]       unembed.kernel               [D, V]
  model.layers.{l}.self_attn.q_proj.bias [N*K] (Qwen2) blocks.attention.query.bias  [L, N, K]
  model.layers.{l}.self_attn.k/v_proj.bias [G*K]       blocks.attention.key/value.bias [L, G, K]

Row n*K + k of q_proj is head n, dimension k (transformers views q as [..., N, K]). Both models
rotate dimension i with i + K/2 (`rotate_half`), so q and k need no permutation: a reshape and a
transpose are the whole conversion.

Import reads every array shard by shard (`jax.make_array_from_callback`): each device's block is
cut from the safetensors files with `get_slice`, so no tensor is ever whole in host memory unless
a device holds it whole.
"""

import contextlib
import dataclasses
import glob
import json
import math
import os
import re
from typing import Any, Callable, Iterator

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from launch.huggingface.families import HfConfigError, hf_config_from_model, model_fields_from_hf, read_hf_config
from lm.config import DTYPES, ModelConfig

__all__ = ["HfConfigError", "hf_config_from_model", "model_fields_from_hf", "read_hf_config"]  # re-exported
INDEX_FILE = "model.safetensors.index.json"
EXPORT_FILE = "model.safetensors"
_FILE_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
# Buffers some older checkpoints store; recomputed from rope_theta, so they are skipped.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


@dataclasses.dataclass(frozen=True)
class TensorMap:
  """How one of our parameters is laid out in Hugging Face tensors.

  The HF tensor (one per layer when `stacked`) is reshaped from its file dims to `groups` flattened
  (file dim i splits into the sizes groups[i]), then transposed by `perm` into our per-layer layout.
  """
  ours: tuple[str, ...]
  hf: str                            # with "{layer}" when stacked
  groups: tuple[tuple[int, ...], ...]
  perm: tuple[int, ...]
  stacked: bool

  def file_shape(self) -> tuple[int, ...]:
    return tuple(math.prod(g) for g in self.groups)

  def names(self, num_layers: int) -> list[str]:
    return [self.hf.format(layer=i) for i in range(num_layers)] if self.stacked else [self.hf]


def tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
  """The TensorMap of every parameter of a model with config `cfg` (see the module docstring)."""
  d, n, g, k, f, v = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
  layer = "model.layers.{layer}."
  maps = [
      TensorMap(("embed", "table"), "model.embed_tokens.weight", ((v,), (d,)), (0, 1), False),
      TensorMap(("final_norm", "scale"), "model.norm.weight", ((d,),), (0,), False),
      TensorMap(("blocks", "attention_norm", "scale"), layer + "input_layernorm.weight", ((d,),), (0,), True),
      TensorMap(("blocks", "mlp_norm", "scale"), layer + "post_attention_layernorm.weight", ((d,),), (0,),
                True),
      TensorMap(("blocks", "attention", "query", "kernel"), layer + "self_attn.q_proj.weight",
                ((n, k), (d,)), (2, 0, 1), True),
      TensorMap(("blocks", "attention", "key", "kernel"), layer + "self_attn.k_proj.weight",
                ((g, k), (d,)), (2, 0, 1), True),
      TensorMap(("blocks", "attention", "value", "kernel"), layer + "self_attn.v_proj.weight",
                ((g, k), (d,)), (2, 0, 1), True),
      TensorMap(("blocks", "attention", "out", "kernel"), layer + "self_attn.o_proj.weight",
                ((d,), (n, k)), (1, 2, 0), True),
      TensorMap(("blocks", "mlp", "gate", "kernel"), layer + "mlp.gate_proj.weight", ((f,), (d,)), (1, 0), True),
      TensorMap(("blocks", "mlp", "up", "kernel"), layer + "mlp.up_proj.weight", ((f,), (d,)), (1, 0), True),
      TensorMap(("blocks", "mlp", "down", "kernel"), layer + "mlp.down_proj.weight", ((d,), (f,)), (1, 0), True),
  ]
  if not cfg.tie_embeddings:
    maps.append(TensorMap(("unembed", "kernel"), "lm_head.weight", ((v,), (d,)), (1, 0), False))
  if cfg.qkv_bias:
    for ours, proj, heads in (("query", "q", n), ("key", "k", g), ("value", "v", g)):
      maps.append(TensorMap(("blocks", "attention", ours, "bias"), layer + f"self_attn.{proj}_proj.bias",
                            ((heads, k),), (0, 1), True))
  return maps


class HfTensors:
  """The tensors of a Hugging Face checkpoint directory, open for slicing (use as a context manager).

  Reads model.safetensors.index.json when present, else every *.safetensors file in the directory.
  """

  def __init__(self, directory: str):
    self.directory = directory
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index_path):
      with open(index_path) as fh:
        weight_map = json.load(fh)["weight_map"]
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory, "*.safetensors")))
      weight_map = None
    if not files:
      raise HfConfigError(f"{directory} holds no *.safetensors files (pytorch_model.bin is not read: "
                          "re-save the model with save_pretrained(..., safe_serialization=True)).")
    missing = [f for f in files if not os.path.exists(os.path.join(directory, f))]
    if missing:
      raise HfConfigError(f"{INDEX_FILE} in {directory} names files that are not there: {missing}.")
    self._stack = contextlib.ExitStack()
    self._handles = {}
    for i, f in enumerate(files):
      path = os.path.join(directory, f)
      try:
        self._handles[f] = self._stack.enter_context(safe_open(path, framework="flax"))
      except Exception as e:  # safetensors raises its own SafetensorError (and OSError) for bad files
        self._stack.close()
        raise HfConfigError(f"{path} (file {i + 1} of {len(files)}, {os.path.getsize(path)} bytes) cannot be "
                            f"read as safetensors: {e}. It is truncated or corrupt; download it again.") from e
    self.file_of = weight_map or {name: f for f, h in self._handles.items() for name in h.keys()}
    for name, f in self.file_of.items():
      if name not in self._handles[f].keys():
        self._stack.close()
        raise HfConfigError(f"{INDEX_FILE} in {directory} puts tensor {name} in {f}, which does not hold "
                            "it; the file or the index is from another download.")

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._stack.close()

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handles[self.file_of[name]].get_slice(name).get_shape())

  def dtype(self, name: str) -> str:
    return self._handles[self.file_of[name]].get_slice(name).get_dtype()

  def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
    """Returns tensor `name`[index] as numpy, reading only that block from disk."""
    return np.asarray(self._handles[self.file_of[name]].get_slice(name)[index])


def check_tensors(tensors: HfTensors, cfg: ModelConfig) -> None:
  """Raises HfConfigError naming any missing, unexpected or misshapen tensor (before anything is written)."""
  expected = {name: m.file_shape() for m in tensor_maps(cfg) for name in m.names(cfg.num_layers)}
  errors = []
  for name, shape in expected.items():
    if name not in tensors.file_of:
      hint = " (config.json says tie_word_embeddings=false)" if name == "lm_head.weight" else ""
      errors.append(f"tensor {name} is missing{hint}.")
    elif tensors.shape(name) != shape:
      errors.append(f"tensor {name} has shape {tensors.shape(name)}; config.json implies {shape}.")
    elif tensors.dtype(name) not in _FILE_DTYPES:
      errors.append(f"tensor {name} has dtype {tensors.dtype(name)}; only {sorted(_FILE_DTYPES)} convert.")
  for name in sorted(set(tensors.file_of) - set(expected)):
    if _IGNORED.fullmatch(name) or (name == "lm_head.weight" and cfg.tie_embeddings):
      continue
    why = ("config.json declares no bias for this layer" if name.endswith(".bias")
           else "the model config.json describes has no such weight")
    errors.append(f"tensor {name} is unexpected: {why}.")
  if errors:
    shown = errors[:12] + ([f"... and {len(errors) - 12} more."] if len(errors) > 12 else [])
    raise HfConfigError(f"{tensors.directory}: the tensors do not match its config.json:\n  " +
                        "\n  ".join(shown))


def _read_block(tensors: HfTensors, name: str, m: TensorMap, ours: tuple[slice, ...]) -> np.ndarray:
  """Reads our per-layer block `ours` (one slice per our dim) of tensor `name`, in our layout.

  A file dim split into sizes (a, b, ...) is read over the contiguous rows that cover the requested
  range of `a` (whole b, ...), then reshaped and cut to the requested ranges of b, ...
  """
  split = [None] * len(m.perm)
  for our_dim, split_dim in enumerate(m.perm):
    split[split_dim] = ours[our_dim]
  file_index, block_shape, inner_index, i = [], [], [], 0
  for group in m.groups:
    subs = split[i:i + len(group)]
    start, stop, _ = subs[0].indices(group[0])
    inner = math.prod(group[1:])
    file_index.append(slice(start * inner, stop * inner))
    block_shape += [stop - start, *group[1:]]
    inner_index += [slice(None)] + list(subs[1:])
    i += len(group)
  block = tensors.read(name, tuple(file_index)).reshape(block_shape)
  return block[tuple(inner_index)].transpose(m.perm)


def import_params(tensors: HfTensors, cfg: ModelConfig, abstract_params, shardings) -> dict:
  """Places every HF tensor onto `shardings` (same tree as `abstract_params`) in our layout and dtype.

  Each device's block is read on its own (`make_array_from_callback`); per-layer tensors are stacked
  along our leading `layers` axis. Returns the params tree (nested dict of jax.Arrays).
  """
  maps = {m.ours: m for m in tensor_maps(cfg)}
  dtype = np.dtype(DTYPES[cfg.param_dtype])

  def place(path, abstract, sharding):
    key = tuple(p.key for p in path)
    if key not in maps:
      raise HfConfigError(f"our parameter {'.'.join(key)} has no Hugging Face counterpart in "
                          "launch/huggingface/checkpoint.tensor_maps; add one there.")
    m = maps[key]
    cache: dict[Any, np.ndarray] = {}  # devices holding the same block (replicas) read it once

    def read(index: tuple[slice, ...]) -> np.ndarray:
      bounds = tuple(s.indices(n)[:2] for s, n in zip(index, abstract.shape))
      if bounds not in cache:
        if m.stacked:
          layers = range(*index[0].indices(cfg.num_layers))
          cache[bounds] = np.stack([_read_block(tensors, m.hf.format(layer=l), m, index[1:]).astype(dtype)
                                    for l in layers])
        else:
          cache[bounds] = _read_block(tensors, m.hf, m, index).astype(dtype)
      return cache[bounds]

    return jax.make_array_from_callback(abstract.shape, sharding, read)

  return jax.tree_util.tree_map_with_path(place, abstract_params, shardings)


def _to_host(x: jax.Array) -> np.ndarray:
  if not x.is_fully_addressable:  # several processes: gather the global array on every host
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def export_tensors(params, cfg: ModelConfig, dtype: str) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF name, array in the HF layout and `dtype`) for every tensor of `params`."""
  out_dtype = np.dtype(DTYPES[dtype])
  for m in tensor_maps(cfg):
    value = params
    for key in m.ours:
      value = value[key]
    full = _to_host(value)
    inverse = tuple(np.argsort(m.perm))
    for i, name in enumerate(m.names(cfg.num_layers)):
      block = full[i] if m.stacked else full
      hf = block.transpose(inverse).reshape(m.file_shape())
      yield name, np.ascontiguousarray(hf.astype(out_dtype))


def write_hf(directory: str, params, cfg: ModelConfig, dtype: str, base_config: dict | None = None,
             is_primary: Callable[[], bool] = lambda: jax.process_index() == 0) -> list[str]:
  """Writes config.json and model.safetensors (every tensor gathered to host memory) to `directory`."""
  tensors = dict(export_tensors(params, cfg, dtype))
  if not is_primary():
    return []
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w") as fh:
    json.dump(hf_config_from_model(cfg, dtype, base_config), fh, indent=2, sort_keys=True)
  save_file(tensors, os.path.join(directory, EXPORT_FILE), metadata={"format": "pt"})
  return sorted(os.listdir(directory))
