"""Tests for int8 quantization: lm/quant.py (layers, math), compress/ (conversion, calibration,
export) and compress/quantize_run.py (checkpoints, errors).

Numerics are checked against NumPy references (int64 integer matmuls, float64 float ones). Models
are tiny and every jitted function is compiled once per module.
"""

import ast
import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from compress import calibrate as calibrate_lib
from compress import quantize as quantize_lib
from compress.export import save_servable
from compress.servable import Servable
from configs.base import base_config
from launch.run import checkpoint as ckpt_lib
from launch.run import programs
from launch.run import state as ts
from launch.run.plan import config_for_model, make_plan
from launch.run.config import model_config, validate
from launch.run.restore import load_checkpoint
from compress.quantize_run import quantize_checkpoint
from lm import quant
from lm.attention_plan import unplanned
from lm.decoding import make_generate_fn
from lm.generate import left_pad
from lm.serving import serving_params
from lm.transformer import Transformer
from sharding import rules as rules_lib

TINY = dict(vocab_size=259, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
            mlp_dim=64, max_seq_len=32, tie_embeddings=False)


def _float_model(**overrides):
  cfg = model_config(**{**TINY, **overrides})
  params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)))()
  return cfg, params


@functools.partial(jax.jit, static_argnames="graphdef")
def _forward(graphdef, params, tokens_BxL):
  return nnx.merge(graphdef, params)(tokens_BxL)


def _graphdef(cfg):
  return ts.model_def(cfg, None, unplanned(cfg.attention)).graphdef


def _plan(cfg):
  """A one-device run plan of `cfg`'s model (what calibration runs on)."""
  return make_plan(config_for_model(cfg))


def _tokens(batch, length, seed=0):
  return np.random.RandomState(seed).randint(0, TINY["vocab_size"], (batch, length)).astype(np.int32)


# --- the int8 math --------------------------------------------------------------------------------

def test_quantize_dequantize_error_is_within_half_a_step():
  kernel = np.random.RandomState(0).standard_t(3, (3, 48, 4, 8)).astype(np.float32)  # heavy tails
  values, scale = quantize_lib.quantize_kernel(jnp.asarray(kernel), num_stacked=1, num_in=1)
  assert values.dtype == jnp.int8 and scale.shape == (3, 4, 8)
  assert int(jnp.max(jnp.abs(values.astype(jnp.int32)))) == 127  # the largest weight hits the grid end
  scale_b = np.asarray(scale)[:, None]
  err = np.abs(kernel - np.asarray(values, np.float32) * scale_b)
  assert np.all(err <= scale_b / 2 * (1 + 1e-6))


def test_int8_matmul_is_exact_and_equals_float_matmul_of_dequantized_operands():
  rng = np.random.RandomState(1)
  x = rng.randn(2, 5, 64).astype(np.float32) * 3
  kernel = rng.randn(64, 6, 8).astype(np.float32)
  x_q, x_scale = quant.quantize_symmetric(jnp.asarray(x), (2,))
  w_q, w_scale = quantize_lib.quantize_kernel(jnp.asarray(kernel), 0, 1)
  acc = quant.int8_matmul(x_q, w_q, num_in=1)
  assert acc.dtype == jnp.int32
  exact = np.einsum("bli,ihk->blhk", np.asarray(x_q, np.int64), np.asarray(w_q, np.int64))
  np.testing.assert_array_equal(np.asarray(acc), exact)
  y = quant.w8a8_matmul(jnp.asarray(x), w_q, w_scale, num_in=1)
  x_deq = np.asarray(x_q, np.float64) * np.asarray(x_scale, np.float64)
  w_deq = np.asarray(w_q, np.float64) * np.asarray(w_scale, np.float64)
  np.testing.assert_allclose(np.asarray(y), np.einsum("bli,ihk->blhk", x_deq, w_deq), rtol=1e-6, atol=1e-6)


def test_smoothing_is_exact_in_float_and_tames_an_outlier_channel():
  rng = np.random.RandomState(2)
  x = rng.randn(64, 32).astype(np.float32)
  x[:, 3] *= 60  # one outlier channel, as in LLM activations
  kernel = rng.randn(32, 16).astype(np.float32) * 0.1
  s = quantize_lib.smoothing_factors(jnp.max(jnp.abs(x), 0), jnp.asarray(kernel), num_in=1, alpha=0.5)
  np.testing.assert_allclose((x / s) @ (np.asarray(s)[:, None] * kernel), x @ kernel, rtol=1e-4, atol=1e-4)
  reference = x.astype(np.float64) @ kernel

  def w8a8_error(smooth):
    w_q, w_scale = quantize_lib.quantize_kernel(jnp.asarray(kernel) * smooth[:, None], 0, 1)
    y = quant.w8a8_matmul(jnp.asarray(x) / smooth, w_q, w_scale, num_in=1)
    return np.abs(np.asarray(y) - reference).mean()

  assert w8a8_error(s) < 0.5 * w8a8_error(jnp.ones(32))


