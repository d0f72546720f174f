"""Hugging Face conversion: golden logits from transformers, round trips, bad input, fine-tuning.

The fixtures in tests/fixtures/hf_llama_* come from tests/fixtures/make_hf_llama_fixture.py (run by
hand with torch + transformers): tiny random LlamaForCausalLM models (GQA; untied float32 sharded
over three files with an index, tied bfloat16 with head_dim != hidden/heads) and the float32 logits
transformers computed for fixed tokens.
"""

import json
import os
import shutil

import jax
import numpy as np
import optax
import pytest
from safetensors.numpy import save_file

from configs.base import base_config
from launch.run import checkpoint as ckpt_lib
from launch.huggingface import convert
from launch.huggingface import checkpoint as hf_lib
from launch.run import state as ts
from lm.attention_plan import unplanned
from lm.model_def import for_shapes
from launch.run.config import model_config, validate
from launch.run.programs import activation_constraint
from launch.run.loop import train
from lm import axes
from lm.config import ModelConfig
from sharding import mesh as mesh_lib
from sharding import rules as rules_lib

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
VARIANTS = ("hf_llama_untied", "hf_llama_tied", "hf_llama3_rope", "hf_llama_linear_rope", "hf_qwen2", "hf_mistral")


def fixture_config(name: str) -> ModelConfig:
  return model_config(**hf_lib.model_fields_from_hf(hf_lib.read_hf_config(os.path.join(FIXTURES, name))))


def imported_logits(name: str, mesh_shape: dict, rules: str):
  """Imports fixture `name` onto a mesh of `mesh_shape` and returns (logits [B, L, V], params, golden)."""
  cfg = fixture_config(name)
  devices = jax.devices()[:int(np.prod(list(mesh_shape.values())))]
  mesh = mesh_lib.make_mesh(mesh_shape, devices)
  rule_table = rules_lib.get_rules(rules)
  mdef = ts.model_def(cfg, None, unplanned(cfg.attention))
  shardings = ts.param_shardings(mdef, mesh, rule_table)
  with hf_lib.HfTensors(os.path.join(FIXTURES, name)) as tensors:
    hf_lib.check_tensors(tensors, cfg)
    params = hf_lib.import_params(tensors, cfg, mdef.abstract_params, shardings)
  golden = np.load(os.path.join(FIXTURES, name, "golden.npz"))
  with axes.use_constraint(activation_constraint(mesh, rule_table)):
    logits = jax.jit(lambda p, t: mdef.bind(p)(t))(params, golden["tokens"])
  return np.asarray(logits), params, golden


@pytest.mark.parametrize("name", VARIANTS)
def test_logits_match_transformers_on_one_device(name):
  logits, _, golden = imported_logits(name, {"data": 1, "fsdp": 1, "tensor": 1}, "dp")
  assert logits.dtype == np.float32 and logits.shape == golden["logits"].shape
  np.testing.assert_allclose(logits, golden["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", VARIANTS)
def test_logits_match_transformers_on_8_devices_fsdp_tp(name):
  logits, params, golden = imported_logits(name, {"data": 2, "fsdp": 2, "tensor": 2}, "fsdp_tp")
  query = params["blocks"]["attention"]["query"]["kernel"]
  assert query.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  assert query.addressable_shards[0].data.shape == (2, 16, 2, query.shape[-1])
  np.testing.assert_allclose(logits, golden["logits"], atol=1e-4, rtol=0)


def test_each_device_reads_only_its_block(monkeypatch):
  """Under fsdp x tensor every read is one layer's block of one shard, never a whole tensor."""
  reads = []
  original = hf_lib.HfTensors.read

  def recording_read(self, name, index):
    block = original(self, name, index)
    reads.append((name, block.size))
    return block

  monkeypatch.setattr(hf_lib.HfTensors, "read", recording_read)
  imported_logits("hf_llama_untied", {"data": 2, "fsdp": 2, "tensor": 2}, "fsdp_tp")
  cfg = fixture_config("hf_llama_untied")
  q_reads = [size for name, size in reads if name == "model.layers.0.self_attn.q_proj.weight"]
  # 4 distinct (fsdp, tensor) blocks of the [32, 4, 8] query kernel, each a quarter of the tensor.
  assert q_reads == [cfg.d_model * cfg.num_heads * cfg.head_dim // 4] * 4
  assert max(size for _, size in reads) <= cfg.vocab_size * cfg.d_model // 4


@pytest.mark.parametrize("name", VARIANTS)
def test_import_export_import_is_bit_equal(name, tmp_path):
  first, exported, second = (str(tmp_path / n) for n in ("first", "exported", "second"))
  saved = convert.import_hf(os.path.join(FIXTURES, name), first)
  files = convert.export_hf(first, exported)
  # The tokenizer files (with generation_config.json) travel when the fixture has a tokenizer.json.
  has_tokenizer = os.path.exists(os.path.join(FIXTURES, name, "tokenizer.json"))
  tokenizer_files = [f for f in convert.TOKENIZER_FILES if has_tokenizer and os.path.exists(os.path.join(FIXTURES, name, f))]
  assert files == sorted(["config.json", "model.safetensors"] + tokenizer_files)
  for f in tokenizer_files:  # the tokenizer travels: fixture -> checkpoint -> export, unchanged
    with open(os.path.join(FIXTURES, name, f), "rb") as a, open(os.path.join(exported, f), "rb") as b:
      assert a.read() == b.read(), f
  with open(os.path.join(exported, "config.json")) as fh:
    exported_config = json.load(fh)
  fixture_config_json = hf_lib.read_hf_config(os.path.join(FIXTURES, name))
  assert hf_lib.model_fields_from_hf(exported_config) == hf_lib.model_fields_from_hf(fixture_config_json)
  assert (exported_config["architectures"], exported_config["model_type"]) == (
      fixture_config_json["architectures"], fixture_config_json["model_type"])  # the same family
  again = convert.import_hf(exported, second)
  assert again["model"] == saved["model"]
  if tokenizer_files:
    assert saved["data"]["tokenizer"] == "huggingface"
    assert saved["data"]["tokenizer_path"] == os.path.join(first, convert.TOKENIZER_DIR, "tokenizer.json")
    assert again["data"]["tokenizer_path"] == os.path.join(second, convert.TOKENIZER_DIR, "tokenizer.json")
  mdef = ts.model_def(for_shapes(ModelConfig(**saved["model"])))
  restored = []
  for directory in (first, second):
    checkpointer = ckpt_lib.Checkpointer(directory, read_only=True)
    restored.append(checkpointer.restore_params(mdef.abstract_params)[0])
    checkpointer.close()
  for a, b in zip(jax.tree.leaves(restored[0]), jax.tree.leaves(restored[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_params_only_checkpoint_cannot_be_resumed(tmp_path):
  out = str(tmp_path / "ckpt")
  saved = convert.import_hf(os.path.join(FIXTURES, "hf_llama_tied"), out)
  cfg = validate(saved)
  mdef = ts.model_def(for_shapes(cfg.model))
  tx = optax.adam(1e-3)
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  abstract = ts.abstract_state(mdef, tx, ts.state_shardings(mdef, tx, mesh, rules_lib.get_rules("dp")))
  with pytest.raises(ckpt_lib.CheckpointError, match="parameters only.*train.init_checkpoint"):
    ckpt_lib.Checkpointer(out, read_only=True).restore_state(abstract)


def _edited_fixture(tmp_path, **changes):
  """A copy of the tied fixture with config.json fields changed (None deletes a field)."""
  directory = str(tmp_path / "hf")
  shutil.copytree(os.path.join(FIXTURES, "hf_llama_tied"), directory)
  hf = hf_lib.read_hf_config(directory)
  hf.update(changes)
  with open(os.path.join(directory, "config.json"), "w") as fh:
    json.dump({k: v for k, v in hf.items() if v is not None}, fh)
  return directory


@pytest.mark.parametrize("changes, message", [
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}),
     "rope_parameters.low_freq_factor=None: rope type 'llama3' needs a number"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 5e5}),
     "rope_parameters.rope_type='dynamic' is not supported"),
    (dict(rope_parameters=None, rope_scaling={"type": "yarn", "factor": 4.0}), "rope_scaling.rope_type='yarn'"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5},
          rope_scaling={"rope_type": "linear", "factor": 4.0}), "rope_scaling=.* and rope_parameters=.* disagree"),
    (dict(rope_theta=1e4), "rope_theta=10000.0 and rope_parameters.rope_theta=500000.0 disagree"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "attention_factor": 0.5, "rope_theta": 5e5}),
     "rope_parameters.attention_factor=0.5 is not supported"),
    (dict(attention_bias=True), "attention_bias=True"),
    (dict(mlp_bias=True), "mlp_bias=True"),
    (dict(architectures=["MistralForCausalLM"]), "architectures=.*MistralForCausalLM"),
    (dict(model_type="gemma"), "model_type='gemma'.*families that convert are \\['llama', 'mistral', 'qwen2'\\]"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(hidden_act="gelu", mlp_bias=True), "hidden_act='gelu'.*mlp_bias=True"),  # every field is named
    (dict(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=16),
     "sliding_window=16: layers \\[0, 1\\] attend to the last sliding_window=16 tokens"),
    (dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], use_sliding_window=True, sliding_window=16,
          max_window_layers=1), "use_sliding_window=True: layers \\[1\\]"),
    (dict(hidden_size=64), "model.embed_tokens.weight has shape \\(128, 32\\); config.json implies \\(128, 64\\)"),
    (dict(tie_word_embeddings=False), "lm_head.weight is missing"),
    (dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"]), "q_proj.bias is missing"),
])
def test_unsupported_fields_are_named_before_writing(tmp_path, changes, message):
  directory = _edited_fixture(tmp_path, **changes)
  out = str(tmp_path / "out")
  with pytest.raises(hf_lib.HfConfigError, match=message):
    convert.import_hf(directory, out)
  assert not os.path.exists(out)