# --- quantized models -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def float_model():
  return _float_model()


@pytest.mark.parametrize("mode,smooth,embedding", [("w8a16", False, False), ("w8a16", False, True),
                                                   ("w8a8", False, False), ("w8a8", True, True)])
def test_quantized_model_tracks_the_float_model(float_model, mode, smooth, embedding):
  cfg, params = float_model
  tokens = _tokens(2, 16)
  ranges = calibrate_lib.calibrate(_plan(cfg), params, [_tokens(4, 16, seed=9)]) if smooth else None
  qcfg = quantize_lib.quantized_config(cfg, mode, embedding=embedding)
  qparams = quantize_lib.quantize_params(params, qcfg, ranges)
  ref = np.asarray(_forward(_graphdef(cfg), params, tokens))
  got = np.asarray(_forward(_graphdef(qcfg), qparams, tokens))
  rel = np.abs(got - ref).max() / np.abs(ref).max()
  assert rel < (0.02 if mode == "w8a16" else 0.05), rel
  # The tree holds what it claims: dequantized kernels are within half a step of the float ones.
  deq = quantize_lib.dequantize_params(qparams)
  w = params["blocks"]["mlp"]["up"]["kernel"]
  step = np.asarray(qparams["blocks"]["mlp"]["up"]["scale"])[:, None]
  smooth_up = np.asarray(qparams["blocks"]["mlp"]["up"].get("smooth", np.ones((2, 32))))[:, :, None]
  assert np.all(np.abs(np.asarray(deq["blocks"]["mlp"]["up"]["kernel"]) - w) <= step / 2 / smooth_up + 1e-7)


def test_quantized_params_keep_logical_names_and_shardings(float_model):
  cfg = dataclasses.replace(float_model[0], vocab_size=256)  # divisible by the tensor axis
  float_names = ts.model_def(cfg).logical_names
  qdef = ts.model_def(quantize_lib.quantized_config(cfg, "w8a8", embedding=True, skip=("mlp.down",)))
  names, shapes = qdef.logical_names, qdef.abstract_params
  for layer in ("query", "key", "value", "out"):
    got, want = names["blocks"]["attention"][layer], float_names["blocks"]["attention"][layer]["kernel"]
    assert got["kernel"] == want and shapes["blocks"]["attention"][layer]["kernel"].dtype == jnp.int8
    num_out = 1 if layer == "out" else 2
    assert got["scale"] == ("layers",) + want[-num_out:]
    assert got["smooth"] == want[:-num_out]
  assert names["blocks"]["mlp"]["down"] == {"kernel": ("layers", "mlp", "embed")}  # skipped: float
  assert shapes["blocks"]["mlp"]["down"]["kernel"].dtype == jnp.float32
  assert names["embed"] == {"table": ("vocab", "embed"), "scale": ("vocab",)}
  specs = rules_lib.tree_specs(names, shapes, {"data": 1, "fsdp": 2, "tensor": 2},
                               rules_lib.get_rules("fsdp_tp"))
  assert specs["blocks"]["attention"]["query"]["scale"] == jax.sharding.PartitionSpec(None, "tensor", None)
  assert specs["unembed"]["kernel"] == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_export_round_trip_gives_the_same_logits(float_model, tmp_path):
  cfg, params = float_model
  qcfg = quantize_lib.quantized_config(cfg, "w8a8", embedding=True)
  qparams = quantize_lib.quantize_params(params, qcfg)
  save_servable(str(tmp_path), _graphdef(qcfg), qparams, qcfg, batch=None, seq_len=16, step=0)
  servable = Servable(str(tmp_path))
  tokens = _tokens(3, 16)  # any batch: the exported batch is symbolic
  np.testing.assert_allclose(np.asarray(servable(tokens)), np.asarray(_forward(_graphdef(qcfg), qparams, tokens)),
                             rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match=r"takes \[any batch, 16\]"):
    servable(_tokens(1, 8))
  # The loader runs without the model code: it imports nothing of ours.
  tree = ast.parse(open(os.path.join(os.path.dirname(__file__), "..", "compress", "servable.py")).read())
  imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
  imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
  assert imported <= {"json", "os", "sys", "jax", "numpy"}