def test_unexpected_bias_tensor_is_named(tmp_path):
  directory = _edited_fixture(tmp_path)
  save_file({"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)},
            os.path.join(directory, "extra.safetensors"))
  with pytest.raises(hf_lib.HfConfigError, match="q_proj.bias is unexpected: config.json declares no bias"):
    convert.import_hf(directory, str(tmp_path / "out"))


def test_old_style_config_and_defaults():
  """transformers 4 wrote rope_theta at top level; head_dim and num_key_value_heads may be absent."""
  fields = hf_lib.model_fields_from_hf(dict(
      architectures=["LlamaForCausalLM"], hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=128, vocab_size=256, rope_theta=1e6, rope_scaling=None))
  assert (fields["head_dim"], fields["num_kv_heads"], fields["rope_theta"]) == (16, 4, 1e6)
  assert fields["tie_embeddings"] is False


def finetune_config(data_dir: str, init_checkpoint: str, model: dict):
  c = base_config()
  c.model.update(model)
  c.data.update(data_dir=data_dir, tokenizer="byte", seq_len=32)
  c.train.update(steps=2, global_batch_size=2, warmup_steps=1, learning_rate=1e-12, log_every=1,
                 eval_batches=1, tensorboard=False, init_checkpoint=init_checkpoint)
  c.checkpoint.async_save = False
  c.mesh.num_devices = 1
  return validate(c)


def test_fine_tune_starts_from_converted_parameters(tmp_path):
  """export -> import of a byte-vocabulary model, then train.init_checkpoint: step 0, those params."""
  model = model_config(vocab_size=259, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      mlp_dim=64, max_seq_len=64, tie_embeddings=False)
  source = ts.init_params(ts.model_def(model), jax.random.key(7))
  hf_dir, ckpt = str(tmp_path / "hf"), str(tmp_path / "converted")
  hf_lib.write_hf(hf_dir, source, model, "float32")
  hf_config = hf_lib.read_hf_config(hf_dir)
  with open(os.path.join(hf_dir, "config.json"), "w") as fh:
    json.dump({**hf_config, "bos_token_id": 7}, fh)
  saved = convert.import_hf(hf_dir, ckpt)
  fields = {k: saved["model"][k] for k in convert.WEIGHT_FIELDS + ("max_seq_len",)}
  data_dir = str(tmp_path / "data")

  wrong = finetune_config(data_dir, ckpt, {**fields, "mlp_dim": 128})
  with pytest.raises(ValueError, match="--config.model.mlp_dim=64"):
    train(wrong, str(tmp_path / "wrong"))

  result = train(finetune_config(data_dir, ckpt, fields), str(tmp_path / "run"))
  assert result.final_step == 2 and np.isfinite(result.val_loss)
  mdef = ts.model_def(model_config(**fields))
  checkpointer = ckpt_lib.Checkpointer(result.checkpoint_dir, read_only=True)
  tuned, meta = checkpointer.restore_params(mdef.abstract_params)
  assert meta["step"] == 2  # a fresh run: counted from 0, not from the converted step
  for a, b in zip(jax.tree.leaves(source), jax.tree.leaves(tuned)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)  # lr 1e-12: unchanged
  checkpointer.close()

  # The export of the fine-tuned run keeps the imported config.json's other fields (token ids).
  exported = str(tmp_path / "exported")
  convert.export_hf(result.checkpoint_dir, exported, dtype="bfloat16")
  assert hf_lib.read_hf_config(exported)["bos_token_id"] == 7