def test_exported_generation_equals_in_process_generation(float_model, tmp_path):
  cfg, params = float_model
  qcfg = quantize_lib.quantized_config(cfg, "w8a16", embedding=True)
  qparams = quantize_lib.quantize_params(params, qcfg)
  save_servable(str(tmp_path), _graphdef(qcfg), qparams, qcfg, batch=None, seq_len=8, step=0,
                generate_tokens=6, serving_graphdef=programs.serving_mdef(_plan(qcfg)).graphdef)
  servable = Servable(str(tmp_path))
  prompts, lengths = left_pad([[5, 9, 2], [7, 7, 1, 4, 30, 12, 8, 3], [11]], width=8)
  expected = make_generate_fn(_graphdef(qcfg), max_new_tokens=6, temperature=0.0)(
      qparams, prompts, jax.random.key(0), lengths)
  np.testing.assert_array_equal(servable.generate(prompts, lengths), expected)
  with pytest.raises(ValueError, match="left-pad"):
    servable.generate(prompts[:, 1:])


# --- checkpoints, generation, errors --------------------------------------------------------------

@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
  """A freshly initialized tiny float checkpoint on the bundled corpus (byte tokens)."""
  c = base_config()
  for key, value in TINY.items():
    c.model[key] = value
  c.data.tokenizer, c.data.seq_len = "byte", 32
  c.data.data_dir = str(tmp_path_factory.mktemp("data"))
  c.train.global_batch_size = 8
  cfg = validate(c)
  plan = make_plan(cfg)
  state = ts.init_train_state(plan.mdef, plan.tx, plan.shardings, seed=0)
  directory = str(tmp_path_factory.mktemp("float") / "checkpoints")
  checkpointer = ckpt_lib.Checkpointer(directory, async_save=False)
  checkpointer.save(3, state, {"config": cfg.to_dict()})
  checkpointer.close()
  return directory


@pytest.fixture(scope="module")
def w8a8_checkpoint(float_checkpoint, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("quant") / "w8a8")
  report = quantize_checkpoint(float_checkpoint, out, mode="w8a8", quantize_embedding=True,
                               skip=("attention.out",), calibration_batches=2)
  return out, report


def test_quantized_checkpoint_round_trips(float_checkpoint, w8a8_checkpoint):
  out, report = w8a8_checkpoint
  assert report["smooth"] and report["quantized_param_bytes"] > 0
  loaded = load_checkpoint(out)
  # Array bytes, not bytes on disk: for a model this tiny, orbax's per-array metadata outweighs the
  # int8 saving and varies between installs (the demo model's files are 3.9x smaller; docs/quantization.md).
  array_bytes = lambda params: sum(x.nbytes for x in jax.tree.leaves(params))
  assert array_bytes(loaded.params) < array_bytes(load_checkpoint(float_checkpoint).params)
  assert (loaded.cfg.model.quant, loaded.cfg.model.quant_embedding, loaded.cfg.model.quant_skip) == (
      "w8a8", True, "attention.out")
  assert loaded.step == 3
  source = load_checkpoint(float_checkpoint)
  qdef = ts.model_def(loaded.cfg.model)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), loaded.params) == jax.tree.map(
      lambda x: (x.shape, x.dtype), qdef.abstract_params)
  # What came back reproduces the float weights within int8 rounding; the rest is bit-exact.
  query, float_query = loaded.params["blocks"]["attention"]["query"], source.params["blocks"]["attention"]["query"]
  half_step = np.asarray(query["scale"])[:, None] / 2 / np.asarray(query["smooth"])[:, :, None, None]
  deq = quantize_lib.dequantize_params(loaded.params)
  err = np.abs(np.asarray(deq["blocks"]["attention"]["query"]["kernel"]) - np.asarray(float_query["kernel"]))
  assert np.all(err <= half_step * (1 + 1e-5))
  assert not np.all(np.asarray(query["smooth"]) == 1)  # calibration did smooth
  table_err = np.abs(np.asarray(deq["embed"]["table"]) - np.asarray(source.params["embed"]["table"]))
  assert np.all(table_err <= np.asarray(loaded.params["embed"]["scale"])[:, None] / 2 * (1 + 1e-5))
  for path in (("blocks", "attention", "out", "kernel"), ("blocks", "mlp_norm", "scale"), ("final_norm", "scale")):
    got, want = loaded.params, source.params
    for key in path:
      got, want = got[key], want[key]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert loaded.params["blocks"]["attention"]["query"]["kernel"].sharding.mesh.size == 8


def test_quantized_generation_with_kv_cache_equals_greedy_full_forward(w8a8_checkpoint):
  loaded = load_checkpoint(w8a8_checkpoint[0], devices=jax.devices()[:1])
  graphdef, params = loaded.plan.mdef.graphdef, loaded.params
  prompt, new = _tokens(2, 5, seed=3), 10
  generated = np.asarray(make_generate_fn(graphdef, max_new_tokens=new, temperature=0.0)(
      params, prompt, jax.random.key(0)))
  tokens = np.zeros((2, 5 + new), np.int32)
  tokens[:, :5] = prompt
  for t in range(5, 5 + new):  # causal, so the zeros after position t never change its logits
    tokens[:, t] = np.asarray(_forward(graphdef, params, tokens))[:, t - 1].argmax(-1)
  np.testing.assert_array_equal(generated, tokens)
  # The serving layout (per-layer weights, lm/serving.py) generates the same tokens.
  served = make_generate_fn(programs.serving_mdef(loaded.plan).graphdef, max_new_tokens=new, temperature=0.0)(
      serving_params(params, loaded.cfg.model.compute_dtype), prompt, jax.random.key(0))
  np.testing.assert_array_equal(served, tokens)
  # And the programs launch.generate runs (launch/run/programs.Generation) generate them too.
  run = programs.Generation(loaded.plan, max_new_tokens=new)
  through_plan = run(programs.serving_params(loaded.plan, params), prompt, jax.random.key(0),
                     np.full((2,), 5, np.int32))
  np.testing.assert_array_equal(through_plan, tokens)


def test_generate_command_streams_a_prompts_file(w8a8_checkpoint, tmp_path):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("ROMEO.\n\nO Juliet, Juliet\nAy\n")
  result = subprocess.run(
      [sys.executable, "-m", "launch.generate", f"--checkpoint_dir={w8a8_checkpoint[0]}",
       f"--prompts_file={prompts}", "--temperature=0", "--max_new_tokens=4", "--batch_size=2",
       "--kv_cache_dtype=int8"],  # int8 weights and an int8 KV cache, through the command
      capture_output=True, text=True, timeout=600, cwd=os.path.join(os.path.dirname(__file__), ".."))
  assert result.returncode == 0, result.stderr[-2000:]
  lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
  assert [line["index"] for line in lines] == [0, 1, 2]
  for line, prompt in zip(lines, ["ROMEO.", "O Juliet, Juliet", "Ay"]):
    assert line["text"].startswith(prompt)


def test_missing_float_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(ckpt_lib.CheckpointError, match="No checkpoint directory at .*nowhere"):
    quantize_checkpoint(str(tmp_path / "nowhere"), str(tmp_path / "out"), mode="w8a16")


def test_zero_calibration_batches_is_a_clear_error(float_model, tmp_path):
  cfg, params = float_model
  with pytest.raises(ValueError, match="zero batches"):
    calibrate_lib.calibrate(_plan(cfg), params, [])
  with pytest.raises(ValueError, match="calibration_batches=0"):  # before anything is loaded
    quantize_checkpoint(str(tmp_path / "nowhere"), str(tmp_path / "out"), mode="w8a8", calibration_batches=0)


def test_unknown_skip_layer_is_a_clear_error(float_model):
  cfg, _ = float_model
  with pytest.raises(ValueError, match="'mlp.dwn', which is not a dense layer.*mlp.down"):
    quantize_lib.quantized_config(cfg, "w8a8", skip=("mlp.dwn",))
  with pytest.raises(ValueError, match="'unembed', which is not a dense layer"):
    quantize_lib.quantized_config(dataclasses.replace(cfg, tie_embeddings=True), "w8a16", skip=("unembed",))
  with pytest.raises(ValueError, match="model.quant_skip names 'mlp.dwn'"):
    model_config(**TINY, quant="w8a8", quant_skip="mlp.dwn")
  with pytest.raises(ValueError, match="'mlp.dwn', which is not a dense layer"):  # before loading
    quantize_checkpoint("/nowhere", "/nowhere/out", mode="w8a16", skip=("mlp.dwn",))
  with pytest.raises(ValueError, match="mode='int4'"):
    quantize_lib.quantized_config(cfg, "int4")
